"""The experiment runner and report (cots_jax/experiments/) and the grids (configs/grids.py).

The runner's loop runs against a fake `python` (a shell script in place of sys.executable) that
logs its arguments and plays a finished, checkpointed, failing or preempted cots_jax.main; one
slow test runs the `smoke` grid for real, end to end.
"""

import importlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from configs import grids
from cots_jax import config_validation
from cots_jax.experiments import report as grid_report
from cots_jax.experiments import runner
from support import run_module, subprocess_env

# Stands in for `python -m cots_jax.main ... --workdir=DIR ...`: appends its arguments to
# $FAKE_LOG, then does what $FAKE_MAIN says.
FAKE_PYTHON = r"""#!/bin/sh
echo "$*" >> "$FAKE_LOG"
for arg in "$@"; do case "$arg" in --workdir=*) dir="${arg#--workdir=}";; esac; done
mkdir -p "$dir"
case "$FAKE_MAIN" in
  finish) echo '{"eval/retrieval/rsum": 100.0}' > "$dir/final_eval.json";;
  checkpoint) mkdir -p "$dir/checkpoints/4" "$dir/checkpoints/8.orbax-checkpoint-tmp-1";;
  fail) exit 3;;
  preempt)
    trap 'touch "$dir/got_sigterm"; exit 0' TERM
    sleep 0.2  # the runner is waiting for this child by now
    kill -TERM "$PPID"
    while :; do sleep 0.05; done;;
esac
"""
FAKE_GRID = {
    "base": "configs/pretrain.py:runlocal",
    "schedule": {"total_steps": 8},
    "variants": {"a": {"overrides": {"loss.mlm": 0.0}}, "b": {"overrides": {}}},
}
RETRIEVAL_KEYS = [key for _, key in grid_report.RETRIEVAL_COLUMNS]


@pytest.fixture
def fake_main(tmp_path, monkeypatch):
  """Runs the `fake` grid's children with FAKE_PYTHON; returns a reader of its log lines."""
  script = tmp_path / "fake_python"
  script.write_text(FAKE_PYTHON)
  script.chmod(0o755)
  log = tmp_path / "fake_main.log"
  log.touch()
  monkeypatch.setattr(sys, "executable", str(script))
  monkeypatch.setenv("FAKE_LOG", str(log))
  monkeypatch.setitem(grids.GRIDS, "fake", FAKE_GRID)
  return lambda: log.read_text().splitlines()


def _record(path):
  return json.loads((path / runner.RUN_FILE).read_text())


# ------------------------------------------------------------------------------------- grids


@pytest.mark.parametrize("name", sorted(grids.GRIDS))
def test_every_override_names_a_field_of_its_base_config(name):
  grid = grids.GRIDS[name]
  assert json.loads(json.dumps(grid)) == grid  # plain data, as grid.json stores it
  for variant, spec in grid["variants"].items():
    path, _, arg = runner.join_config(grid["base"], spec.get("arg", "")).partition(":")
    module = os.path.splitext(os.path.relpath(path, "configs"))[0]
    config = importlib.import_module(f"configs.{module}").get_config(arg)
    overrides = {**grid["schedule"], **spec["overrides"]}
    config.update_from_flattened_dict(overrides)  # KeyError / TypeError for a bad override
    config_validation.validate(config)
    assert variant and "/" not in variant


def test_grids_hold_the_planned_variants():
  variants = {name: list(grid["variants"]) for name, grid in grids.GRIDS.items()}
  assert variants["ablation"] == ["itc", "itc_mlm_mvm", "itc_mlm_mvm_kl", "cots", "kl_one_way",
                                  "kl_stopgrad"]
  assert variants["cookie"] == ["cm", "cm_wst", "cm_wst_views", "cm_wst_cross_model"]
  assert variants["noise"] == ["p0_amf", "p0_noamf", "p20_amf", "p20_noamf", "p40_amf",
                               "p40_noamf"]
  assert grids.GRIDS["ablation"]["shared_vq"] and grids.GRIDS["noise"]["shared_vq"]
  assert grids.GRIDS["ablation"]["variants"]["cots"]["overrides"] == {}


# ---------------------------------------------------------------------------------- commands


def test_config_args_join_with_commas():
  assert runner.join_config("configs/x.py") == "configs/x.py"
  assert runner.join_config("configs/x.py", "", "model=base") == "configs/x.py:model=base"
  joined = runner.join_config("configs/x.py:data=flickr8k", "intra=cross_model", "model=base")
  assert joined == "configs/x.py:data=flickr8k,intra=cross_model,model=base"


