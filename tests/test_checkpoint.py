"""Checkpoints (cots_jax/checkpoint.py): exact resume after SIGKILL and SIGTERM, other meshes,
init_from, and the guard rails (non-finite loss, unwritable workdir, failed saves, changed shapes).

The trainer runs use one tiny config: an in-process reference run, and `cots_jax.main`
subprocesses that are stopped and restarted. The subprocess work runs in background threads
started by the first test, overlapping the in-process reference run; children share the suite's
compilation cache. Helpers below also run inside the multi-device children
(`python -c "import test_checkpoint ..."`), as the device count is fixed per process.
"""

import concurrent.futures
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cots_jax import checkpoint
from cots_jax import inference
from cots_jax import sharding
from cots_jax import state as state_lib
from cots_jax import step as step_lib
from cots_jax import train
from cots_jax import vq_trainer
from cots_jax.data import pipeline
from cots_jax.metrics_writer import read_metrics
from support import (flat, REPO, TINY, missing_requirement, run_module, start_main, subprocess_env,
                     tiny_config, tiny_flags)

# Shards a queue and two parameter families (and their EMA / Adam moments) over "data".
MESH_RULES = [("^queue/(img|txt)$", ("data", None)), ("mlp/fc1/kernel$", (None, "data")),
              ("word_embeddings/embedding$", (None, "data"))]
TIMEOUT = 300


def abstract_state(config, mesh):
  """ShapeDtypeStructs of the train state with the shardings of `config.sharding_rules`."""
  return state_lib.build(config, mesh).abstract


def save_on_this_mesh(workdir, out_path):
  """Saves a train state of random values on all devices of this process as checkpoint 7, with
  the data iterator after 2 batches; writes the values and the 3rd batch's ids to `out_path`."""
  config = tiny_config(sharding_rules=MESH_RULES)
  abstract = abstract_state(config, sharding.make_mesh(config.mesh))
  rng = np.random.default_rng(0)
  values = jax.tree.map(
      lambda a: (rng.normal(size=a.shape) if jnp.issubdtype(a.dtype, jnp.floating)
                 else rng.integers(0, 2, size=a.shape)).astype(a.dtype), abstract)
  state = jax.tree.map(lambda v, a: jax.device_put(v, a.sharding), values, abstract)
  train_iter = pipeline.make_train_iterator(config)
  for _ in range(2):
    next(train_iter)
  manager = checkpoint.checkpoint_manager(workdir, config)
  checkpoint.save_checkpoint(manager, 7, state, train_iter)
  checkpoint.finish(manager)
  np.savez(out_path, next_image_id=next(train_iter)["image_id"], **flat(values))


def restore_on_this_mesh(workdir, out_path=None):
  """Restores the checkpoint of `workdir` onto all devices of this process; returns (and writes to
  `out_path`) the values, the next batch's ids, and the mesh size and spec of a sharded leaf."""
  config = tiny_config(sharding_rules=MESH_RULES)
  mesh = sharding.make_mesh(config.mesh)
  train_iter = pipeline.make_train_iterator(config)
  manager = checkpoint.checkpoint_manager(workdir, config)
  state = checkpoint.restore_checkpoint(manager, abstract_state(config, mesh), train_iter)
  manager.close()
  kernel = state["params"]["image"]["block_0"]["mlp"]["fc1"]["kernel"]
  result = {"next_image_id": next(train_iter)["image_id"], "mesh_size": np.asarray(mesh.size),
            "kernel_spec": np.asarray(str(kernel.sharding.spec)),
            "kernel_shards": np.asarray(len(kernel.addressable_shards)), **flat(state)}
  if out_path:
    np.savez(out_path, **result)
  return result


def run_helper(call, devices):
  """Runs `test_checkpoint.<call>` in a child with `devices` fake CPU devices."""
  result = subprocess.run([sys.executable, "-c", f"import test_checkpoint as t; t.{call}"],
                          cwd=REPO, env=subprocess_env(devices), capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)
  assert result.returncode == 0, result.stderr[-4000:]


