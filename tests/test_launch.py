"""launch/ scripts against a fake Cloud TPU slice and a fake SLURM, all on this machine.

A temp dir first on PATH holds fake `gcloud`, `srun` and `sbatch` (one bash program, named by
symlinks) that log their argv. The fake `gcloud ... tpu-vm ssh --worker=all`
runs the remote command with bash in each of two fake worker homes (with fake `hostname`,
`sudo`, `python3.11`, venv `python` / `pip`), `tpu-vm scp` copies into them, and the fake
`sbatch` runs the job script from a spool copy with SLURM_JOB_ID set, as SLURM does. So the
tests check both the exact commands the scripts issue and what those commands do on a worker.
Nothing here reaches the network or the real gcloud.
"""

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("tpu_create.sh", "tpu_setup.sh", "tpu_run.sh", "tpu_delete.sh", "slurm_gpu.sbatch")
ZONE = "us-west4-a"
SCOPE = ["--zone", ZONE, "--project", "my-proj"]
TPU = ["--name=pod", f"--zone={ZONE}", "--project", "my-proj"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", *SCOPE, "--worker=all", "--command"]
WORKERS = ("w-0", "w-1")

FAKE_TOOL = r'''#!/bin/bash
# Fake gcloud / srun / sbatch and fake worker commands, chosen by the name it is called by (bash,
# not Python: it starts a hundred times per test file). Every call appends one record to
# $FAKE_LOG: tool, event, pid, cwd, host, JAX_PLATFORMS ("unset" when unset), then argv; each
# field ends with \x1f and the record with \x1e.
set -euo pipefail
tool="${0##*/}"
self="$(readlink -f "$0")"

log() {
  local record
  record="$(printf '%s\x1f' "$tool" "$1" "$$" "$PWD" "${FAKE_HOSTNAME-}" \
    "${JAX_PLATFORMS-unset}" "${@:2}")"
  printf '%s\x1e' "$record" >> "$FAKE_LOG"
}

option() {
  # Value of `$1 V` or `$1=V` among the words after $1.
  local name="$1"
  shift
  while (($# > 0)); do
    case "$1" in
      "$name") printf '%s' "$2"; return ;;
      "$name"=*) printf '%s' "${1#*=}"; return ;;
    esac
    shift
  done
}

describe_queued_resource() {
  # Prints the next of the comma-separated $FAKE_QR_STATES (default ACTIVE); the last repeats.
  local counter="$FAKE_STATE_DIR/describe_count" count=0 states
  if [[ -f "$counter" ]]; then
    count="$(<"$counter")"
  fi
  echo "$((count + 1))" > "$counter"
  IFS=, read -ra states <<< "${FAKE_QR_STATES:-ACTIVE}"
  if ((count >= ${#states[@]})); then
    count=$((${#states[@]} - 1))
  fi
  echo "${states[count]}"
}

ssh_all_workers() {
  # Runs --command with bash in every worker home, as that worker; fails if one fails.
  local command home status=0
  command="$(option --command "$@")"
  for home in "$FAKE_WORKERS_DIR"/*; do
    (cd "$home" && HOME="$home" FAKE_HOSTNAME="${home##*/}" \
      PATH="$home/.fakebin:$FAKE_WORKER_BIN:/usr/bin:/bin" bash -c "$command") || status=$?
  done
  return "$status"
}

scp_to_all_workers() {
  # Copies the sources into DIR of every worker home (the last word is NAME:DIR).
  local words=() home
  while (($# > 0)); do
    case "$1" in
      --zone | --project) shift ;;
      --*) ;;
      *) words+=("$1") ;;
    esac
    shift
  done
  for home in "$FAKE_WORKERS_DIR"/*; do
    cp -R "${words[@]:0:${#words[@]}-1}" "$home/${words[${#words[@]}-1]#*:}/"
  done
}

sbatch_and_run() {
  # Prints the job id, then runs a spool copy of the script as job 4242 in --chdir.
  local submit_dir="$PWD" chdir="$PWD" spool="$FAKE_STATE_DIR/spool/slurm_script"
  echo "Submitted batch job 4242"
  while [[ "$1" == -* ]]; do
    if [[ "$1" == --chdir=* ]]; then
      chdir="${1#*=}"
    fi
    shift
  done
  mkdir -p "${spool%/*}"
  cp "$1" "$spool"
  shift
  (cd "$chdir" && SLURM_JOB_ID=4242 SLURM_SUBMIT_DIR="$submit_dir" bash "$spool" "$@") \
    > "$FAKE_STATE_DIR/slurm-4242.out" 2>&1
}

apt_install() {
  # `sudo apt-get ... install PKG...`: puts a fake interpreter named PKG (not PKG-venv) on PATH.
  local installing=0 word
  for word in "$@"; do
    if [[ "$word" == install ]]; then
      installing=1
    elif ((installing)) && [[ "$word" != -* && "$word" != *-venv ]]; then
      mkdir -p "$HOME/.fakebin"
      ln -sf "$self" "$HOME/.fakebin/$word"
    fi
  done
}

make_venv() {
  # `python3.X -m venv DIR`: DIR/bin/python and DIR/bin/pip are this fake.
  if [[ "${1-}" == -m && "${2-}" == venv ]]; then
    mkdir -p "$3/bin"
    ln -sf "$self" "$3/bin/python"
    ln -sf "$self" "$3/bin/pip"
  fi
}

venv_python() {
  # `-m cots_jax.main ...` trains (sleeps) until SIGTERM, which it logs; anything else is the
  # JAX check of tpu_setup.sh.
  if [[ "${1-} ${2-}" != "-m cots_jax.main" ]]; then
    echo "jax process 0: 8 devices"
    return
  fi
  echo "fake cots_jax.main on $FAKE_HOSTNAME"
  sleep "${FAKE_MAIN_SECONDS:-15}" &
  sleeper=$!
  trap 'log SIGTERM; kill "$sleeper"; exit 0' TERM
  wait "$sleeper"
}

log call "$@"
case "$tool" in
  gcloud)
    case "$3 $4" in
      "queued-resources describe") describe_queued_resource ;;
      "tpu-vm ssh") ssh_all_workers "$@" ;;
      "tpu-vm scp") scp_to_all_workers "${@:5}" ;;
      *) echo "fake gcloud: done" ;;
    esac
    ;;
  sbatch) sbatch_and_run "$@" ;;
  hostname) echo "$FAKE_HOSTNAME" ;;
  sudo) apt_install "$@" ;;
  python) venv_python "$@" ;;
  python3*) make_venv "$@" ;;
esac
'''


class FakeCloud:
  """The fake tools, two fake TPU workers, and the environment that puts them first on PATH."""

  def __init__(self, root):
    self.root = root
    self.log = root / "calls.log"
    self.tool = tool = root / "fake_tool.sh"
    tool.write_text(FAKE_TOOL)
    tool.chmod(0o755)
    self.bin = root / "bin"
    worker_bin = root / "worker_bin"
    for directory, names in ((self.bin, ("gcloud", "srun", "sbatch")),
                             (worker_bin, ("hostname", "sudo", "python3.11"))):
      directory.mkdir()
      for name in names:
        (directory / name).symlink_to(tool)
    self.homes = [root / "workers" / name for name in WORKERS]
    for home in self.homes:
      home.mkdir(parents=True)
    self.env = {key: value for key, value in os.environ.items()
                if not key.startswith("SLURM_") and key not in ("CONFIG", "WORKDIR")}
    self.env.update(PATH=f"{self.bin}:{os.environ['PATH']}", JAX_PLATFORMS="cpu",
                    FAKE_LOG=str(self.log), FAKE_STATE_DIR=str(root),
                    FAKE_WORKERS_DIR=str(root / "workers"), FAKE_WORKER_BIN=str(worker_bin))
    assert shutil.which("gcloud", path=self.env["PATH"]) == str(self.bin / "gcloud")

  def run(self, script, *args, env=None, stdin=""):
    """Runs launch/SCRIPT ARGS with bash; returns the CompletedProcess (text)."""
    return subprocess.run(["bash", str(LAUNCH / script), *args], env={**self.env, **(env or {})},
                          input=stdin, capture_output=True, text=True, timeout=30, check=False)

  def calls(self, tool=None, event="call"):
    """The logged calls, oldest first, of `tool` (all tools when None)."""
    if not self.log.exists():
      return []
    records = []
    for record in self.log.read_text().split("\x1e")[:-1]:
      name, kind, pid, cwd, host, jax_platforms, *argv = record.split("\x1f")[:-1]
      if (tool is None or name == tool) and kind == event:
        records.append({"tool": name, "argv": argv, "pid": int(pid), "cwd": cwd, "host": host,
                        "jax_platforms": None if jax_platforms == "unset" else jax_platforms})
    return records

  def commands(self, tool):
    """argv (with the tool name first) of each logged call of `tool`."""
    return [[tool, *call["argv"]] for call in self.calls(tool)]

  def wait_for(self, tool, event, count):
    """The `event` records of `tool` once there are `count` of them (fails after 10 s)."""
    deadline = time.monotonic() + 10
    while len(self.calls(tool, event)) < count:
      assert time.monotonic() < deadline, f"only {self.calls(tool, event)} after 10 s"
      time.sleep(0.05)
    return self.calls(tool, event)


@pytest.fixture
def fake(tmp_path):
  cloud = FakeCloud(tmp_path)
  yield cloud
  # Fake training processes that a test started and did not stop (SIGTERM ends them and their
  # `sleep`).
  stopped = {call["pid"] for call in cloud.calls("python", "SIGTERM")}
  for call in cloud.calls("python"):
    if call["argv"][:2] == ["-m", "cots_jax.main"] and call["pid"] not in stopped:
      try:
        os.kill(call["pid"], signal.SIGTERM)
      except ProcessLookupError:
        pass


def printed_commands(result):
  """The argv of each `+ ` line that a --dry-run printed (and it printed nothing else)."""
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), result.stdout
  return [shlex.split(line[2:]) for line in lines]