def test_run_command_has_config_args_seed_schedule_overrides_and_the_shared_vq(tmp_path):
  cookie = grids.GRIDS["cookie"]
  command = runner.run_command(cookie, "cm_wst_cross_model", 2, str(tmp_path), "model=base")
  assert command[:3] == [sys.executable, "-m", "cots_jax.main"]
  assert command[3] == ("--config=configs/cookie_pretrain.py:data=flickr8k,intra=cross_model,"
                        "model=base")
  assert command[4:6] == [f"--workdir={tmp_path}/cm_wst_cross_model/seed_2", "--config.seed=2"]
  assert command[6:] == [f"--config.{k}={v}" for k, v in cookie["schedule"].items()]
  ablation = grids.GRIDS["ablation"]
  command = runner.run_command(ablation, "kl_stopgrad", 0, str(tmp_path))
  assert command[3] == "--config=configs/pretrain.py:data=flickr8k,recipe=cots"
  assert command[-2:] == ["--config.kl.stopgrad_target=True", f"--config.vq.init={tmp_path}/_vq"]
  assert runner.vq_command(ablation, str(tmp_path), "model=base")[3:6] == [
      "--config=configs/pretrain.py:data=flickr8k,recipe=cots,model=base",
      f"--workdir={tmp_path}/_vq", "--config.trainer=vq"]


def test_run_status_reads_final_eval_and_the_latest_complete_checkpoint(tmp_path):
  assert runner.run_status(str(tmp_path / "none")) == "starting"
  (tmp_path / "checkpoints" / "40").mkdir(parents=True)
  (tmp_path / "checkpoints" / "80").mkdir()
  (tmp_path / "checkpoints" / "120.orbax-checkpoint-tmp-1700000000").mkdir()
  assert runner.run_status(str(tmp_path)) == "resuming from step 80"
  (tmp_path / "final_eval.json").write_text("{}")
  assert runner.run_status(str(tmp_path)) == "finished, skipped"


# --------------------------------------------------------------------------------------- run


