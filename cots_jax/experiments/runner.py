"""Running a grid (configs/grids.py): one `cots_jax.main` child per (variant, seed).

Runs go to WORKDIR/<variant>/seed_<s>, seed-major (every variant's seed 0 first), after one shared
VQ tokenizer in WORKDIR/_vq for grids that ask for it. A run that holds final_eval.json is
finished and skipped; an unfinished one is started again with the same command, and
cots_jax.main resumes it from its latest checkpoint, so a grid may take several invocations.
Each run dir gets experiment.json (command, grid, variant, seed, wall seconds summed over
invocations). A child that fails stops the grid; Ctrl-C or SIGTERM sends the child SIGTERM (it
saves a checkpoint) and waits for it. WORKDIR/grid.json pins the grid, its definition, the seed
count and base_arg: runs are never mixed.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from configs import grids
from cots_jax import paths
from cots_jax import vq_trainer

GRID_FILE = "grid.json"
RUN_FILE = "experiment.json"
VQ_DIR = "_vq"


class GridError(Exception):
  """What stops `run` or `report`, said in one line."""


# ---------------------------------------------------------------------------------- commands


def get_grid(name):
  """The grid `name` of configs/grids.py (dict, see its docstring); GridError naming the grids."""
  if name not in grids.GRIDS:
    raise GridError(f"unknown grid {name!r}; the grids are {', '.join(grids.GRIDS)}")
  return grids.GRIDS[name]


def select_variants(name, grid, only=()):
  """The variants of `grid` named in `only` (all when empty), in grid order -> [str]."""
  unknown = [variant for variant in only if variant not in grid["variants"]]
  if unknown:
    raise GridError(f"grid {name!r} has no variant {', '.join(map(repr, unknown))}; its variants "
                    f"are {', '.join(grid['variants'])}")
  return [variant for variant in grid["variants"] if not only or variant in only]


def join_config(base, *args):
  """`configs/x.py[:arg]` with the non-empty `args` appended, comma-separated ->
  `configs/x.py:arg,a,b` (`:` added when the base has no arg)."""
  args = [arg for arg in args if arg]
  if not args:
    return base
  return f"{base}{',' if ':' in base else ':'}{','.join(args)}"


def config_flags(overrides):
  """{dotted field: value} -> ["--config.<field>=<value>", ...]."""
  return [f"--config.{name}={value}" for name, value in overrides.items()]


def run_dir(workdir, variant, seed):
  """WORKDIR/<variant>/seed_<seed>, the workdir of one run."""
  return os.path.join(workdir, variant, f"seed_{seed}")


def run_command(grid, variant, seed, workdir, base_arg=""):
  """The `cots_jax.main` command line [str] of run (variant, seed) of `grid` under `workdir`:
  the same on every invocation, so an unfinished run resumes from its checkpoint."""
  spec = grid["variants"][variant]
  command = [sys.executable, "-m", "cots_jax.main",
             f"--config={join_config(grid['base'], spec.get('arg', ''), base_arg)}",
             f"--workdir={run_dir(workdir, variant, seed)}", f"--config.seed={seed}",
             *config_flags(grid["schedule"]), *config_flags(spec["overrides"])]
  if grid.get("shared_vq"):
    command.append(f"--config.vq.init={os.path.join(workdir, VQ_DIR)}")
  return command


def vq_command(grid, workdir, base_arg=""):
  """The `cots_jax.main` command line [str] that trains `grid`'s shared VQ tokenizer in
  WORKDIR/_vq (the base config's image and tokenizer sizes; no variant changes them)."""
  return [sys.executable, "-m", "cots_jax.main",
          f"--config={join_config(grid['base'], base_arg)}",
          f"--workdir={os.path.join(workdir, VQ_DIR)}", "--config.trainer=vq",
          *config_flags(grid["schedule"])]


# --------------------------------------------------------------------------------------- run


def latest_checkpoint(path):
  """The latest complete checkpoint step of run dir `path` (int), or None. Orbax names a
  complete one by its step and an unfinished save `<step>.orbax-checkpoint-tmp*`."""
  directory = os.path.join(path, "checkpoints")
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()] if os.path.isdir(
      directory) else []
  return max(steps, default=None)


