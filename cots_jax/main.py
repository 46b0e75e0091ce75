"""Entry point: `python -m cots_jax.main --config=configs/pretrain.py --workdir=DIR`.

Parses flags, starts jax.distributed for multi-process runs, then hands over to the trainer
named by `config.trainer` (`cots`: train.train_and_evaluate; `vq`: the VQ tokenizer).
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from cots_jax import train
from cots_jax import vq_trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Start jax.distributed with the cluster auto-detected (every worker of a "
    "TPU pod slice, SLURM tasks); implied by --coordinator_address / --num_processes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _MULTIHOST.value or _COORDINATOR.value or (_NUM_PROCESSES.value or 1) > 1:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("JAX process %d / %d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  config = _CONFIG.value
  workdir = os.path.expanduser(_WORKDIR.value)
  if config.trainer == "vq":
    vq_trainer.train_and_save(config, workdir)
  else:
    train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  app.run(main)