def start_trainer(workdir, vq_dir, log_path):
  """`python -m cots_jax.main --config=configs/pretrain.py:runlocal` + TINY, output to a file."""
  return start_main(workdir, log_path, f"--config.vq.init={vq_dir}", *tiny_flags())


def complete_steps(workdir):
  """The steps of WORKDIR/checkpoints/<step> (unfinished saves have a tmp suffix)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def read_log(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def signal_after_checkpoint(process, workdir, after_step, signum, log_path):
  """Sends `signum` once a complete checkpoint later than `after_step` exists; returns the rc."""
  deadline = time.monotonic() + TIMEOUT
  while not any(step > after_step for step in complete_steps(workdir)):
    if process.poll() is not None or time.monotonic() > deadline:
      process.kill()
      raise AssertionError(f"no checkpoint after step {after_step} while running:\n"
                           + read_log(log_path)[-4000:])
    time.sleep(0.02)
  process.send_signal(signum)
  return process.wait(timeout=TIMEOUT)


def interrupt_and_resume(workdir, vq_dir, log_path):
  """Run 1 gets SIGTERM after its first checkpoint, run 2 SIGKILL after a later one, run 3 goes
  to the end, all in `workdir`. Returns the return codes and the checkpoint steps after 1 and 2."""
  rc_term = signal_after_checkpoint(start_trainer(workdir, vq_dir, log_path), workdir, 0,
                                    signal.SIGTERM, log_path)
  preempted_at = complete_steps(workdir)[-1]
  rc_kill = signal_after_checkpoint(start_trainer(workdir, vq_dir, log_path), workdir,
                                    preempted_at, signal.SIGKILL, log_path)
  killed_after = complete_steps(workdir)[-1]
  rc_last = start_trainer(workdir, vq_dir, log_path).wait(timeout=TIMEOUT)
  return {"rcs": (rc_term, rc_kill, rc_last), "preempted_at": preempted_at,
          "killed_after": killed_after}


def train_losses(workdir):
  """{step: train/loss}, the last record of each step (a resumed run logs some steps again)."""
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
  """An untrained tokenizer of the tiny shape, shared as config.vq.init by every run."""
  directory = str(tmp_path_factory.mktemp("vq"))
  config = tiny_config()
  vq_trainer.save_tokenizer(
      directory, vq_trainer.random_tokenizer(config, jax.random.PRNGKey(1))["params"], config)
  return directory


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, vq_dir):
  """Starts interrupt_and_resume in a background thread: (workdir, log path, future)."""
  root = str(tmp_path_factory.mktemp("interrupted"))
  workdir, log = os.path.join(root, "run"), os.path.join(root, "runs.log")
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    yield workdir, log, pool.submit(interrupt_and_resume, workdir, vq_dir, log)


@pytest.fixture(scope="module")
def mesh_checkpoint(tmp_path_factory):
  """Starts, in a background thread, saving a checkpoint on 8 fake devices (save_on_this_mesh),
  then restoring it on 4 into WORKDIR/on4.npz: (workdir, future)."""
  workdir = str(tmp_path_factory.mktemp("mesh"))

  def save_on_8_restore_on_4():
    run_helper(f"save_on_this_mesh({workdir!r}, {workdir + '/saved.npz'!r})", devices=8)
    run_helper(f"restore_on_this_mesh({workdir!r}, {workdir + '/on4.npz'!r})", devices=4)

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    yield workdir, pool.submit(save_on_8_restore_on_4)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, vq_dir):
  """An uninterrupted in-process run of the tiny config: (workdir, {step: loss})."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train.train_and_evaluate(tiny_config(**{"vq.init": vq_dir}), workdir)
  return workdir, train_losses(workdir)