def is_finished(path):
  """Whether run dir `path` holds its final eval."""
  return os.path.exists(os.path.join(path, paths.FINAL_EVAL_FILE))


def run_status(path):
  """What the next invocation does with run dir `path`: "finished, skipped", "resuming from
  step N" or "starting"."""
  if is_finished(path):
    return "finished, skipped"
  step = latest_checkpoint(path)
  return "starting" if step is None else f"resuming from step {step}"


def format_duration(seconds):
  """Seconds -> "12 min 5 s" ("1 h 2 min 3 s" from an hour on)."""
  hours, rest = divmod(round(seconds), 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours} h {minutes} min {seconds} s" if hours else f"{minutes} min {seconds} s"


def _write_json(path, data):
  """Writes `data` to `path` through a staged file, so a reader never sees half of it."""
  staged = f"{path}.tmp"
  with open(staged, "w", encoding="utf-8") as file:
    json.dump(data, file, indent=2)
  os.replace(staged, path)


def read_json(path):
  """The JSON document at `path`."""
  with open(path, encoding="utf-8") as file:
    return json.load(file)


def claim_workdir(workdir, name, grid, seeds, base_arg):
  """Writes WORKDIR/grid.json for this grid, or checks that the one there is the same (grid,
  definition, seed count, base_arg), so that no two grids' runs mix in one workdir."""
  wanted = {"grid": name, "seeds": seeds, "base_arg": base_arg,
            "definition": json.loads(json.dumps(grid))}  # tuples as JSON reads them back
  path = os.path.join(workdir, GRID_FILE)
  if not os.path.exists(path):
    os.makedirs(workdir, exist_ok=True)
    _write_json(path, wanted)
    return
  held = read_json(path)
  if any(held[key] != wanted[key] for key in ("grid", "seeds", "base_arg")):
    raise GridError(f"{workdir} holds grid {held['grid']!r} with {held['seeds']} seeds and "
                    f"base_arg {held['base_arg']!r}, not grid {name!r} with {seeds} seeds and "
                    f"base_arg {base_arg!r}: use another --workdir")
  changed = [key for key in sorted(set(held["definition"]) | set(wanted["definition"]))
             if held["definition"].get(key) != wanted["definition"].get(key)]
  if changed:
    raise GridError(f"{workdir} holds runs of grid {name!r} as it was defined before "
                    f"(configs/grids.py changed its {', '.join(changed)}): use another --workdir")


def run_child(command, path, fields):
  """Runs `command` in the foreground and adds its wall time to PATH/experiment.json (with
  `fields`, the command and the number of invocations), also when it fails or is interrupted.

  The child gets its own process group, so a Ctrl-C at the terminal reaches this process only,
  which then sends the child SIGTERM: cots_jax.main saves a checkpoint at the next step and stops.
  A second interrupt while it saves kills it.

  Returns:
    (exit status, wall seconds of all invocations).

  Raises:
    GridError when this process is interrupted (KeyboardInterrupt), after the child stopped.
  """
  os.makedirs(path, exist_ok=True)
  record_path = os.path.join(path, RUN_FILE)
  record = read_json(record_path) if os.path.exists(record_path) else {}
  start = time.monotonic()
  child = None
  try:
    child = subprocess.Popen(command, process_group=0)
    status = child.wait()
  except KeyboardInterrupt:
    if child is not None:
      _stop(child)
    outcome = "not started" if child is None else f"exit status {child.returncode}"
    raise GridError(f"interrupted: the child in {path} stopped ({outcome}); run the same command "
                    "again to resume from its last checkpoint") from None
  finally:
    wall = record.get("wall_seconds", 0.0) + time.monotonic() - start
    _write_json(record_path, {**fields, "command": command, "wall_seconds": wall,
                              "invocations": record.get("invocations", 0) + 1})
  return status, wall