def ok(result):
  assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
  return result


def usage_failure(result):
  """The stderr of a run that stopped with a usage error (exit 2)."""
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert "--help" in result.stderr
  return result.stderr


# ------------------------------------------------------------------------------- all scripts


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_with_usage_and_calls_nothing(fake, script):
  result = ok(fake.run(script, "--help"))
  assert result.stdout.startswith("Usage:") and "--dry-run" in result.stdout
  assert fake.run(script, "-h").stdout == result.stdout
  assert fake.calls() == []


@pytest.mark.parametrize("script, args, missing", [
    ("tpu_create.sh", ["--name=pod", f"--zone={ZONE}"], "--accelerator-type"),
    ("tpu_create.sh", ["--accelerator-type=v4-8"], "--name --zone"),
    ("tpu_setup.sh", ["--name=pod"], "--zone"),
    ("tpu_run.sh", ["--name=pod", f"--zone={ZONE}", "--workdir=gs://b/r"], "--config"),
    ("tpu_run.sh", ["--name=pod", f"--zone={ZONE}", "--config=c"], "--workdir"),
    ("tpu_delete.sh", [f"--zone={ZONE}", "--yes"], "--name"),
    ("slurm_gpu.sbatch", ["--config=c"], "--workdir"),
    ("slurm_gpu.sbatch", ["--workdir=/shared/r"], "--config"),
])
def test_missing_required_flags_are_named(fake, script, args, missing):
  word = "flags" if " " in missing else "flag"
  assert f"missing required {word} {missing}" in usage_failure(fake.run(script, *args))
  assert fake.calls() == []