@pytest.mark.slow
def test_sigterm_then_sigkill_then_restart_logs_the_losses_of_an_uninterrupted_run(
    interrupted_run, mesh_checkpoint, reference_run):
  del mesh_checkpoint  # requested first only to start its subprocesses alongside
  workdir, log, future = interrupted_run
  _, expected = reference_run
  result = future.result(timeout=4 * TIMEOUT)
  output = read_log(log)
  assert result["rcs"] == (0, -signal.SIGKILL, 0), output[-4000:]
  preempted_at, killed_after = result["preempted_at"], result["killed_after"]
  assert preempted_at < killed_after < TINY["total_steps"]
  assert f"SIGTERM: saved checkpoint {preempted_at} in" in output
  run_log = read_log(os.path.join(workdir, "log.txt"))  # INFO records: the workdir's log
  assert f"Resumed from step {preempted_at} " in run_log
  assert f"Resumed from step {killed_after} " in run_log
  assert run_log.count("Resumed from step") == 2
  got = train_losses(workdir)
  assert sorted(got) == sorted(expected) == list(range(1, TINY["total_steps"] + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)],
                             rtol=1e-5)
  assert os.path.exists(os.path.join(workdir, "final_eval.json"))


@pytest.mark.slow
def test_sigterm_while_the_vq_tokenizer_trains_saves_after_the_first_step(tmp_path):
  """Preemption during set-up (VQ training, compilation) must not kill the run unsaved."""
  workdir, log_path = tmp_path / "run", tmp_path / "run.log"
  process = start_main(workdir, log_path, *tiny_flags(**{"vq.steps": 100}))
  deadline = time.monotonic() + TIMEOUT
  while "training a VQ tokenizer" not in read_log(log_path):
    assert process.poll() is None and time.monotonic() < deadline, read_log(log_path)[-4000:]
    time.sleep(0.02)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=TIMEOUT) == 0, read_log(log_path)[-4000:]
  assert "SIGTERM: saved checkpoint 1 in" in read_log(log_path)
  assert complete_steps(str(workdir)) == [1]
  assert vq_trainer.find_tokenizer_dir(str(workdir)) is not None  # kept for the resumed run


@pytest.fixture(scope="module")
def saved_on_8(mesh_checkpoint):
  """A workdir with a checkpoint written on 8 fake devices, and the values it holds."""
  workdir, future = mesh_checkpoint
  future.result(timeout=2 * TIMEOUT)
  return workdir, dict(np.load(os.path.join(workdir, "saved.npz")))


def assert_same_state(restored, saved):
  state_keys = set(saved) - {"next_image_id"}
  assert state_keys <= set(restored) and len(state_keys) > 100
  for key in state_keys:
    np.testing.assert_array_equal(restored[key], saved[key], err_msg=key)
  np.testing.assert_array_equal(restored["next_image_id"], saved["next_image_id"])


@pytest.mark.slow
def test_checkpoint_from_8_devices_restores_on_1_and_on_4(saved_on_8):
  workdir, saved = saved_on_8
  on_1 = restore_on_this_mesh(workdir)
  assert int(on_1["mesh_size"]) == 1
  assert_same_state(on_1, saved)
  on_4 = dict(np.load(os.path.join(workdir, "on4.npz")))
  assert int(on_4["mesh_size"]) == 4 and int(on_4["kernel_shards"]) == 4
  assert str(on_4["kernel_spec"]) == str(jax.sharding.PartitionSpec(None, "data"))
  assert_same_state(on_4, saved)


@pytest.mark.slow
def test_unfinished_saves_are_ignored_and_nothing_is_pickled(saved_on_8, tmp_path):
  workdir, saved = saved_on_8
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  for name in ("9.orbax-checkpoint-tmp", "11.orbax-checkpoint-tmp-1764000000"):
    os.makedirs(os.path.join(copy, "checkpoints", name, "state"))
  assert_same_state(restore_on_this_mesh(copy), saved)
  files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(workdir, "checkpoints"))
           for f in names]
  for path in files:
    with open(path, "rb") as f:
      content = f.read()
    protocol_header = content[:1] == b"\x80" and content[1:2] in b"\x02\x03\x04\x05"
    assert not (protocol_header and content.endswith(b".")), f"{path} looks like a pickle"
  iterator_states = [f for f in files if os.sep + "data" + os.sep in f and f.endswith(".json")]
  assert iterator_states
  for path in iterator_states:
    with open(path, encoding="utf-8") as f:
      assert json.load(f)


