"""Entry point: `python -m cots_jax.main --config=configs/pretrain.py --workdir=DIR`.

Parses flags, starts jax.distributed for multi-process runs (cots_jax/distributed.py), sends the
libraries' INFO logs to DIR/log.txt (the terminal keeps the progress bar, eval lines, warnings
and errors; cots_jax/logs.py), then hands over to the trainer named by `config.trainer` (`cots`:
train.train_and_evaluate; `vq`: the VQ tokenizer).
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from cots_jax import distributed
from cots_jax import logs
from cots_jax import train
from cots_jax import vq_trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  logs.quiet_terminal()
  distributed.initialize(argv)
  config = _CONFIG.value
  workdir = os.path.expanduser(_WORKDIR.value)
  logs.log_to_file(logs.workdir_log(workdir))
  if config.trainer == "vq":
    vq_trainer.train_and_save(config, workdir)
  else:
    train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  app.run(main)
