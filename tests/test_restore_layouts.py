"""Every restore places arrays by the current mesh, whatever number of processes saved them
(design §9.1; `checkpoint.restore_tree`).

One multi-process run per direction, on loopback:
  1 -> 2  a VQ tokenizer saved by this process and a finished 1-process run are given to a run of
          two processes (2 fake CPU devices each, parameters FSDP-sharded over all 4) as
          `config.vq.init` and `config.init_from`;
  2 -> 1  that run's checkpoint (each process wrote its own shards) is loaded for inference in
          this process and resumed here with more steps; the resume says in one line that the
          data position of 2 processes is not carried over and that the data stream restarts.
The rest (replicated targets, mis-shaped targets) runs in this process.

Arrays on disk are read as plain numpy (`read_numpy`: no target, no sharding) to compare with,
so the expected values never come from the restore under test.
"""

import functools
import logging
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cots_jax import checkpoint
from cots_jax import inference
from cots_jax import sharding
from cots_jax import state as state_lib
from cots_jax import train
from cots_jax import vq_trainer
from cots_jax.metrics_writer import read_metrics
from support import flat, free_port, start_module, tiny_config, tiny_flags

# Multi-process runs of the trainer: minutes each (`-m "not slow"` leaves them out).
pytestmark = pytest.mark.slow

TIMEOUT = 400
# The 1-process run and the 1-process resume share every setting that reaches the compiled step
# (total_steps included), so the resume compiles from the persistent cache.
ONE = {"loss.mvm": 0.1, "total_steps": 6, "checkpoint_every": 0}
TWO_STEPS = 3


def read_numpy(item):
  """{"a/b": numpy array} of the Orbax item at `item`, read whole into host memory, with no
  target and no sharding (independent of `restore_tree`)."""
  metadata = checkpoint.saved_tree(item)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  return flat(ocp.PyTreeCheckpointer().restore(
      item, args=ocp.args.PyTreeRestore(restore_args=restore_args)))


def state_item(workdir, step):
  return os.path.join(workdir, "checkpoints", str(step), "state")


def subtree(values, prefix):
  """The entries of `values` under `prefix/`, keyed by the rest of their path."""
  return {key[len(prefix) + 1:]: value for key, value in values.items()
          if key.startswith(prefix + "/")}


def assert_equal_trees(got, expected, what):
  assert sorted(got) == sorted(expected) and got, what
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{what}: {key}")