@pytest.mark.parametrize("args, message", [
    (["--frobnicate"], "unknown flag --frobnicate"),
    (["--queued=1"], "unknown flag --queued (or it takes no value)"),
    (["--zone"], "flag --zone needs a value"),
    (["--zone", "--yes"], "flag --zone needs a value"),
    (["pod"], "unexpected argument 'pod'"),
    (["--", "--extra"], "unexpected arguments after --: --extra"),
])
def test_bad_command_lines_are_refused(fake, args, message):
  assert message in usage_failure(fake.run("tpu_delete.sh", "--name=pod", *args))
  assert fake.calls() == []


# -------------------------------------------------------------------------------- tpu_create


def expected_create(queued, provisioning, version="v2-alpha-tpuv5-lite"):
  """The gcloud argv lists tpu_create.sh must issue for a v5e-256 slice named pod."""
  if not queued:
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", *SCOPE,
             "--accelerator-type", "v5litepod-256", "--version", version, *provisioning]]
  return [["gcloud", "compute", "tpus", "queued-resources", "create", "pod", "--node-id", "pod",
           *SCOPE, "--accelerator-type", "v5litepod-256", "--runtime-version", version,
           *provisioning],
          ["gcloud", "compute", "tpus", "queued-resources", "describe", "pod", *SCOPE,
           "--format=value(state.state)"]]