def small_state(value=1.0):
  """A train-state-like dict: params, params_ema, opt, step."""
  params = {"tower": {"kernel": jnp.full((4, 3), value), "bias": jnp.zeros(3)}}
  return {"params": params, "params_ema": jax.tree.map(lambda x: x * 2, params),
          "opt": {"mu": jnp.zeros((4, 3))}, "step": jnp.zeros((), jnp.int32)}


def small_iterator():
  return iter(grain.MapDataset.range(8).to_iter_dataset())


# After the failed write, Orbax's background thread may post to its closed asyncio loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_save_that_fails_half_way_reports_it_and_leaves_the_last_complete_checkpoint(tmp_path):
  config = tiny_config()
  manager = checkpoint.checkpoint_manager(str(tmp_path), config)
  checkpoint.save_checkpoint(manager, 1, small_state(1.0), small_iterator())
  checkpoint.finish(manager)
  manager = checkpoint.checkpoint_manager(str(tmp_path), config)
  # Random values (zeros would compress) of 2 MB: more than the file size limit below.
  big = dict(small_state(), opt={"mu": jax.random.normal(jax.random.PRNGKey(0), (1024, 512))})
  # The limit holds for this whole process (and children started meanwhile): the background
  # subprocess work of this module is finished by the earlier tests.
  previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))  # "disk full" for bigger files
  try:
    with pytest.raises(OSError, match="saving a checkpoint to .* failed: .*File too large"):
      checkpoint.save_checkpoint(manager, 2, big, small_iterator())
      checkpoint.finish(manager)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous_handler)
  assert any(".orbax-checkpoint-tmp" in name for name in os.listdir(tmp_path / "checkpoints"))
  manager = checkpoint.checkpoint_manager(str(tmp_path), config)
  assert manager.all_steps() == [1]
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, small_state())
  restored = checkpoint.restore_checkpoint(manager, abstract, small_iterator())
  np.testing.assert_array_equal(restored["params"]["tower"]["kernel"], np.ones((4, 3)))