def read_text(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def wait_for_all(children, logs):
  """Waits for every child to exit with 0; fails at once with the log of the first one that
  fails or raises (its peer would wait minutes in jax.distributed's shutdown barrier)."""
  deadline = time.monotonic() + TIMEOUT
  while any(child.poll() is None for child in children):
    for child, log_path in zip(children, logs):
      if child.poll() not in (None, 0) or "Traceback (most recent" in read_text(log_path):
        raise AssertionError(f"{log_path}:\n{read_text(log_path)[-4000:]}")
    assert time.monotonic() < deadline, f"still running after {TIMEOUT} s"
    time.sleep(0.5)
  for child, log_path in zip(children, logs):
    assert child.returncode == 0, read_text(log_path)[-4000:]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  """An untrained tokenizer of the tiny shape saved by this (1-device) process, of a key that no
  run draws (so a run that ignores it holds other values): (directory, {path: values})."""
  directory = str(tmp_path_factory.mktemp("tokenizer"))
  config = tiny_config()
  params = vq_trainer.random_tokenizer(config, jax.random.PRNGKey(7))["params"]
  vq_trainer.save_tokenizer(directory, params, config)
  return directory, flat(params)


@pytest.fixture(scope="module")
def run_of_one(tmp_path_factory, tokenizer):
  """A finished in-process run of this 1-device process (ITC + KL + MLM + MVM with `tokenizer`):
  (workdir, {path: values} of its final train state)."""
  workdir = str(tmp_path_factory.mktemp("one"))
  train.train_and_evaluate(tiny_config(**ONE, **{"vq.init": tokenizer[0]}), workdir)
  return workdir, read_numpy(state_item(workdir, ONE["total_steps"]))


@pytest.fixture(scope="module")
def run_of_two(tmp_path_factory, tokenizer, run_of_one):
  """`cots_jax.main` in two processes of 2 fake devices each (FSDP over the 4), started from
  `run_of_one` (init_from) with `tokenizer` (vq.init), TWO_STEPS steps with a checkpoint each:
  (workdir, [log of process 0, log of process 1])."""
  root = tmp_path_factory.mktemp("two")
  workdir = root / "run"
  # No data axis, FSDP over the 4 devices: every array of >= 64 elements is split across both
  # processes, so each writes only its own shards.
  flags = ["--config=configs/pretrain.py:runlocal", f"--workdir={workdir}",
           "--config.mesh=(('data', 1), ('fsdp', -1))",
           *tiny_flags(total_steps=TWO_STEPS, checkpoint_every=1, fsdp_min_size=64,
                       **{"loss.mvm": 0.1, "vq.init": tokenizer[0], "init_from": run_of_one[0]})]
  port, logs, children = free_port(), [root / "0.log", root / "1.log"], []
  try:
    for index, log_path in enumerate(logs):
      children.append(start_module(
          "cots_jax.main", log_path, *flags, f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2", f"--process_id={index}", devices=2))
    wait_for_all(children, logs)
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
  return str(workdir), [read_text(log_path) for log_path in logs]


def test_a_two_process_run_starts_from_a_tokenizer_and_a_run_saved_by_one_process(
    tokenizer, run_of_one, run_of_two):
  tokenizer_dir, tokenizer_values = tokenizer
  one, one_state = run_of_one
  two, terminals = run_of_two
  # The INFO records go to each process's log file in the workdir, not to the terminal.
  logs = [read_text(os.path.join(two, name)) for name in ("log.txt", "log.process_1.txt")]
  for terminal, log in zip(terminals, logs):
    assert "training a VQ tokenizer" not in terminal
    assert f"Using the VQ tokenizer of {tokenizer_dir}" in log, log[-4000:]
    assert f"Loaded params from step {ONE['total_steps']} of {one}" in log, log[-4000:]
    assert "training a VQ tokenizer" not in log
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["1", "2", "3"]
  for step in (1, TWO_STEPS):  # both processes wrote their shards of every checkpoint
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_item(two, step)))
  # The params were split over the 4 devices of both processes (so were the restored ones).
  kernel = checkpoint.saved_tree(state_item(two, TWO_STEPS))["params"]["text_proj"]["kernel"]
  assert tuple(kernel.sharding.partition_spec) == ("fsdp", None)
  assert list(kernel.sharding.shape) == [1, 4]
  first, last = read_numpy(state_item(two, 1)), read_numpy(state_item(two, TWO_STEPS))
  # The frozen tokenizer in the state is the one saved by this process, value for value.
  for state in (first, last):
    assert_equal_trees(subtree(state, "vq/params"), tokenizer_values, "vq")
  # The run started from the 1-process run's params: the learning rate of the first update is 0
  # (warm-up from 0), so after step 1 the params are still exactly those of init_from ...
  one_params = subtree(one_state, "params")
  assert_equal_trees(subtree(first, "params"), one_params, "params after step 1")
  # ... which are not a fresh initialisation (the run of one process trained them) ...
  config = tiny_config(**ONE)
  fresh = flat(state_lib.build(config, state_lib.make_mesh(config)).fresh_state()["params"])
  assert not np.array_equal(fresh["text_proj/kernel"], one_params["text_proj/kernel"])
  # ... and the later steps train them.
  assert not np.array_equal(subtree(last, "params")["text_proj/kernel"],
                            one_params["text_proj/kernel"])
  losses = {r["step"]: r["train/loss"] for r in read_metrics(two) if "train/loss" in r}
  assert sorted(losses) == list(range(1, TWO_STEPS + 1))
  assert all(np.isfinite(list(losses.values())))


def test_the_checkpoint_of_two_processes_loads_and_resumes_in_one(
    tokenizer, run_of_one, run_of_two, caplog):
  tokenizer_dir, tokenizer_values = tokenizer
  one, one_state = run_of_one
  two, _ = run_of_two
  saved = read_numpy(state_item(two, TWO_STEPS))
  # Inference: the latest checkpoint's online and momentum towers, on this process's device.
  loaded = inference.TrainedRun.load(two)
  assert loaded.step == TWO_STEPS and loaded.mesh.size == 1
  assert_equal_trees(flat(loaded.params), {key: value for key, value in saved.items()
                                           if key.split("/")[0] in ("params", "params_ema")},
                     "TrainedRun.load")
  # Checkpoint 1 holds the params of init_from (first update at learning rate 0), so it embeds
  # as the run of one process does.
  images = np.random.default_rng(0).uniform(-1, 1, (5, 24, 24, 3)).astype(np.float32)
  captions = ["a red circle", "two blue squares", "a small green triangle on the left"]
  at_1, reference = inference.TrainedRun.load(two, step=1), inference.TrainedRun.load(one)
  for embed, inputs in (("embed_images", images), ("embed_texts", captions)):
    got = getattr(at_1, embed)(inputs)
    assert got.shape == (len(inputs), 16)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got, getattr(reference, embed)(inputs), rtol=1e-5, atol=1e-6)
  # Resume in this process with more steps: the state is restored, the data stream restarts,
  # and one warning line says so.
  with caplog.at_level(logging.INFO):
    results = train.train_and_evaluate(
        tiny_config(**ONE, **{"vq.init": tokenizer_dir, "init_from": one}), two)
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
              and "data position" in r.getMessage()]
  assert warnings == [
      f"checkpoint {TWO_STEPS} holds the data position of 2 processes, this run has 1: the data "
      "stream starts again from its first example (an exact position across process counts is "
      "not built yet)"], warnings
  assert "\n" not in warnings[0]
  assert f"Resumed from step {TWO_STEPS} of" in caplog.text
  assert results and all(np.isfinite(list(results.values())))
  resumed = read_numpy(state_item(two, ONE["total_steps"]))
  assert int(resumed["step"]) == ONE["total_steps"]
  assert_equal_trees(subtree(resumed, "vq/params"), tokenizer_values, "vq after the resume")
  losses = {r["step"] for r in read_metrics(two) if "train/loss" in r}
  assert losses == set(range(1, ONE["total_steps"] + 1))