@pytest.mark.parametrize("queued", [False, True])
@pytest.mark.parametrize("mode", [[], ["--spot"], ["--reserved"]])
def test_create_issues_the_commands_it_prints(fake, queued, mode):
  args = [*TPU, "--accelerator-type", "v5litepod-256", *mode, *(["--queued"] if queued else [])]
  expected = expected_create(queued, mode)
  assert printed_commands(fake.run("tpu_create.sh", *args, "--dry-run")) == expected
  assert fake.calls() == []
  ok(fake.run("tpu_create.sh", *args))
  assert fake.commands("gcloud") == expected


def test_queued_create_polls_until_active(fake):
  states = ["ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]
  result = ok(fake.run("tpu_create.sh", *TPU, "--accelerator-type=v5litepod-256", "--queued",
                       "--poll-seconds=0", env={"FAKE_QR_STATES": ",".join(states)}))
  create, describe = expected_create(True, [])
  assert fake.commands("gcloud") == [create] + [describe] * len(states)
  reported = [line.rsplit(" is ", 1)[1] for line in result.stderr.splitlines() if " is " in line]
  assert reported == states


@pytest.mark.parametrize("final", ["FAILED", "SUSPENDED"])
def test_queued_create_stops_when_the_request_fails(fake, final):
  result = fake.run("tpu_create.sh", *TPU, "--accelerator-type=v5litepod-256", "--queued",
                    "--poll-seconds=0", env={"FAKE_QR_STATES": f"WAITING_FOR_RESOURCES,{final}"})
  assert result.returncode == 1
  assert f"queued resource pod is {final}" in result.stderr and "tpu_delete.sh --queued" in (
      result.stderr)
  assert len(fake.calls("gcloud")) == 3


@pytest.mark.parametrize("accelerator, version", [
    ("v4-128", "tpu-ubuntu2204-base"), ("v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v2-alpha-tpuv5"), ("v6e-256", "v2-alpha-tpuv6e"), ("v3-32", "tpu-ubuntu2204-base"),
])
def test_create_picks_the_runtime_for_the_family(fake, accelerator, version):
  [command] = printed_commands(fake.run("tpu_create.sh", *TPU, "--dry-run",
                                        f"--accelerator-type={accelerator}"))
  assert command[command.index("--version") + 1] == version
  [command] = printed_commands(fake.run("tpu_create.sh", *TPU, "--dry-run", "--version=my-rt",
                                        f"--accelerator-type={accelerator}"))
  assert command[command.index("--version") + 1] == "my-rt"


def test_create_refuses_spot_and_reserved_together(fake):
  result = fake.run("tpu_create.sh", *TPU, "--accelerator-type=v4-8", "--spot", "--reserved")
  assert "--spot and --reserved exclude each other" in usage_failure(result)


def test_create_refuses_a_poll_interval_that_is_no_number(fake):
  result = fake.run("tpu_create.sh", *TPU, "--accelerator-type=v4-8", "--queued",
                    "--poll-seconds=soon")
  assert "--poll-seconds takes whole seconds, got 'soon'" in usage_failure(result)


# --------------------------------------------------------------------------------- tpu_setup


def worker_calls(fake, tool):
  """{worker: [(argv, cwd relative to its home)]} of the logged calls of `tool`."""
  calls = {name: [] for name in WORKERS}
  for call in fake.calls(tool):
    home = fake.root / "workers" / call["host"]
    calls[call["host"]].append((call["argv"], os.path.relpath(call["cwd"], home)))
  return calls


def assert_installed(fake, python="python3.11"):
  """Each worker made cots_jax/.venv with `python` and pip-installed the checkout with [tpu]."""
  for name in WORKERS:
    assert worker_calls(fake, python)[name] == [(["-m", "venv", ".venv"], "cots_jax")]
    assert worker_calls(fake, "pip")[name] == [(["install", "-q", "--upgrade", "pip"], "cots_jax"),
                                                (["install", "-q", "-e", ".[tpu]"], "cots_jax")]
    [(argv, _)] = worker_calls(fake, "python")[name]
    assert argv[0] == "-c" and "jax.distributed.initialize()" in argv[1]


def test_setup_copies_this_checkout_and_installs_on_every_worker(fake):
  sources = [str(REPO / path) for path in
             ("setup.cfg", "pyproject.toml", "README.md", "cots_jax", "configs")]
  dry = printed_commands(fake.run("tpu_setup.sh", *TPU, "--dry-run"))
  result = ok(fake.run("tpu_setup.sh", *TPU))
  real = fake.commands("gcloud")
  assert dry == real
  assert real[0] == [*SSH, "mkdir -p cots_jax"]
  assert real[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", *sources,
                     "pod:cots_jax", *SCOPE, "--worker=all"]
  assert real[2][:-1] == SSH and len(real) == 3
  for home in fake.homes:
    assert (home / "cots_jax/setup.cfg").read_bytes() == (REPO / "setup.cfg").read_bytes()
    assert (home / "cots_jax/cots_jax/main.py").exists()
    assert (home / "cots_jax/configs/pretrain.py").exists()
  assert_installed(fake)
  assert fake.calls("sudo") == []
  assert result.stdout.count("jax process 0: 8 devices") == len(WORKERS)


def git(*args, cwd):
  subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                 check=True, capture_output=True)