def test_non_finite_parameters_are_never_saved(tmp_path):
  manager = checkpoint.checkpoint_manager(str(tmp_path), tiny_config())
  checkpoint.save_checkpoint(manager, 1, small_state(1.0), small_iterator())
  with pytest.raises(FloatingPointError, match="at step 2; .*step 1, is kept"):
    checkpoint.save_checkpoint(manager, 2, small_state(np.nan), small_iterator())
  checkpoint.finish(manager)
  assert complete_steps(str(tmp_path)) == [1]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoints(
    tmp_path, vq_dir, reference_run):
  """Resumes a copy of the reference run from step 16 with NaN in a parameter of the MLM head
  (not AMF-filtered, so the loss itself turns NaN)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_run[0], workdir)
  config = tiny_config(**{"vq.init": vq_dir, "init_from": str(tmp_path / "not_used")})
  directory = os.path.join(workdir, "checkpoints")
  shutil.rmtree(os.path.join(directory, "20"))
  state_dir = os.path.join(directory, "16", "state")
  restored = jax.tree.map(np.array, ocp.StandardCheckpointer().restore(state_dir))
  restored["params"]["mlm_head"]["dense"]["bias"][0] = np.nan
  shutil.rmtree(state_dir)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(state_dir, jax.tree.map(jnp.asarray, restored))
  checkpointer.wait_until_finished()
  with pytest.raises(FloatingPointError,
                     match="non-finite train/loss=nan.* at step 17; .*step 16, is kept"):
    train.train_and_evaluate(config, workdir)
  assert complete_steps(workdir) == [12, 16]


def test_init_from_loads_towers_and_heads_and_leaves_the_rest_fresh(reference_run):
  workdir, _ = reference_run
  config = tiny_config()
  fresh = state_lib.build(config, state_lib.make_mesh(config)).fresh_state()
  fresh_values = flat(fresh)
  saved = flat(ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", "20", "state")))
  for use_ema in (False, True):
    loaded = flat(checkpoint.load_towers(workdir, fresh, use_ema=use_ema))
    for key, value in loaded.items():
      if key.startswith("params/"):
        expected = saved[key]
      elif key.startswith("params_ema/"):
        expected = saved[key] if use_ema else saved["params/" + key.split("/", 1)[1]]
      else:  # optimizer, queues, AMF, step, rng, VQ
        expected = fresh_values[key]
      np.testing.assert_array_equal(value, expected, err_msg=key)
  assert not np.array_equal(saved["params_ema/text_proj/kernel"], saved["params/text_proj/kernel"])


def test_init_from_ema_takes_locked_leaves_from_params_and_refuses_a_run_without_momentum(
    tmp_path):
  """A run with a locked tower keeps no momentum copy of it: its params_ema lacks that tower."""
  locked_run = dict(small_state(), params={**small_state()["params"],
                                           "frozen": {"kernel": jnp.full((2,), 5.0)}})
  manager = checkpoint.checkpoint_manager(str(tmp_path / "locked"), tiny_config())
  checkpoint.save_checkpoint(manager, 3, locked_run, small_iterator())
  checkpoint.finish(manager)
  wanted = dict(small_state(0.0), params={**small_state(0.0)["params"],
                                          "frozen": {"kernel": jnp.zeros(2)}})
  wanted["params_ema"] = jax.tree.map(jnp.zeros_like, wanted["params"])
  loaded = checkpoint.load_towers(str(tmp_path / "locked"), wanted, use_ema=True)
  np.testing.assert_array_equal(loaded["params_ema"]["frozen"]["kernel"], [5.0, 5.0])
  np.testing.assert_array_equal(loaded["params_ema"]["tower"]["kernel"], np.full((4, 3), 2.0))
  np.testing.assert_array_equal(loaded["params"]["tower"]["kernel"], np.full((4, 3), 1.0))

  no_momentum = {key: value for key, value in small_state().items() if key != "params_ema"}
  manager = checkpoint.checkpoint_manager(str(tmp_path / "lit"), tiny_config())
  checkpoint.save_checkpoint(manager, 3, no_momentum, small_iterator())
  checkpoint.finish(manager)
  with pytest.raises(ValueError, match="has no momentum encoder .*init_from_ema=False"):
    checkpoint.load_towers(str(tmp_path / "lit"), small_state(), use_ema=True)
  loaded = checkpoint.load_towers(str(tmp_path / "lit"), small_state(0.0))
  np.testing.assert_array_equal(loaded["params_ema"]["tower"]["kernel"], np.ones((4, 3)))


def test_init_from_lists_missing_unexpected_and_mis_shaped_parameters(tmp_path):
  manager = checkpoint.checkpoint_manager(str(tmp_path), tiny_config())
  checkpoint.save_checkpoint(manager, 3, small_state(), small_iterator())
  checkpoint.finish(manager)
  wanted = small_state()
  wanted["params"] = {"tower": {"kernel": jnp.zeros((4, 5))}, "head": {"kernel": jnp.zeros(2)}}
  with pytest.raises(ValueError) as error:
    checkpoint.load_towers(str(tmp_path), wanted)
  lines = str(error.value).splitlines()
  assert "(step 3) does not fit the configured state" in lines[0]
  assert [line.strip() for line in lines[1:]] == [
      "missing: params/head/kernel (2,)",
      "unexpected: params/tower/bias (3,)",
      "mis-shaped: params/tower/kernel is (4, 3) in the checkpoint, (4, 5) here"]
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    checkpoint.load_towers(str(tmp_path / "empty"), wanted)


def test_restore_refuses_a_checkpoint_of_another_structure(tmp_path):
  manager = checkpoint.checkpoint_manager(str(tmp_path), tiny_config())
  checkpoint.save_checkpoint(manager, 3, small_state(), small_iterator())
  checkpoint.finish(manager)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, small_state())
  abstract["opt"]["nu"] = abstract["opt"]["mu"]
  manager = checkpoint.checkpoint_manager(str(tmp_path), tiny_config())
  with pytest.raises(ValueError, match=r"checkpoint 3 .* does not fit .*\n  missing: opt/nu"):
    checkpoint.restore_checkpoint(manager, abstract, small_iterator())


def test_tree_differences_of_equal_trees_is_empty():
  assert checkpoint.tree_differences(small_state(), small_state()) == []


def test_unwritable_workdir_fails_at_start(tmp_path):
  blocker = tmp_path / "file.txt"
  blocker.write_text("a file, not a directory")
  with pytest.raises(OSError, match="workdir .*file.txt/sub' is not writable"):
    train.train_and_evaluate(tiny_config(), str(blocker / "sub"))


def test_free_space_check_fails_when_a_checkpoint_cannot_fit(tmp_path):
  checkpoint.check_free_space(str(tmp_path), 1)
  with pytest.raises(OSError, match="MB free, a checkpoint of this state needs"):
    checkpoint.check_free_space(str(tmp_path), 1 << 62)
  assert checkpoint.state_bytes(small_state()) == 4 * (12 + 3 + 12 + 3 + 12 + 1)


def test_prepare_workdir_returns_the_config_it_holds_and_write_config_replaces_it(tmp_path):
  workdir = str(tmp_path / "new")
  assert checkpoint.prepare_workdir(workdir) is None
  checkpoint.write_config(workdir, tiny_config())
  assert checkpoint.prepare_workdir(workdir)["model"]["text"]["width"] == 32
  checkpoint.write_config(workdir, tiny_config(**{"model.text.width": 64}))
  assert checkpoint.prepare_workdir(workdir)["model"]["text"]["width"] == 64
  assert os.listdir(workdir) == ["config.json"]


def test_a_checkpoint_of_another_shape_names_each_leaf_with_the_field_that_shapes_it(
    trained_run, tmp_path):
  """The run's checkpoint is compared with the state this config builds; a differing leaf names
  the field whose saved value would give it back its shape, fields that shape nothing are not
  blamed, and nothing is trained or overwritten."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run, workdir)
  run = {"loss.mvm": 0.0, "loss.mlm": 0.0}
  other = tiny_config(**run, **{"model.text.width": 64, "temp.learnable": True,
                                "total_steps": 14, "optim.lr": 0.1})
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(other, workdir)
  lines = [line.strip() for line in str(error.value).splitlines()]
  assert lines[0].startswith("checkpoint 12 in ")
  assert "does not fit the configured state" in lines[0]
  assert "missing: params/temp () [config.temp.learnable: saved False, now True]" in lines
  text_lines = [line for line in lines[1:] if "/text/" in line]
  assert text_lines and all(
      line.endswith("[config.model.text.width: saved 32, now 64]") for line in text_lines)
  assert not any("total_steps" in line or "optim.lr" in line for line in lines)
  assert complete_steps(workdir) == complete_steps(trained_run)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["model"]["text"]["width"] == 32  # still the checkpoints' config


