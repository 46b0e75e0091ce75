"""The multi-process flags and start-up shared by the entries that run on every host of a job
(`cots_jax.main`, `cots_jax.evaluate`): one process per host (TPU pod worker, SLURM task)."""

from absl import app
from absl import flags
from absl import logging
import jax

_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Start jax.distributed with the cluster auto-detected (every worker of a "
    "TPU pod slice, SLURM tasks); implied by --coordinator_address / --num_processes.")


def initialize(argv):
  """Refuses stray command-line arguments (`argv` of absl's app.run), starts jax.distributed
  when the flags ask for several processes, then logs the devices."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _MULTIHOST.value or _COORDINATOR.value or (_NUM_PROCESSES.value or 1) > 1:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("JAX process %d / %d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