@pytest.fixture
def origin(tmp_path):
  """A git repository with `version` = main on branch main and = dev on branch dev."""
  repo = tmp_path / "origin"
  repo.mkdir()
  git("init", "-q", "-b", "main", cwd=repo)
  (repo / "version").write_text("main")
  git("add", "version", cwd=repo)
  git("commit", "-q", "-m", "main", cwd=repo)
  git("checkout", "-q", "-b", "dev", cwd=repo)
  (repo / "version").write_text("dev")
  git("commit", "-q", "-am", "dev", cwd=repo)
  git("checkout", "-q", "main", cwd=repo)
  return repo


@pytest.mark.parametrize("branch", [None, "dev"])
def test_setup_clones_the_repo_then_pulls_it(fake, origin, branch):
  args = [*TPU, f"--repo={origin}", *([f"--branch={branch}"] if branch else [])]
  wanted = branch or "main"
  ok(fake.run("tpu_setup.sh", *args))
  for home in fake.homes:
    assert (home / "cots_jax/version").read_text() == wanted
  git("checkout", "-q", wanted, cwd=origin)
  (origin / "version").write_text(f"{wanted} 2")
  git("commit", "-q", "-am", "second", cwd=origin)
  ok(fake.run("tpu_setup.sh", *args))
  for home in fake.homes:
    assert (home / "cots_jax/version").read_text() == f"{wanted} 2"
  commands = fake.commands("gcloud")
  assert [command[:-1] for command in commands] == [SSH] * 4
  assert printed_commands(fake.run("tpu_setup.sh", *args, "--dry-run")) == commands[2:]


