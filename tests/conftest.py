"""Test set-up shared by the suite: CPU only, a persistent compilation cache, quiet logs.

Multi-device cases run in subprocesses with their own XLA_FLAGS (design §8.10), so the main
test process keeps the machine's single CPU device.
"""

import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  (the environment above must be set first)

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("COTS_TEST_JAX_CACHE",
                   os.path.join(tempfile.gettempdir(), "cots_jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from cots_jax import export  # noqa: E402
from cots_jax import inference  # noqa: E402
from cots_jax import train  # noqa: E402
from support import tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """A finished in-process run of the tiny config (ITC + KL, synthetic data, 12 steps) with a
  checkpoint at steps 6 and 12: its workdir, shared by the eval-only, search and report tests."""
  workdir = str(tmp_path_factory.mktemp("trained_run"))
  train.train_and_evaluate(
      tiny_config(**{"loss.mvm": 0.0, "loss.mlm": 0.0, "total_steps": 12, "checkpoint_every": 6,
                     "log_every": 3}), workdir)
  return workdir


@pytest.fixture(scope="session")
def exported_run(trained_run, tmp_path_factory):
  """The export (cots_jax.export) of the online encoder of `trained_run`'s last checkpoint: its
  folder, shared by the export and search tests."""
  out = tmp_path_factory.mktemp("exported_run")
  export.export_run(inference.TrainedRun.load(trained_run), trained_run, out)
  return out