def _stop(child):
  """Sends `child` SIGTERM and waits for it to save and exit; kills it on a second interrupt."""
  child.send_signal(signal.SIGTERM)
  try:
    child.wait()
  except KeyboardInterrupt:
    child.kill()
    child.wait()


@contextlib.contextmanager
def _terminate_as_interrupt():
  """SIGTERM and SIGHUP raise KeyboardInterrupt inside the block, as Ctrl-C does, so that one
  handler forwards all three to the child."""
  previous = {sig: signal.signal(sig, signal.default_int_handler)
              for sig in (signal.SIGTERM, signal.SIGHUP)}
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def train_shared_vq(name, grid, workdir, base_arg=""):
  """Trains `grid`'s VQ tokenizer in WORKDIR/_vq, unless a trained one is there."""
  path = os.path.join(workdir, VQ_DIR)
  if vq_trainer.find_tokenizer_dir(path) is not None:
    print(f"[vq] {name}: shared VQ tokenizer in {path}: trained, skipped", flush=True)
    return
  print(f"[vq] {name}: training the shared VQ tokenizer in {path}", flush=True)
  status, _ = run_child(vq_command(grid, workdir, base_arg), path, {"grid": name, "variant": None,
                                                                   "seed": None})
  if status != 0:
    raise GridError(f"{path}: the VQ tokenizer's cots_jax.main exited with status {status}")


def run_grid(name, workdir, seeds=3, base_arg="", only=()):
  """Runs every unfinished (variant, seed) of grid `name` in `workdir`, one child at a time.

  Args:
    name: a grid of configs/grids.py.
    workdir: the grid's directory (made absolute: the commands name it).
    seeds: runs seeds 0..seeds-1 of each variant.
    base_arg: a config arg appended to every run's (e.g. "model=base").
    only: variant names to run (default all).

  Raises:
    GridError, in one line, for an unknown grid or variant, a workdir of another grid, a child
    that fails or stops before its final eval, or an interrupt.
  """
  grid = get_grid(name)
  variants = select_variants(name, grid, only)
  if seeds < 1:
    raise GridError(f"--seeds must be >= 1, got {seeds}")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  claim_workdir(workdir, name, grid, seeds, base_arg)
  runs = [(variant, seed) for seed in range(seeds) for variant in variants]
  walls = []  # of the runs finished by this invocation: the ETA's mean
  with _terminate_as_interrupt():
    try:
      if grid.get("shared_vq"):
        train_shared_vq(name, grid, workdir, base_arg)
      for number, (variant, seed) in enumerate(runs, 1):
        path = run_dir(workdir, variant, seed)
        line = f"[{number}/{len(runs)}] {name}/{variant} seed {seed}: {run_status(path)}"
        if walls:
          left = sum(not is_finished(run_dir(workdir, *run)) for run in runs[number - 1:])
          line += f", ETA {format_duration(np.mean(walls) * left)}"
        print(line, flush=True)
        if is_finished(path):
          continue
        status, wall = run_child(run_command(grid, variant, seed, workdir, base_arg), path,
                                 {"grid": name, "variant": variant, "seed": seed})
        if status != 0:
          raise GridError(f"{path}: cots_jax.main exited with status {status}; the grid stops "
                          "here")
        if not is_finished(path):
          raise GridError(f"{path}: cots_jax.main stopped before its final eval (SIGTERM?); run "
                          "the same command again to resume it")
        walls.append(wall)
    except KeyboardInterrupt:
      raise GridError("interrupted between runs; run the same command again to go on") from None
  print(f"grid {name}: {len(runs)} runs finished in {workdir}; "
        f"python -m cots_jax.experiments report --workdir={workdir}", flush=True)