def test_an_unfinished_run_restarts_with_its_command_and_finished_runs_are_skipped(
    fake_main, tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "grid"
  monkeypatch.setenv("FAKE_MAIN", "checkpoint")  # stops with a checkpoint, no final eval
  with pytest.raises(runner.GridError, match="a/seed_0: cots_jax.main stopped before its "
                     "final eval"):
    runner.run_grid("fake", str(workdir), seeds=1)
  first = _record(workdir / "a" / "seed_0")
  assert first["invocations"] == 1 and (first["variant"], first["seed"]) == ("a", 0)
  assert capsys.readouterr().out.splitlines() == ["[1/2] fake/a seed 0: starting"]

  monkeypatch.setenv("FAKE_MAIN", "finish")
  runner.run_grid("fake", str(workdir), seeds=1)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "[1/2] fake/a seed 0: resuming from step 4"
  assert re.fullmatch(r"\[2/2\] fake/b seed 0: starting, ETA (\d+ h )?\d+ min \d+ s", lines[1])
  again = _record(workdir / "a" / "seed_0")
  assert again["command"] == first["command"] and again["invocations"] == 2
  assert again["wall_seconds"] >= first["wall_seconds"]
  assert fake_main()[0] == fake_main()[1] == " ".join(first["command"][1:])
  assert "--config.loss.mlm=0.0" in first["command"]

  runner.run_grid("fake", str(workdir), seeds=1)
  assert capsys.readouterr().out.splitlines()[:2] == [
      "[1/2] fake/a seed 0: finished, skipped", "[2/2] fake/b seed 0: finished, skipped"]
  assert len(fake_main()) == 3  # no child for finished runs
  assert json.loads((workdir / "grid.json").read_text())["definition"] == FAKE_GRID


def test_only_runs_the_named_variants_seed_major(fake_main, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("FAKE_MAIN", "finish")
  runner.run_grid("fake", str(tmp_path), seeds=2, only=["b"])
  assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()[:2]] == [
      "[1/2] fake/b seed 0", "[2/2] fake/b seed 1"]
  assert not (tmp_path / "a").exists()
  monkeypatch.setenv("FAKE_MAIN", "fail")  # b is finished: no child; a's seed 0 goes first
  with pytest.raises(runner.GridError, match="a/seed_0: cots_jax.main exited"):
    runner.run_grid("fake", str(tmp_path), seeds=2)


def test_a_failing_child_stops_the_grid_in_one_line(fake_main, tmp_path, monkeypatch):
  monkeypatch.setenv("FAKE_MAIN", "fail")
  with pytest.raises(runner.GridError) as error:
    runner.run_grid("fake", str(tmp_path), seeds=1)
  assert str(error.value) == (f"{tmp_path}/a/seed_0: cots_jax.main exited with status 3; the "
                              "grid stops here")
  assert len(fake_main()) == 1 and _record(tmp_path / "a" / "seed_0")["invocations"] == 1


def test_sigterm_to_the_runner_reaches_the_child_which_is_waited_for(fake_main, tmp_path,
                                                                    monkeypatch):
  monkeypatch.setenv("FAKE_MAIN", "preempt")  # the child sends the runner SIGTERM
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(runner.GridError, match=r"interrupted: the child in .*a/seed_0 "
                     r"stopped \(exit status 0\); run the same command again"):
    runner.run_grid("fake", str(tmp_path), seeds=1)
  assert (tmp_path / "a" / "seed_0" / "got_sigterm").exists()
  assert _record(tmp_path / "a" / "seed_0")["invocations"] == 1
  assert len(fake_main()) == 1 and signal.getsignal(signal.SIGTERM) is handler


def test_errors_name_the_problem_in_one_line(fake_main, tmp_path, monkeypatch):
  monkeypatch.setenv("FAKE_MAIN", "finish")
  cases = [
      (lambda: runner.run_grid("nope", str(tmp_path)),
       "unknown grid 'nope'; the grids are ablation, cookie, noise, smoke, fake"),
      (lambda: runner.run_grid("fake", str(tmp_path), only=["a", "c"]),
       "grid 'fake' has no variant 'c'; its variants are a, b"),
      (lambda: grid_report.write_report(str(tmp_path / "empty")),
       f"{tmp_path}/empty holds no grid.json: no grid was run there"),
  ]
  runner.run_grid("fake", str(tmp_path / "grid"), seeds=1)
  cases += [
      (lambda: runner.run_grid("smoke", str(tmp_path / "grid"), seeds=1),
       f"{tmp_path}/grid holds grid 'fake' with 1 seeds and base_arg '', not grid 'smoke' with 1 "
       "seeds and base_arg '': use another --workdir"),
      (lambda: runner.run_grid("fake", str(tmp_path / "grid"), seeds=2),
       "holds grid 'fake' with 1 seeds"),
  ]
  for call, message in cases:
    with pytest.raises(runner.GridError) as error:
      call()
    assert message in str(error.value) and "\n" not in str(error.value)
  monkeypatch.setitem(grids.GRIDS, "fake", {**FAKE_GRID, "schedule": {"total_steps": 9}})
  with pytest.raises(runner.GridError, match=r"as it was defined before \(configs/grids.py "
                     r"changed its schedule\)"):
    runner.run_grid("fake", str(tmp_path / "grid"), seeds=1)


def test_the_command_line_fails_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "cots_jax.experiments", "walk", f"--workdir={tmp_path}"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=subprocess_env(),
      capture_output=True, text=True, check=False)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.splitlines()[-1] == (
      "cots_jax.experiments: give one action, run or report; got 'walk'")


# ------------------------------------------------------------------------------------ report


def _write_run(path, rng, amf_enabled, momentum, steps, wall):
  """A finished fake run dir: final_eval.json, experiment.json, config.json, metrics.jsonl (AMF
  metrics at `steps`, the first step logged twice, the later record winning)."""
  path.mkdir(parents=True)
  final = {f"eval/retrieval/{key}": float(rng.uniform(0, 100)) for key in RETRIEVAL_KEYS}
  if momentum:
    final["eval/retrieval_momentum/rsum"] = float(rng.uniform(0, 600))
  (path / "final_eval.json").write_text(json.dumps(final))
  (path / "experiment.json").write_text(json.dumps({"wall_seconds": wall}))
  (path / "config.json").write_text(json.dumps(
      {"total_steps": 20, "amf": {"enabled": amf_enabled, "warmup_steps": 0.2}}))
  nf = rng.choice([0.0, 0.125, 0.25, 0.5], size=len(steps))
  kn, kc = rng.uniform(0, 1, size=len(steps)), rng.uniform(0.5, 1, size=len(steps))
  kn[nf == 0] = 1.0  # as the step logs a batch without injected pairs
  records = [{"step": int(steps[0]), "train/amf_kept_noisy": 0.5, "train/amf_kept_clean": 0.5,
              "train/noisy_fraction": 0.5}]  # replaced by the resumed run's record below
  records += [{"step": int(s), "train/loss": 1.0, "train/amf_kept_noisy": float(n),
               "train/amf_kept_clean": float(c), "train/noisy_fraction": float(f)}
              for s, n, c, f in zip(steps, kn, kc, nf)]
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return final, (nf, kn, kc)


