"""Eval only: `python -m cots_jax.evaluate --config=configs/X.py[:arg] --workdir=DIR [--step=N]`.

Loads checkpoint N (default the latest) of DIR, runs the config's retrieval evaluator on its eval
split with the online (`retrieval`) and momentum (`retrieval_momentum`) encoders, prints a table
of R@1/5/10 both ways, rsum and median ranks, and writes DIR/eval_results.json as
`{"<evaluator>": {"<metric>": value}}` (metric names of design §4.1). Run it on every host of a
multi-host job like cots_jax.main: each host embeds its share, all get the whole set's metrics.
The work is done by cots_jax/inference.py (`evaluate_checkpoint`), which tests call directly.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
from ml_collections import config_flags

from cots_jax import distributed
from cots_jax import inference
from cots_jax import logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the run to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest complete one.")
flags.mark_flags_as_required(["config", "workdir"])

RESULTS_FILE = "eval_results.json"


def main(argv):
  logs.quiet_terminal()
  distributed.initialize(argv)
  config = _CONFIG.value
  workdir = os.path.expanduser(_WORKDIR.value)
  logs.log_to_file(logs.workdir_log(workdir))  # appended to the run's log
  results, step = inference.evaluate_checkpoint(config, workdir, _STEP.value)
  if jax.process_index() == 0:
    path = epath.Path(workdir) / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2))
    print(f"checkpoint {step} of {workdir}, eval split "
          f"{config.input.data.name}:{config.input.data.eval_split}\n"
          f"{inference.results_table(results, tuple(config.eval.ks))}\nwritten to {path}")
  logging.info("eval results of step %d: %s", step, results)


if __name__ == "__main__":
  app.run(main)
