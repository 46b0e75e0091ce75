"""Checkpoint size and save time of the real train state (issue: checkpoints, design §7).

  python -m cots_jax.benchmarks.checkpoint_save --config=configs/pretrain.py --out=ckpt.json
  python -m cots_jax.benchmarks.checkpoint_save --config=configs/pretrain.py:model=base

Builds the state of CONFIG on this process's devices (an untrained VQ tokenizer of the
configured shape), fills its float leaves with random values (a fresh state's zero Adam moments
and queues would compress to almost nothing and flatter the size on disk), then saves it
`--saves` times through the trainer's own `checkpoint.save_checkpoint` into a temporary
directory. Prints and writes as JSON: the state's
bytes, the bytes of one checkpoint on disk, how long each save blocks the caller (the device to
host copy; the step loop waits this long) and how long until it is written (the async part).
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from cots_jax import benchmarks
from cots_jax import checkpoint
from cots_jax import state as state_lib
from cots_jax.data import pipeline



def directory_bytes(path):
  """Total size of the files under `path`."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def randomized(state, shardings):
  """`state` with every floating-point leaf replaced by standard-normal values, same shardings.

  Drawn on the host with numpy, leaf by leaf: one jitted fill of a few hundred leaves compiles
  for minutes on a CPU.
  """
  rng = np.random.default_rng(0)

  def fill(leaf, leaf_sharding):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    values = rng.standard_normal(leaf.shape, dtype=np.float32).astype(leaf.dtype)
    return jax.make_array_from_callback(leaf.shape, leaf_sharding, lambda index: values[index])

  return jax.tree.map(fill, state, shardings)


def benchmark(config, saves, workdir):
  """Saves the state of `config` `saves` times as checkpoints of `workdir`; returns the results."""
  built = state_lib.build(config, state_lib.make_mesh(config))
  config = built.config
  state = jax.block_until_ready(randomized(built.initial_state(), built.shardings))
  train_iter = pipeline.make_train_iterator(config)
  config.keep_checkpoints = saves
  manager = checkpoint.checkpoint_manager(workdir, config)
  blocked, written = [], []
  for step in range(1, saves + 1):
    start = time.perf_counter()
    checkpoint.save_checkpoint(manager, step, state, train_iter)
    blocked.append(time.perf_counter() - start)
    manager.wait_until_finished()
    written.append(time.perf_counter() - start)
  checkpoint.finish(manager)
  on_disk = directory_bytes(os.path.join(workdir, "checkpoints", str(saves)))
  return {
      "device": str(jax.devices()[0].device_kind),
      "num_devices": jax.device_count(),
      "state_bytes": checkpoint.state_bytes(built.abstract),
      "checkpoint_bytes_on_disk": on_disk,
      "first_save_blocked_seconds": blocked[0],
      "save_blocked_seconds_median": float(np.median(blocked[1:] or blocked)),
      "save_written_seconds_median": float(np.median(written[1:] or written)),
      "blocked_seconds": blocked,
      "written_seconds": written,
  }


def define_flags():
  """The command-line flags. Defined only when this module runs as a program: absl flags are
  global, and the other benchmarks define `--config` too."""
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  flags.DEFINE_string("out", None, "Where to write the JSON results.")
  flags.DEFINE_integer("saves", 3, "Saves to time (the first one also compiles the finiteness "
                       "check and is reported apart).")
  flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  args = flags.FLAGS
  with tempfile.TemporaryDirectory() as workdir:
    results = benchmark(args.config, args.saves, workdir)
  print(json.dumps(results, indent=2))
  benchmarks.write_results(results, args.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
