"""The update step (design §3) and the trainer end to end (`:runlocal` through `cots_jax.main`)."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from cots_jax.metrics_writer import read_metrics
from cots_jax.models import cots as cots_model
from support import build, run_module, tiny_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL_STEPS = 200


def tiny_config(**loss_weights):
  """A model small enough to compile in seconds, with batch 8 and a queue of 32."""
  config = common.base_config("tiny")
  config.model.embed_dim = 16
  for tower in (config.model.image, config.model.text):
    tower.width, tower.depth, tower.heads = 32, 1, 2
  config.model.image.image_size, config.model.image.patch_size = 24, 8
  config.vq.codebook_size, config.vq.hidden = 16, 16
  config.input.batch_size, config.queue.size = 8, 32
  config.input.data.num_train_images = 40
  config.input.mvm_min_block = 2
  config.total_steps, config.optim.warmup_steps = 10, 2
  config.loss.update(loss_weights)
  return config


@pytest.fixture(scope="module")
def full_objective():
  return build(tiny_config())


def test_update_compiles_once_and_moves_every_part_of_the_state(full_objective):
  state, update_fn, batches = full_objective
  config = tiny_config()
  update = jax.jit(chex.assert_max_traces(update_fn, n=1))
  params0 = jax.device_get(state["params"])
  ema0 = jax.device_get(state["params_ema"])
  new_state, metrics = update(state, batches[0])
  # Momentum towers move before the key forward: ema1 = m * ema0 + (1 - m) * params0.
  m = config.momentum.decay
  chex.assert_trees_all_close(new_state["params_ema"],
                              jax.tree.map(lambda e, p: m * e + (1 - m) * p, ema0, params0),
                              rtol=1e-5, atol=1e-7)
  assert int(new_state["step"]) == 1
  batch_size = config.input.batch_size
  queue = jax.device_get(new_state["queue"])
  assert int(queue["ptr"]) == batch_size
  np.testing.assert_array_equal(queue["idx"][:batch_size], batches[0]["image_id"])
  assert queue["valid"][:batch_size].all() and not queue["valid"][batch_size:].any()
  np.testing.assert_allclose(np.linalg.norm(queue["img"][:batch_size], axis=-1), 1, rtol=1e-5)
  for name in ("loss", "itc", "kl_align", "mlm", "mvm", "amf_kept", "temp", "lr", "grad_norm"):
    assert np.isfinite(float(metrics[f"train/{name}"])), name
  assert float(metrics["train/temp"]) == pytest.approx(config.temp.init)
  for batch in batches[1:]:  # same shapes: no retrace (chex raises on a second trace)
    new_state, metrics = update(new_state, batch)
  assert int(new_state["step"]) == 3
  assert int(jax.device_get(new_state["queue"]["ptr"])) == 3 * batch_size


def test_queue_keys_are_the_momentum_embeddings_of_the_batch(full_objective):
  state, update_fn, batches = full_objective
  config = tiny_config()
  model = cots_model.CotsModel.from_config(config)
  new_state, _ = jax.jit(update_fn)(state, batches[0])
  ema = new_state["params_ema"]
  tokens = model.apply({"params": ema}, batches[0]["image"], method=model.encode_image)
  image_global = model.apply({"params": ema}, tokens, method=model.image_global)
  expected = model.apply({"params": ema}, image_global, method=model.embed_image)
  np.testing.assert_allclose(new_state["queue"]["img"][:config.input.batch_size], expected,
                             rtol=1e-4, atol=1e-5)


def test_dropout_draws_from_the_state_rng_only_when_configured(full_objective):
  """With dropout 0 the step ignores `state["rng"]`; with dropout > 0 another key changes the loss
  (the tower passes of the step really run in train mode)."""
  def losses_with_two_keys(state, update_fn, batch):
    update = jax.jit(update_fn)
    return [float(update(dict(state, rng=jax.random.PRNGKey(seed)), batch)[1]["train/loss"])
            for seed in (1, 2)]

  state, update_fn, batches = full_objective
  without = losses_with_two_keys(state, update_fn, batches[0])
  assert without[0] == without[1]
  config = tiny_config()
  config.model.image.dropout = config.model.text.dropout = 0.1
  state, update_fn, batches = build(config)
  with_dropout = losses_with_two_keys(state, update_fn, batches[0])
  assert with_dropout[0] != pytest.approx(with_dropout[1], rel=1e-6)


def _np_soft_cross_entropy(logits, targets):
  """Per-row CE of softmax(logits [B, C]) against targets [B, C]; -inf logits have target 0."""
  finite = np.where(np.isfinite(logits), logits, -np.inf)
  log_probs = finite - np.log(np.sum(np.exp(finite - finite.max(1, keepdims=True)), axis=1,
                                     keepdims=True)) - finite.max(1, keepdims=True)
  return -np.sum(targets * np.where(targets > 0, log_probs, 0.0), axis=1)


def test_fine_tuning_itc_counts_every_caption_of_an_image_as_a_positive():
  """A whole fine-tuning step (configs/finetune_retrieval.py: multi-positive, in-batch keys)
  against numpy: image ids repeat in the batch and in the queue, one matching slot is invalid."""
  config = tiny_config(itc=1.0, mlm=0.0, mvm=0.0, kl_align=0.0)
  config.queue.multi_positive = config.queue.in_batch_negatives = True
  config.amf.enabled = False
  state, update_fn, batches = build(config)
  ids = np.array([3, 3, 5, 5, 5, 8, 9, 9], np.int32)
  batch = dict(batches[0], image_id=ids)
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  size, dim = config.queue.size, config.model.embed_dim
  queue = {"img": unit(rng.normal(size=(size, dim))).astype(np.float32),
           "txt": unit(rng.normal(size=(size, dim))).astype(np.float32),
           "idx": np.full(size, -1, np.int32), "valid": np.zeros(size, bool)}
  queue["idx"][:6] = [3, 5, 7, 5, 9, 3]
  queue["valid"][:6] = [True, True, True, False, True, True]
  state = dict(state, queue=dict(state["queue"], **queue))
  params = jax.device_get(state["params"])
  decay = config.momentum.decay
  ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                     jax.device_get(state["params_ema"]), params)
  _, metrics = jax.jit(update_fn)(state, batch)

  model = cots_model.CotsModel.from_config(config)

  @jax.jit
  def embed(p):
    v = model.apply({"params": p}, batch["image"], method=model.image_embedding)[0]
    t = model.apply({"params": p}, batch["text_ids"], batch["text_mask"],
                    method=model.text_embedding)[0]
    return v, t

  (v, t), (v_m, t_m) = (map(np.float64, embed(p)) for p in (params, ema))
  temp, valid = config.temp.init, queue["valid"]
  logits_i2t = np.concatenate([v @ t_m.T, np.where(valid, v @ queue["txt"].T, -np.inf)], 1) / temp
  logits_t2i = np.concatenate([t @ v_m.T, np.where(valid, t @ queue["img"].T, -np.inf)], 1) / temp
  match = np.concatenate([ids[:, None] == ids[None, :],
                          (ids[:, None] == queue["idx"][None, :]) & valid[None, :]], axis=1)
  targets = match / match.sum(1, keepdims=True)
  # Pair 0 (image 3): keys 0 and 1 and queue slots 0 and 5; pair 2 (image 5): keys 2-4, slot 1.
  assert match[0].sum() == 4 and match[2].sum() == 4 and match[5].sum() == 1
  want = np.mean(0.5 * (_np_soft_cross_entropy(logits_i2t, targets)
                        + _np_soft_cross_entropy(logits_t2i, targets)))
  np.testing.assert_allclose(float(metrics["train/itc"]), want, rtol=1e-4)


def test_total_loss_is_the_weighted_sum_and_zero_weights_skip_terms():
  weights = dict(itc=1.0, mlm=0.5, mvm=0.0, kl_align=2.0)
  state, update_fn, batches = build(tiny_config(**weights))
  _, metrics = jax.jit(update_fn)(state, batches[0])
  assert "train/mvm" not in metrics
  expected = sum(w * float(metrics[f"train/{k}"]) for k, w in weights.items() if w > 0)
  assert float(metrics["train/loss"]) == pytest.approx(expected, rel=1e-5)


def test_learnable_temperature_is_clamped_and_trained():
  config = tiny_config(mlm=0.0, mvm=0.0)
  config.temp.learnable, config.temp.init, config.temp.max = True, 0.5, 0.5
  state, update_fn, batches = build(config)
  state, metrics = jax.jit(update_fn)(state, batches[0])
  assert float(metrics["train/temp"]) == pytest.approx(0.5)
  assert "temp" in state["params"] and "temp" in state["params_ema"]


def test_masked_patch_positions_lists_the_true_entries_in_order():
  mask = np.zeros((3, 10), bool)
  mask[0, [1, 4, 9]] = mask[1, [0, 1, 2]] = mask[2, [3, 5, 7]] = True
  got = np.asarray(cots_model.masked_patch_positions(jnp.asarray(mask), 3))
  np.testing.assert_array_equal(got, [[1, 4, 9], [0, 1, 2], [3, 5, 7]])


@pytest.fixture(scope="module")
def runlocal_workdir(tmp_path_factory):
  """`python -m cots_jax.main --config=configs/pretrain.py:runlocal` in a fresh workdir, with the
  suite's TINY towers (the suite's time budget; the README times the real smoke test): VQ
  tokenizer training, the full objective, evals, checkpoint, logs."""
  workdir = tmp_path_factory.mktemp("runlocal")
  flags = tiny_flags(**{"total_steps": RUNLOCAL_STEPS, "log_every": 50, "checkpoint_every": 0,
                        "vq.steps": 50, "input.data.num_train_images": 400})
  result = run_module("cots_jax.main", "--config=configs/pretrain.py:runlocal",
                      f"--workdir={workdir}", *flags)
  return workdir, result


@pytest.mark.slow
def test_runlocal_trains_logs_evaluates_and_checkpoints(runlocal_workdir):
  workdir, result = runlocal_workdir
  assert "training a VQ tokenizer" in result.stdout
  records = read_metrics(workdir)
  train_records = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train_records] == list(range(50, RUNLOCAL_STEPS + 1, 50))
  for key in ("train/loss", "train/itc", "train/kl_align", "train/mlm", "train/mvm",
              "train/amf_kept", "train/lr", "train/temp", "train/pairs_per_sec"):
    assert all(np.isfinite(r[key]) for r in train_records), key
  assert train_records[-1]["train/mlm"] < 0.8 * train_records[0]["train/mlm"]
  final = json.loads((workdir / "final_eval.json").read_text())
  for name in ("retrieval", "retrieval_momentum"):
    for metric in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
                   "i2t_medr", "t2i_medr"):
      assert f"eval/{name}/{metric}" in final
  assert os.listdir(workdir / "checkpoints") == [str(RUNLOCAL_STEPS)]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == RUNLOCAL_STEPS
  vq_quality = next(r for r in records if "vq/eval_perplexity" in r)
  assert vq_quality["vq/eval_recon_mse"] < vq_quality["vq/eval_mean_colour_mse"]


def test_pairs_per_sec_counts_the_wait_for_the_steps_not_only_their_dispatch(monkeypatch):
  """A step is dispatched at once and computed while the host goes on; the logged rate must
  include the time the host then waits for the metrics (a fake clock: 10 s per wait, nothing
  else takes time), less the evals."""
  from cots_jax import train  # pylint: disable=g-import-not-at-top

  clock = {"now": 0.0}
  monkeypatch.setattr(train.time, "perf_counter", lambda: clock["now"])

  def device_get(tree):
    clock["now"] += 10.0  # the 5 dispatched steps finish while the host waits here
    return jax.tree.map(float, tree)

  def evaluate(state):
    clock["now"] += 100.0  # excluded from the figure
    return {"eval/retrieval/i2t_r1": 1.0}

  monkeypatch.setattr(train.jax, "device_get", device_get)
  written = []

  class Writer:
    def write(self, step, metrics):
      written.append((step, dict(metrics)))

  class Manager:
    directory = "ckpt"
    def should_save(self, step):
      return False
    def latest_step(self):
      return None
    def wait_until_finished(self):
      pass
    def close(self):
      pass

  class NoPreemption:
    def requested(self, step):
      return False

  config = common.base_config("tiny")
  config.total_steps, config.log_every, config.eval_every = 10, 5, 5
  config.input.batch_size = 4
  metrics = {"train/loss": 1.0, "train/grad_norm": 1.0}
  train._loop(config, {}, [(1, lambda state, batch: (state, metrics))], iter(range(10)), 0,
              Manager(), None, Writer(), NoPreemption(), evaluate)
  rates = [m["train/pairs_per_sec"] for _, m in written if "train/pairs_per_sec" in m]
  assert rates == [5 * 4 / 10.0, 5 * 4 / 10.0]