def test_setup_installs_a_missing_python_with_apt(fake, origin):
  ok(fake.run("tpu_setup.sh", *TPU, f"--repo={origin}", "--python=python3.99"))
  for name in WORKERS:
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
    assert [argv for argv, _ in worker_calls(fake, "sudo")[name]] == [
        [*apt, "update", "-q"], [*apt, "install", "-y", "-q", "python3.99", "python3.99-venv"]]
  assert_installed(fake, python="python3.99")


def test_setup_refuses_a_branch_without_a_repo(fake):
  assert "--branch needs --repo" in usage_failure(fake.run("tpu_setup.sh", *TPU, "--branch=dev"))


# ----------------------------------------------------------------------------------- tpu_run

RUN = [*TPU, "--config=configs/pretrain.py:model=base", "--workdir=gs://bucket/run"]
EXTRA = ["--config.total_steps=7", "--config.note=it's a b"]


def workers_saying(text, phrase):
  """The workers with a line `WORKER: ...phrase...` in `text`, sorted."""
  return sorted(line.split(":")[0] for line in text.splitlines()
                if line.startswith(tuple(f"{name}: " for name in WORKERS)) and phrase in line)


def make_venvs(fake):
  for home in fake.homes:
    (home / "cots_jax/.venv/bin").mkdir(parents=True)
    (home / "cots_jax/.venv/bin/python").symlink_to(fake.tool)


def test_run_starts_main_detached_on_every_worker_and_stops_it(fake):
  make_venvs(fake)
  dry = printed_commands(fake.run("tpu_run.sh", *RUN, "--dry-run", "--", *EXTRA))
  assert fake.calls() == []
  ok(fake.run("tpu_run.sh", *RUN, "--", *EXTRA))
  assert fake.commands("gcloud") == dry and dry[0][:-1] == SSH
  started = fake.wait_for("python", "call", len(WORKERS))
  assert sorted(call["host"] for call in started) == list(WORKERS)
  for call in started:
    home = fake.root / "workers" / call["host"]
    assert call["argv"] == ["-m", "cots_jax.main", "--config=configs/pretrain.py:model=base",
                            "--workdir=gs://bucket/run", "--multihost", *EXTRA]
    assert call["cwd"] == str(home / "cots_jax") and call["jax_platforms"] is None
    assert (home / "cots_jax/logs/main.pid").read_text().strip() == str(call["pid"])
    log = home / f"cots_jax/logs/main-{call['host']}.log"
    deadline = time.monotonic() + 10
    while "fake cots_jax.main on" not in log.read_text():
      assert time.monotonic() < deadline
      time.sleep(0.05)

  again = fake.run("tpu_run.sh", *RUN)
  assert again.returncode == 1
  assert workers_saying(again.stderr, "cots_jax.main still runs (pid") == list(WORKERS)
  assert len(fake.calls("python")) == len(WORKERS)

  stop = ok(fake.run("tpu_run.sh", *TPU, "--stop"))
  assert workers_saying(stop.stdout, "sent SIGTERM to cots_jax.main") == list(WORKERS)
  stopped = fake.wait_for("python", "SIGTERM", len(WORKERS))
  assert {call["pid"] for call in stopped} == {call["pid"] for call in started}
  assert fake.commands("gcloud")[-1][:-1] == SSH


def test_stop_without_a_run_says_so(fake):
  make_venvs(fake)
  result = ok(fake.run("tpu_run.sh", *TPU, "--stop"))
  assert workers_saying(result.stdout, "cots_jax.main is not running") == list(WORKERS)


