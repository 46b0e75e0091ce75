"""`python -m cots_jax.experiments run|report ...`: the command line of cots_jax/experiments/."""

import os
import shlex
import sys

from absl import app
from absl import flags

from configs import grids
from cots_jax.experiments import report
from cots_jax.experiments import runner

_GRID = flags.DEFINE_string("grid", None, "run: the grid of configs/grids.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the grid's runs and report.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "run: seeds 0..N-1 of every variant.")
_BASE_ARG = flags.DEFINE_string("base_arg", "", "run: config arg appended to every run's "
                                "(e.g. model=base).")
_ONLY = flags.DEFINE_list("only", [], "run: these variants only (default all).")

# The action, the first argument: what it does.
COMMANDS = {"run": "runs every unfinished (variant, seed) of --grid in --workdir",
            "report": "writes the tables and charts of --workdir's finished runs"}


def main(argv):
  try:
    if len(argv) != 2 or argv[1] not in COMMANDS:
      raise runner.GridError(f"give one action, {' or '.join(COMMANDS)}; got "
                             f"{shlex.join(argv[1:])!r}")
    if not _WORKDIR.value:
      raise runner.GridError("--workdir is required")
    workdir = os.path.expanduser(_WORKDIR.value)
    if argv[1] == "report":
      print(f"report written to {report.write_report(workdir)}")
    elif _GRID.value is None:
      raise runner.GridError(f"run needs --grid; the grids are {', '.join(grids.GRIDS)}")
    else:
      runner.run_grid(_GRID.value, workdir, _SEEDS.value, _BASE_ARG.value, _ONLY.value)
  except runner.GridError as error:
    sys.exit(f"cots_jax.experiments: {error}")


if __name__ == "__main__":
  app.run(main)