def _reference_catch(nf, kn, kc, steps):
  """What the report defines, in numpy: over the steps after the warm-up (4 of 20)."""
  active = steps > 4
  nf, kn, kc = nf[active], kn[active], kc[active]
  noisy, clean = nf > 0, nf < 1
  dropped_noisy = np.sum(nf[noisy] * (1 - kn[noisy]))
  dropped_clean = np.sum((1 - nf[clean]) * (1 - kc[clean]))
  return {"kept noisy": np.mean(kn[noisy]), "kept clean": np.mean(kc[clean]),
          "recall": 1 - np.mean(kn[noisy]),
          "precision": dropped_noisy / (dropped_noisy + dropped_clean)}


def _table(text, first_header):
  """{variant: [cells after the variant]} of the markdown table whose header starts with
  `| variant | seeds | <first_header>`."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines)
               if line.startswith(f"| variant | seeds | {first_header} |"))
  rows = {}
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    rows[cells[0].strip("`")] = cells[1:]
  return rows


def _cell(text):
  """"m ± s" -> (m, s); "m" -> (m, None); "-" -> None."""
  if text == "-":
    return None
  mean, _, std = text.partition(" ± ")
  return float(mean), float(std) if std else None


def _assert_cell(text, values, digits):
  tolerance = 0.51 * 10**-digits
  mean, std = _cell(text)
  assert mean == pytest.approx(np.mean(values), abs=tolerance)
  if len(values) == 1:
    assert std is None
  else:
    assert std == pytest.approx(np.std(values, ddof=1), abs=tolerance)


def test_report_means_stds_and_amf_catch_match_numpy(tmp_path):
  rng = np.random.default_rng(0)
  steps = np.arange(2, 21, 2)
  variants = {"amf": (True, True, 3), "noamf": (False, False, 3), "one": (True, True, 1),
              "none": (True, True, 0)}  # amf enabled, momentum, finished seeds (of 3)
  definition = {"base": "configs/pretrain.py:runlocal", "schedule": {"total_steps": 20},
                "variants": {name: {"overrides": {}} for name in variants}}
  (tmp_path / "grid.json").write_text(json.dumps(
      {"grid": "made_up", "seeds": 3, "base_arg": "", "definition": definition}))
  finals, catches, walls = {}, {}, {}
  for name, (amf_enabled, momentum, finished) in variants.items():
    finals[name], catches[name], walls[name] = [], [], []
    for seed in range(finished):
      walls[name].append(60.0 * seed + 5.0)
      final, series = _write_run(tmp_path / name / f"seed_{seed}", rng, amf_enabled, momentum,
                                 steps, walls[name][-1])
      finals[name].append(final)
      catches[name].append(_reference_catch(*series, steps))
  (tmp_path / "none" / "seed_1" / "checkpoints" / "8").mkdir(parents=True)  # unfinished

  text = pathlib.Path(grid_report.write_report(str(tmp_path))).read_text()
  assert "mean ± sample standard deviation (ddof=1)" in text and "`made_up`" in text
  assert "a std needs 2+ seeds" in text
  assert "python -m cots_jax.experiments run --grid=made_up" in text
  table = _table(text, "i2t R@1")
  assert list(table) == list(variants)
  for name in ["amf", "noamf", "one"]:
    cells = table[name]
    assert cells[0] == str(len(finals[name]))
    for cell, key in zip(cells[1:8], RETRIEVAL_KEYS):
      _assert_cell(cell, [final[f"eval/retrieval/{key}"] for final in finals[name]], 2)
  _assert_cell(table["amf"][8], [f["eval/retrieval_momentum/rsum"] for f in finals["amf"]], 2)
  assert table["noamf"][8] == "-"
  assert table["amf"][9] == "1 min 5 s" and table["one"][9] == "0 min 5 s"
  assert table["none"] == ["0"] + ["-"] * 9

  amf_table = _table(text, "kept noisy")
  for name in ["amf", "one"]:
    assert amf_table[name][0] == str(len(catches[name]))
    for cell, column in zip(amf_table[name][1:], grid_report.AMF_COLUMNS):
      _assert_cell(cell, [catch[column] for catch in catches[name]], 3)
  assert amf_table["noamf"] == ["0", "-", "-", "-", "-"]

  csv_lines = (tmp_path / "amf_catch.csv").read_text().splitlines()
  assert csv_lines[0] == "variant,seed,step,kept_noisy,kept_clean,noisy_fraction,amf_active"
  assert len(csv_lines) == 1 + len(steps) * (3 + 3 + 1)
  assert csv_lines[1].startswith("amf,0,2,") and csv_lines[1].endswith(",0")
  for name in ["results.png", "amf_catch.png"]:
    with Image.open(tmp_path / name) as image:
      assert image.format == "PNG"
      image.verify()


def test_amf_catch_is_undefined_without_injected_or_dropped_pairs():
  series = lambda nf, kn, kc: grid_report.AmfSeries(  # noqa: E731
      np.arange(3), np.array(kn, float), np.array(kc, float), np.array(nf, float),
      np.ones(3, bool))
  clean_only = grid_report.amf_catch(series([0, 0, 0], [1, 1, 1], [0.5, 1, 1]))
  assert clean_only == {"kept noisy": None, "kept clean": pytest.approx(5 / 6), "recall": None,
                        "precision": 0.0}
  nothing_dropped = grid_report.amf_catch(series([0.5, 0.25, 0], [1, 1, 1], [1, 1, 1]))
  assert nothing_dropped["recall"] == 0.0 and nothing_dropped["precision"] is None
  assert grid_report.mean_std([None, None]) == "-" and grid_report.mean_std([1.0]) == "1.00"
  assert runner.format_duration(3725) == "1 h 2 min 5 s"


# ---------------------------------------------------------------------------------- smoke


@pytest.mark.slow
def test_the_smoke_grid_runs_skips_when_done_and_reports(tmp_path):
  workdir = tmp_path / "smoke"
  args = ["run", "--grid=smoke", f"--workdir={workdir}", "--seeds=1"]
  result = run_module("cots_jax.experiments", *args)
  assert f"[vq] smoke: training the shared VQ tokenizer in {workdir}/_vq" in result.stdout
  assert "[1/2] smoke/itc seed 0: starting" in result.stdout
  assert re.search(r"\[2/2\] smoke/full_noise seed 0: starting, ETA (\d+ h )?\d+ min \d+ s",
                   result.stdout)
  finals = [workdir / variant / "seed_0" / "final_eval.json" for variant in ("itc", "full_noise")]
  mtimes = [path.stat().st_mtime_ns for path in finals]
  assert "eval/retrieval/rsum" in json.loads(finals[1].read_text())
  assert f"--config.vq.init={workdir}/_vq" in _record(workdir / "full_noise" / "seed_0")["command"]

  again = run_module("cots_jax.experiments", *args).stdout
  assert f"[vq] smoke: shared VQ tokenizer in {workdir}/_vq: trained, skipped" in again
  assert "[1/2] smoke/itc seed 0: finished, skipped" in again
  assert "[2/2] smoke/full_noise seed 0: finished, skipped" in again
  assert [path.stat().st_mtime_ns for path in finals] == mtimes
  assert _record(workdir / "itc" / "seed_0")["invocations"] == 1

  run_module("cots_jax.experiments", "report", f"--workdir={workdir}")
  table = _table((workdir / "results.md").read_text(), "i2t R@1")
  assert list(table) == ["itc", "full_noise"]
  assert table["itc"][0] == table["full_noise"][0] == "1"
  assert _cell(table["full_noise"][7])[0] == pytest.approx(
      json.loads(finals[1].read_text())["eval/retrieval/rsum"], abs=0.006)
  with Image.open(workdir / "results.png") as image:
    assert image.format == "PNG"
  # The noisy run lists its 50 replaced pairs (a quarter of 40 images x 5 captions) and logs
  # what AMF kept of them, which the report tabulates.
  replaced = json.loads((workdir / "full_noise" / "seed_0" / "caption_noise.json").read_text())
  assert len(replaced["replaced"]) == 50 and replaced["caption_noise"] == 0.25
  amf_rows = _table((workdir / "results.md").read_text(), "kept noisy")
  assert amf_rows["full_noise"][0] == "1" and amf_rows["itc"][0] == "0"
  assert (workdir / "amf_catch.csv").read_text().count("\nfull_noise,0,") == 2  # log_every 2