@pytest.mark.parametrize("workdir", ["runs/x", "/tmp/run", "gs://", "GS://bucket/run", "gs:/b"])
def test_run_refuses_a_workdir_off_gcs(fake, workdir):
  result = fake.run("tpu_run.sh", *TPU, "--config=c", f"--workdir={workdir}")
  assert f"--workdir must be a gs:// path, got '{workdir}'" in usage_failure(result)
  assert fake.calls() == []


# -------------------------------------------------------------------------------- tpu_delete


@pytest.mark.parametrize("queued, expected", [
    (False, ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", *SCOPE, "--quiet"]),
    (True, ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod", *SCOPE, "--force",
            "--quiet"]),
])
def test_delete_asks_then_deletes(fake, queued, expected):
  args = [*TPU, *(["--queued"] if queued else [])]
  assert printed_commands(fake.run("tpu_delete.sh", *args, "--dry-run")) == [expected]
  refused = fake.run("tpu_delete.sh", *args, stdin="n\n")
  assert refused.returncode == 1 and "not deleted" in refused.stderr
  assert f"zone {ZONE} of project my-proj? [y/N]" in refused.stderr
  assert fake.run("tpu_delete.sh", *args, stdin="").returncode == 1
  assert fake.calls() == []
  ok(fake.run("tpu_delete.sh", *args, stdin="yes\n"))
  ok(fake.run("tpu_delete.sh", *args, "--yes"))
  assert fake.commands("gcloud") == [expected, expected]


# --------------------------------------------------------------------------------- slurm_gpu


def expected_srun(config="configs/pretrain.py:model=base", workdir="/shared/run", extra=()):
  return ["srun", "--kill-on-bad-exit=1", "python", "-m", "cots_jax.main", f"--config={config}",
          f"--workdir={workdir}", "--multihost", *extra]


def test_slurm_submits_itself_and_the_job_runs_srun(fake):
  args = ["--config=configs/pretrain.py:model=base", "--workdir=/shared/run", "--nodes=4",
          "--time=2:00:00", "--", *EXTRA]
  expected = ["sbatch", f"--chdir={REPO}", "--nodes=4", "--time=2:00:00",
              str(LAUNCH / "slurm_gpu.sbatch"), "--config=configs/pretrain.py:model=base",
              "--workdir=/shared/run", "--python=python", "--", *EXTRA]
  assert printed_commands(fake.run("slurm_gpu.sbatch", "--dry-run", *args)) == [expected]
  assert fake.calls() == []
  result = ok(fake.run("slurm_gpu.sbatch", *args))
  assert "Submitted batch job 4242" in result.stdout
  assert fake.commands("sbatch") == [expected]
  assert fake.commands("srun") == [expected_srun(extra=EXTRA)]
  [srun] = fake.calls("srun")
  assert srun["cwd"] == str(REPO) and srun["jax_platforms"] is None


def test_slurm_inside_a_job_runs_srun_with_env_config(fake):
  env = {"SLURM_JOB_ID": "7", "CONFIG": "configs/pretrain.py", "WORKDIR": "gs://b/r"}
  expected = expected_srun("configs/pretrain.py", "gs://b/r")
  assert printed_commands(fake.run("slurm_gpu.sbatch", "--dry-run", env=env)) == [expected]
  assert fake.calls() == []
  ok(fake.run("slurm_gpu.sbatch", env=env))
  ok(fake.run("slurm_gpu.sbatch", "--workdir=/shared/other", env=env))
  assert fake.commands("srun") == [expected, expected_srun("configs/pretrain.py", "/shared/other")]


def test_slurm_without_a_workdir_says_where_to_give_it(fake):
  stderr = usage_failure(fake.run("slurm_gpu.sbatch", env={"CONFIG": "c", "SLURM_JOB_ID": "7"}))
  assert "missing required flag --workdir (or environment variable WORKDIR)" in stderr
  assert fake.calls() == []