VIDEO = {"input.data.name": "synthetic_video", "loss.mvm": 0.0,
         "eval.evaluators": [("retrieval", {})]}


@pytest.mark.parametrize("change, shapes_change", [
    ({"model.dtype": "bfloat16", "model.text.dropout": 0.1, "loss.kl_align": 0.5}, False),
    ({**VIDEO, "model.num_frames": 8}, False),
    ({**VIDEO, "model.temporal_agg": "transformer", "model.temporal_layers": 1}, True),
    ({"model.image.posemb": "sincos2d"}, True),
    ({"model.use_wst": True, "loss.cookie_vv": 1.0, "loss.cookie_intra_mode": "cross_model",
      "input.second_view": True}, True),
])
def test_which_config_changes_change_the_state_comes_from_the_state_itself(change, shapes_change):
  """Mean pooling of frames has no parameters (its frame count may change), a temporal
  transformer has; COOKIE's cross_model terms add the towers' own projections."""
  base = VIDEO if change.get("input.data.name") == "synthetic_video" else {}
  mesh = state_lib.make_mesh(tiny_config())
  before = state_lib.build(tiny_config(**base), mesh).abstract
  after = state_lib.build(tiny_config(**change), mesh).abstract
  assert bool(checkpoint.differing_paths(before, after)) == shapes_change


