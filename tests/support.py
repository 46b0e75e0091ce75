"""Shared by the tests: the tiny run config, a built update step, and the environment of the
children that start `cots_jax.main` or use several (fake) devices."""

import dataclasses
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import pretrain
from cots_jax import state as state_lib
from cots_jax import step as step_lib
from cots_jax import vq_trainer
from cots_jax.data import pipeline

# An absl INFO line ("I1207 06:32:06.560879 140688107305856 checkpoint_manager.py:1527] ..."),
# also where it follows a progress bar's carriage return on the same line.
ABSL_INFO = re.compile(r"I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.]+\.py:\d+\]")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `configs/pretrain.py:runlocal` shrunk to compile in seconds (set as --config.<name>=<value>).
TINY = {
    "model.embed_dim": 16, "model.image.image_size": 24, "model.image.patch_size": 8,
    "model.image.width": 32, "model.image.depth": 1, "model.text.width": 32,
    "model.text.depth": 1, "vq.codebook_size": 16, "vq.hidden": 16, "input.batch_size": 8,
    "queue.size": 32, "input.mvm_min_block": 2, "input.data.num_train_images": 40,
    "input.data.num_eval_images": 20, "total_steps": 20, "optim.warmup_steps": 2,
    "log_every": 1, "checkpoint_every": 4,
}


def tiny_config(config=None, **overrides):
  """`config` (default `configs/pretrain.py:runlocal`) with TINY and `overrides` (dotted names)
  applied."""
  config = config or pretrain.get_config("runlocal")
  config.update_from_flattened_dict({**TINY, **overrides})
  return config


def build(config):
  """(state, update fn before jit, first 3 training batches) for `config` on this process's
  devices, built as a run builds it (`state.build`), with a random VQ tokenizer."""
  built = state_lib.build(config, state_lib.make_mesh(config),
                          vq_trainer.random_tokenizer(config, jax.random.PRNGKey(1)))
  iterator = pipeline.make_train_iterator(built.config)
  batches = [next(iterator) for _ in range(3)]
  return (built.initial_state(), step_lib.make_update_fn(built.config, built.model,
                                                          built.optimizer), batches)


def write_video(path, frames):
  """Encodes uint8 [n, H, W, 3] RGB frames as H.264 (yuv420p, 12 fps) into `path`'s container
  (PyAV, the optional `video` extra, imported here only; the suffix picks the container)."""
  import av  # pylint: disable=g-import-not-at-top
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=12)
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode(None))


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What `jax.make_mesh` reads of a device, for meshes larger than this process's one CPU."""
  id: int
  platform: str = "cpu"
  device_kind: str = "cpu"
  coords: tuple = (0, 0, 0)
  core_on_chip: int = 0
  process_index: int = 0


def fake_cpus(count):
  """`count` FakeDevices, ids 0..count-1."""
  return [FakeDevice(i) for i in range(count)]


def flat(tree):
  """{"a/b": numpy array} of a pytree (arrays fetched to the host)."""
  return {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def tiny_flags(**overrides):
  """TINY and `overrides` as `--config.<name>=<value>` command-line flags."""
  return [f"--config.{name}={value}" for name, value in {**TINY, **overrides}.items()]


def subprocess_env(devices=None):
  """This environment for a child: CPU, the suite's compilation cache, `devices` fake devices
  (None: the machine's one, exactly like this process, so compiled steps are shared)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
             PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env



def free_port():
  """A TCP port on 127.0.0.1 that nothing listens on now (for a jax.distributed coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def run_module(module, *args, cwd=REPO, env=None, timeout=600):
  """`python -m MODULE ARGS` in a child (the suite's launcher of every entry), with this
  environment for children (`subprocess_env()` unless `env`); fails the test, showing the end of
  its stderr, when it exits with an error.

  Returns:
    The CompletedProcess, stdout and stderr as text.
  """
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                          env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
  assert result.returncode == 0, f"python -m {module} {' '.join(args)}\n{result.stderr[-4000:]}"
  return result


def start_module(module, log_path, *args, devices=None):
  """`python -m MODULE ARGS` started in a child with `devices` fake devices (None: this
  process's one), its output appended to `log_path`; returns the Popen."""
  with open(log_path, "a", encoding="utf-8") as log:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO,
                            env=subprocess_env(devices), stdout=log, stderr=subprocess.STDOUT)


def start_main(workdir, log_path, *flags, devices=None):
  """`python -m cots_jax.main --config=configs/pretrain.py:runlocal --workdir=WORKDIR FLAGS`
  started as `start_module` does."""
  return start_module("cots_jax.main", log_path, "--config=configs/pretrain.py:runlocal",
                      f"--workdir={workdir}", *flags, devices=devices)


def missing_requirement(message):
  """Skips the test for lack of `message`'s data, or fails it under COTS_REQUIRE_SHARED_DATA=1
  (CI sets it: there, missing data is a failure, never a silent skip)."""
  if os.environ.get("COTS_REQUIRE_SHARED_DATA") == "1":
    pytest.fail(f"COTS_REQUIRE_SHARED_DATA=1 but {message}")
  pytest.skip(message)


def shared_dataset_dir(name):
  """$COTS_DATA_DIR/NAME (default ../shared/data/NAME beside the repo); `missing_requirement`
  when it is absent."""
  path = os.path.join(os.environ.get("COTS_DATA_DIR") or os.path.join(REPO, "..", "shared", "data"),
                      name)
  if not os.path.isdir(path):
    missing_requirement(f"{path} is missing")
  return path