def replicated_target(values, everywhere):
  """ShapeDtypeStructs of `values` (a pytree) replicated by the sharding `everywhere`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere),
                      values)


def test_a_tokenizer_and_params_of_one_device_restore_replicated_and_refuse_other_shapes(
    tokenizer, run_of_one):
  tokenizer_dir, tokenizer_values = tokenizer
  one, one_state = run_of_one
  everywhere = sharding.replicated_everywhere()
  config = tiny_config()
  shapes = jax.eval_shape(functools.partial(vq_trainer.random_tokenizer, config),
                          jax.random.PRNGKey(0))["params"]
  item = os.path.join(tokenizer_dir, "params")
  restored = checkpoint.restore_tree(item, replicated_target(shapes, everywhere), "tokenizer")
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding == everywhere and leaf.is_fully_replicated
  assert_equal_trees(flat(restored), tokenizer_values, "restore_tree(tokenizer)")
  assert_equal_trees(flat(vq_trainer.load_tokenizer(tokenizer_dir, config)["params"]),
                     tokenizer_values, "load_tokenizer")

  built = state_lib.build(tiny_config(**ONE), state_lib.make_mesh(tiny_config(**ONE)))
  target = {"params": replicated_target(built.abstract["params"], everywhere)}
  item = state_item(one, ONE["total_steps"])
  restored = checkpoint.restore_tree(item, target, "run", partial=True)
  assert_equal_trees(flat(restored), {key: value for key, value in one_state.items()
                                      if key.startswith("params/")}, "restore_tree(params)")

  wider = dict(shapes, codebook=jax.ShapeDtypeStruct(
      (shapes["codebook"].shape[0] + 1, *shapes["codebook"].shape[1:]), np.float32,
      sharding=everywhere))
  with pytest.raises(ValueError) as error:
    checkpoint.restore_tree(os.path.join(tokenizer_dir, "params"),
                            replicated_target(wider, everywhere), "the tokenizer")
  k, c = shapes["codebook"].shape
  assert str(error.value).splitlines() == [
      "the tokenizer does not fit the configured state:",
      f"  mis-shaped: codebook is ({k}, {c}) in the checkpoint, ({k + 1}, {c}) here"]
  rows, cols = target["params"]["text_proj"]["kernel"].shape
  target["params"]["text_proj"]["kernel"] = jax.ShapeDtypeStruct((rows, cols + 1), np.float32,
                                                                 sharding=everywhere)
  with pytest.raises(ValueError) as error:
    checkpoint.restore_tree(item, target, "the run", partial=True)
  assert str(error.value).splitlines() == [
      "the run does not fit the configured state:",
      f"  mis-shaped: params/text_proj/kernel is ({rows}, {cols}) in the checkpoint, "
      f"({rows}, {cols + 1}) here"]