# The code before the one-place-for-each-thing redesign (issue 22): workdirs it wrote must resume.
PINNED_COMMIT = "bce2b37fc3450a322c2df35f0f19a05815ff8265"


@pytest.mark.slow
def test_a_workdir_written_by_the_code_before_the_redesign_resumes_and_loads(tmp_path):
  """The pinned commit's cots_jax (from git) runs 2 steps with a VQ tokenizer of its own; this
  code resumes its checkpoint to step 4, reads its tokenizer and loads it for inference."""
  old_code, workdir = tmp_path / "old_code", tmp_path / "run"
  archive = subprocess.run(["git", "-C", REPO, "archive", PINNED_COMMIT, "cots_jax", "configs"],
                           capture_output=True, check=False)
  if archive.returncode:
    missing_requirement(f"git history with commit {PINNED_COMMIT[:7]}: "
                        f"{archive.stderr.decode()[-300:]}")
  old_code.mkdir()
  subprocess.run(["tar", "-x", "-C", str(old_code)], input=archive.stdout, check=True)
  overrides = {"vq.steps": 2, "checkpoint_every": 2, "optim.warmup_steps": 1,
               "input.data.num_eval_images": 10}
  run_module("cots_jax.main", "--config=configs/pretrain.py:runlocal", f"--workdir={workdir}",
             *tiny_flags(**overrides, total_steps=2), cwd=old_code,
             env=dict(subprocess_env(), PYTHONPATH=str(old_code)), timeout=TIMEOUT)
  config = tiny_config(**overrides, total_steps=4)
  train.train_and_evaluate(config, str(workdir))
  assert complete_steps(workdir) == [2, 4]
  saved_vq = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "4" / "state")["vq"]
  loaded_vq = vq_trainer.load_tokenizer(str(workdir), config)
  for saved, loaded in zip(jax.tree.leaves(saved_vq), jax.tree.leaves(loaded_vq), strict=True):
    np.testing.assert_array_equal(saved, loaded)
  run = inference.TrainedRun.load(str(workdir), step=2)
  assert run.step == 2 and run.embed_texts(["a red circle"]).shape == (1, 16)


def test_a_finished_run_started_again_returns_its_final_eval_without_compiling(
    trained_run, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run, workdir)
  metrics_before = (tmp_path / "run" / "metrics.jsonl").read_bytes()

  def no_compiling(*args, **kwargs):
    raise AssertionError("a finished run built its update step")

  monkeypatch.setattr(step_lib, "jit_update", no_compiling)
  results = train.train_and_evaluate(inference.load_run_config(workdir), workdir)
  with open(os.path.join(workdir, "final_eval.json"), encoding="utf-8") as f:
    assert results == json.load(f) and "eval/retrieval/i2t_r1" in results
  assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics_before


def test_preemption_watch_turns_sigterm_into_a_request_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with checkpoint.PreemptionWatch() as watch:
    assert not watch.requested(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watch.requested(2) and watch.signal_received == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("every, saved", [(4, [4, 8, 10]), (0, [10])])
def test_orbax_decides_the_interval_and_last_step_saves(tmp_path, every, saved):
  config = tiny_config(**{"checkpoint_every": every, "total_steps": 10})
  manager = checkpoint.checkpoint_manager(str(tmp_path), config)
  assert [step for step in range(1, 11) if manager.should_save(step)] == saved
  manager.close()
