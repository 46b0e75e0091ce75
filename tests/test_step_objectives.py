"""Each COTS objective pinned inside the real update step (`step.make_update_fn`), against numpy.

Issue 22, point 10: the queues, the AMF weights, the MVM targets, the KL term and the total loss
are checked on what the jitted step itself returns, with references written here in float64 from
the encoders' outputs (the model's methods give embeddings and head logits; every loss, target,
gather, weight and sum is recomputed in numpy). One state and one compiled step serve every test
but the last (the paper-scale 1 + K layout): a tiny config with AMF active from step 0, distinct
loss weights, a momentum decay of 0.6 (so the momentum towers differ visibly before and after
their EMA update) and a queue partly valid, written at a pointer that wraps to 0.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cots_jax import state as state_lib
from cots_jax import step as step_lib
from cots_jax import vq_trainer
from cots_jax.data import pipeline
from support import tiny_config

WEIGHTS = {"itc": 1.3, "mlm": 0.3, "mvm": 0.7, "kl_align": 1.9}  # distinct, none equal to 1
DECAY = 0.6
QUEUE_PTR = 24  # the batch of 8 fills slots 24..31 of the 32 and the pointer wraps to 0
TOL = {"rtol": 1e-5, "atol": 1e-6}  # the step and numpy agree to ~1e-7 here
CAPTION_KEYS = ("text_ids", "text_mask", "mlm_ids", "mlm_positions", "mlm_targets",
                "mlm_weights")


def objectives_config(**overrides):
  # AMF from step 0, with lambda 0.5: two mismatched pairs of 8 lie 1.7 sigma below the mean.
  return tiny_config(**{"amf.warmup_steps": 0, "amf.lambda_": 0.5, "momentum.decay": DECAY,
                        **{f"loss.{name}": w for name, w in WEIGHTS.items()}, **overrides})


@dataclasses.dataclass(frozen=True)
class World:
  """What every test shares: the config, the jitted real step, a clean state and batch, and a
  jitted forward of the encoders and heads (`forward(params, batch)`)."""
  config: Any
  model: Any
  optimizer: Any
  update: Any
  forward: Any
  tokenize: Any
  state: dict
  batch: dict

  def run(self, state=None, batch=None, update=None):
    """One real step -> (new state, metrics) as numpy."""
    new_state, metrics = (update or self.update)(self.state if state is None else state,
                                                 self.batch if batch is None else batch)
    return jax.device_get(new_state), {k: float(v) for k, v in metrics.items()}


def _tree_copy(tree):
  return jax.tree.map(np.array, tree)


def ema_after_update(state):
  """The momentum params that the step's key forward must use: EMA-updated BEFORE the forward."""
  return jax.tree.map(lambda e, p: (DECAY * np.float64(e) + (1 - DECAY) * np.float64(p))
                      .astype(np.float32), state["params_ema"], state["params"])


@pytest.fixture(scope="module")
def world():
  config = objectives_config()
  built = state_lib.build(config, state_lib.make_mesh(config),
                          vq_trainer.random_tokenizer(config, jax.random.PRNGKey(1)))
  state = jax.device_get(built.fresh_state())
  batch = dict(next(iter(pipeline.make_train_iterator(built.config))))
  model = built.model
  rng = np.random.default_rng(0)
  # Heads whose logits depend strongly on their inputs: at init every masked position's
  # cross-entropy is about log V whatever the pair or the global vector, so no mean would show
  # which pairs, positions or globals it averaged.
  for head in ("mlm_head", "mvm_head"):
    state["params"][head]["LayerNorm"]["scale"] = 20 * state["params"][head]["LayerNorm"]["scale"]
  # Momentum towers that differ from the online ones.
  state["params_ema"] = jax.tree.map(
      lambda p: (p + 0.02 * rng.normal(size=p.shape)).astype(p.dtype), state["params"])
  # A half-valid queue of random unit keys, written next at QUEUE_PTR.
  size, dim = config.queue.size, config.model.embed_dim
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
  valid = np.arange(size) < QUEUE_PTR
  valid[[3, 9]] = False
  state["queue"] = {"img": unit(rng.normal(size=(size, dim))),
                    "txt": unit(rng.normal(size=(size, dim))),
                    "idx": rng.integers(0, 100, size).astype(np.int32), "valid": valid,
                    "ptr": np.asarray(QUEUE_PTR, np.int32)}
  state["amf"] = keep_every_pair()

  # A tokenizer whose codes vary over the batch's patches: codebook rows are the encoder outputs
  # of 16 of its patches (the random one maps most patches to a few codes).
  vq_model = vq_trainer.tokenizer_module(config)
  vq_params = state["vq"]["params"]
  z_e = np.asarray(vq_model.apply({"params": vq_params}, batch["image"], method=vq_model.encode))
  z_e = z_e.reshape(-1, z_e.shape[-1])
  vq_params["codebook"] = z_e[rng.choice(len(z_e), config.vq.codebook_size, replace=False)]

  @jax.jit
  def forward(params, batch):
    """Clean embeddings and tower globals, and the MLM / MVM head logits at EVERY position (the
    heads act per position; the tests gather the masked ones in numpy)."""
    def apply(method, *args):
      return model.apply({"params": params}, *args, method=method)

    v, g_img = apply(model.image_embedding, batch["image"])
    t, g_txt = apply(model.text_embedding, batch["text_ids"], batch["text_mask"])
    hidden = apply(model.encode_text, batch["mlm_ids"], batch["text_mask"])
    tokens = apply(model.encode_image, batch["image"], batch["mvm_mask"])
    return {"v": v, "t": t, "g_img": g_img, "g_txt": g_txt,
            "mlm": apply(model.mlm_logits, hidden, g_img),
            "mvm": apply(model.mvm_logits, tokens[:, 1:], g_txt)}

  tokenize = jax.jit(lambda variables, images: vq_model.apply(variables, images,
                                                              method=vq_model.tokenize))
  update = jax.jit(step_lib.make_update_fn(built.config, model, built.optimizer))
  return World(built.config, model, built.optimizer, update,
               lambda p, b: jax.device_get(forward(p, b)), tokenize, state, batch)


def keep_every_pair():
  """AMF statistics whose threshold (about mu - 5) keeps every pair."""
  return {"mu": np.float32(0.0), "var": np.float32(100.0), "count": np.int32(5)}


# ------------------------------------------------------------------------ numpy references


def np_logits(queries, keys, queue_keys, queue_valid, temp, in_batch):
  """[q_i·k_j (all j, or j = i only) | q_i·Q (invalid: -inf)] / temp, float64."""
  queries, keys, queue_keys = (np.float64(x) for x in (queries, keys, queue_keys))
  key_part = queries @ keys.T if in_batch else np.sum(queries * keys, 1, keepdims=True)
  queue_part = np.where(queue_valid[None, :], queries @ queue_keys.T, -np.inf)
  return np.concatenate([key_part, queue_part], axis=1) / temp


def np_log_softmax(logits):
  logits = np.float64(logits)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def np_kl(log_a, log_b):
  """KL(a || b) per row; columns where a is 0 (invalid slots, -inf on both sides) add 0."""
  with np.errstate(invalid="ignore"):
    return np.sum(np.where(log_a > -np.inf, np.exp(log_a) * (log_a - log_b), 0.0), axis=-1)


def np_kl_rows(l_i2t, l_t2i, direction):
  log_p, log_q = np_log_softmax(l_i2t), np_log_softmax(l_t2i)
  return {"sym": 0.5 * (np_kl(log_p, log_q) + np_kl(log_q, log_p)),
          "i2t_to_t2i": np_kl(log_p, log_q), "t2i_to_i2t": np_kl(log_q, log_p)}[direction]


def np_masked_ce(logits, targets, weights, keep):
  """Mean CE over the real (weight 1) prediction slots of the kept pairs; logits [B, P, V]."""
  log_probs = np_log_softmax(logits)
  ce = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  w = weights * keep[:, None]
  return np.sum(w * ce) / np.sum(w)


def patch_codes(world, state, images):
  """The VQ code of every patch computed from that patch's pixels alone: each p x p patch is
  tokenized as an image of its own -> [B, N], patch j = row-major (r, c) of the grid."""
  p = world.config.model.image.patch_size
  b, h, w, _ = images.shape
  crops = images.reshape(b, h // p, p, w // p, p, 3).transpose(0, 1, 3, 2, 4, 5)
  codes = world.tokenize(state["vq"], crops.reshape(-1, p, p, 3))
  return np.asarray(codes).reshape(b, (h // p) * (w // p))


def masked_positions(mvm_mask):
  return np.stack([np.flatnonzero(row) for row in mvm_mask])


def reference_terms(world, state, batch, keep=None, config=None):
  """Each weighted term of the step, from the encoders' outputs, in float64; `keep` [B] bool
  are the pairs AMF keeps (their rows enter every mean; the others only as negatives)."""
  config = config or world.config
  keep = np.ones(len(batch["image_id"]), bool) if keep is None else keep
  online, momentum = world.forward(state["params"], batch), world.forward(
      ema_after_update(state), batch)
  queue, temp, in_batch = state["queue"], config.temp.init, config.queue.in_batch_negatives
  l_i2t = np_logits(online["v"], momentum["t"], queue["txt"], queue["valid"], temp, in_batch)
  l_t2i = np_logits(online["t"], momentum["v"], queue["img"], queue["valid"], temp, in_batch)
  rows = np.arange(len(keep))
  positive = rows if in_batch else np.zeros_like(rows)
  itc = -0.5 * (np_log_softmax(l_i2t)[rows, positive] + np_log_softmax(l_t2i)[rows, positive])
  terms = {"itc": itc[keep].mean(),
           "kl_align": np_kl_rows(l_i2t, l_t2i, config.kl.direction)[keep].mean()}
  if config.loss.mlm > 0:
    at_masked = np.take_along_axis(online["mlm"], batch["mlm_positions"][..., None], axis=1)
    terms["mlm"] = np_masked_ce(at_masked, batch["mlm_targets"], batch["mlm_weights"], keep)
  if config.loss.mvm > 0:
    positions = masked_positions(batch["mvm_mask"])
    at_masked = np.take_along_axis(online["mvm"], positions[..., None], axis=1)
    targets = np.take_along_axis(patch_codes(world, state, batch["image"]), positions, axis=1)
    terms["mvm"] = np_masked_ce(at_masked, targets, np.ones(positions.shape), keep)
  return terms


def solved_text_proj(forward_out, image_proj):
  """A text projection under which each caption of the batch embeds exactly as its image:
  text_proj(g_txt_i) = image_proj(g_img_i), solved by least squares (8 pairs, 33 unknowns)."""
  g_img, g_txt = np.float64(forward_out["g_img"]), np.float64(forward_out["g_txt"])
  target = g_img @ image_proj["kernel"] + image_proj["bias"]
  np.testing.assert_allclose(target / np.linalg.norm(target, axis=1, keepdims=True),
                             forward_out["v"], atol=1e-5)  # v is the projected tower global
  solution = np.linalg.lstsq(np.concatenate([g_txt, np.ones((len(g_txt), 1))], 1), target,
                             rcond=None)[0]
  return {"kernel": solution[:-1].astype(np.float32), "bias": solution[-1].astype(np.float32)}


def with_momentum_text_proj(state, text_proj):
  """`state` with params_ema's text projection set so that the step's EMA update yields
  `text_proj` in the momentum towers."""
  state = _tree_copy(state)
  state["params_ema"]["text_proj"] = jax.tree.map(
      lambda target, online: ((target - (1 - DECAY) * np.float64(online)) / DECAY)
      .astype(np.float32), text_proj, state["params"]["text_proj"])
  return state


# ---------------------------------------------------------------------------------- tests


def test_both_queues_receive_the_momentum_keys_of_the_batch_at_the_pointer(world):
  state, batch, b = world.state, world.batch, world.config.input.batch_size
  new_state, _ = world.run()
  momentum = world.forward(ema_after_update(state), batch)
  online = world.forward(state["params"], batch)
  assert np.abs(momentum["t"] - online["t"]).max() > 1e-3  # online keys would be told apart
  stale = world.forward(state["params_ema"], batch)  # momentum towers before their EMA update
  assert np.abs(momentum["v"] - stale["v"]).max() > 1e-3
  queue, old = new_state["queue"], state["queue"]
  written = slice(QUEUE_PTR, QUEUE_PTR + b)
  np.testing.assert_allclose(queue["img"][written], momentum["v"], **TOL)
  np.testing.assert_allclose(queue["txt"][written], momentum["t"], **TOL)
  np.testing.assert_array_equal(queue["idx"][written], batch["image_id"])
  assert queue["valid"][written].all()
  for name in ("img", "txt", "idx", "valid"):
    np.testing.assert_array_equal(queue[name][:QUEUE_PTR], old[name][:QUEUE_PTR])
  assert int(queue["ptr"]) == (QUEUE_PTR + b) % world.config.queue.size == 0


def test_amf_weights_drop_injected_mismatched_pairs_from_itc_kl_mlm_and_mvm(world):
  """The momentum towers are made to align every clean pair exactly (a solved text projection);
  then the captions of the two least alike images are swapped. With statistics starting from
  this batch, AMF drops exactly those two pairs, and each term of the step equals the numpy term
  over the 6 kept pairs (the dropped ones stay in-batch negatives), not the one over all 8; the
  step's catch metrics count the pairs flagged `caption_replaced` that AMF kept."""
  momentum_params = ema_after_update(world.state)
  clean = world.forward(momentum_params, world.batch)
  state = with_momentum_text_proj(world.state,
                                  solved_text_proj(clean, momentum_params["image_proj"]))
  ids = world.batch["image_id"]
  alike = np.where(ids[:, None] == ids[None, :], np.inf, clean["v"] @ clean["v"].T)
  swapped = list(np.unravel_index(np.argmin(alike), alike.shape))
  batch = dict(world.batch)
  for key in CAPTION_KEYS:
    batch[key] = batch[key].copy()
    batch[key][swapped] = world.batch[key][swapped[::-1]]
  momentum = world.forward(ema_after_update(state), batch)
  scores = np.sum(np.float64(momentum["v"]) * momentum["t"], axis=1)
  keep = np.ones(len(scores), bool)
  keep[swapped] = False
  # AMF's rule in numpy: the first batch's statistics are its own; keep s >= mu - lambda sigma.
  threshold = scores.mean() - world.config.amf.lambda_ * scores.std()
  np.testing.assert_array_equal(scores >= threshold, keep)
  margin = np.abs(scores - threshold).min()
  assert margin > 1e-3, (scores, threshold)
  state["amf"] = {"mu": np.float32(0.0), "var": np.float32(0.0), "count": np.int32(0)}
  # As input.caption_noise flags them: the two swapped pairs and one clean pair that AMF keeps.
  replaced = ~keep
  replaced[np.flatnonzero(keep)[0]] = True
  batch["caption_replaced"] = replaced

  new_state, metrics = world.run(state, batch)
  assert metrics["train/amf_kept"] == pytest.approx(keep.mean())
  assert metrics["train/noisy_fraction"] == pytest.approx(3 / 8)
  assert metrics["train/amf_kept_noisy"] == pytest.approx(1 / 3)
  assert metrics["train/amf_kept_clean"] == pytest.approx(1.0)
  np.testing.assert_allclose(new_state["amf"]["mu"], scores.mean(), rtol=1e-5)
  np.testing.assert_allclose(new_state["amf"]["var"], scores.var(), rtol=1e-3)
  assert new_state["queue"]["valid"][QUEUE_PTR:].all()  # filtered pairs are still enqueued
  kept_terms = reference_terms(world, state, batch, keep)
  all_terms = reference_terms(world, state, batch)
  for name in ("itc", "kl_align", "mlm", "mvm"):
    np.testing.assert_allclose(metrics[f"train/{name}"], kept_terms[name], err_msg=name, **TOL)
    # Keeping every pair would be told apart (by more than 10x the tolerance).
    assert abs(all_terms[name] - kept_terms[name]) > 10 * (
        TOL["atol"] + TOL["rtol"] * abs(kept_terms[name])), name


def test_mvm_targets_are_the_frozen_vq_codes_of_the_masked_patches_themselves(world):
  """The target at masked position j is the code of patch j's own pixels (tokenized alone), and
  position j of `mvm_mask` hides exactly those pixels from the image tower."""
  state, batch = world.state, world.batch
  codes = patch_codes(world, state, batch["image"])
  positions = masked_positions(batch["mvm_mask"])
  targets = np.take_along_axis(codes, positions, axis=1)
  assert len(np.unique(codes)) >= 6  # a shifted or misaligned target would be another code
  assert (targets != np.take_along_axis(np.roll(codes, 1, axis=1), positions, axis=1)).mean() > 0.5
  # Mask index j = row-major patch j: the masked patch's pixels never reach the tower, an
  # unmasked patch's do (off the diagonal, row-major and column-major are different patches).
  p = world.config.model.image.patch_size
  cols = world.config.model.image.image_size // p
  diagonal = {r * cols + r for r in range(cols)}
  row = next(i for i in range(len(positions)) if set(positions[i]) - diagonal)
  masked = next(j for j in positions[row] if j not in diagonal)
  unmasked = next(j for j in range(cols * cols) if not batch["mvm_mask"][row, j])
  base = world.forward(state["params"], batch)["mvm"]
  for patch, unseen in ((masked, True), (unmasked, False)):
    image = batch["image"].copy()
    r, c = divmod(patch, cols)
    image[row, r * p:(r + 1) * p, c * p:(c + 1) * p] += 0.5
    moved = world.forward(state["params"], dict(batch, image=image))["mvm"]
    assert np.allclose(moved, base, atol=1e-6) == unseen, (patch, unseen)

  _, metrics = world.run()
  assert metrics["train/amf_kept"] == 1.0
  online = world.forward(state["params"], batch)
  at_masked = np.take_along_axis(online["mvm"], positions[..., None], axis=1)
  want = np_masked_ce(at_masked, targets, np.ones(positions.shape), np.ones(len(targets), bool))
  np.testing.assert_allclose(metrics["train/mvm"], want, **TOL)


def test_kl_term_matches_the_symmetric_kl_of_the_i2t_and_t2i_distributions(world):
  state, batch, config = world.state, world.batch, world.config
  assert config.kl.direction == "sym" and config.queue.in_batch_negatives
  _, metrics = world.run()
  online, momentum = world.forward(state["params"], batch), world.forward(
      ema_after_update(state), batch)
  queue, temp = state["queue"], config.temp.init
  l_i2t = np_logits(online["v"], momentum["t"], queue["txt"], queue["valid"], temp, True)
  l_t2i = np_logits(online["t"], momentum["v"], queue["img"], queue["valid"], temp, True)
  want = np_kl_rows(l_i2t, l_t2i, "sym").mean()
  np.testing.assert_allclose(metrics["train/kl_align"], want, **TOL)
  assert want > 1e-2


def test_kl_term_is_zero_when_the_image_and_text_towers_embed_identically(world):
  """Method item 32: projections solved so that every caption embeds exactly as its image, in
  the online and in the (EMA-updated) momentum towers, and queues whose image and text keys
  are the same (as identical towers fill them): p = q, so KL = 0, while ITC is not."""
  state = _tree_copy(world.state)
  online = world.forward(state["params"], world.batch)
  state["params"]["text_proj"] = solved_text_proj(online, state["params"]["image_proj"])
  momentum = world.forward(ema_after_update(state), world.batch)
  state = with_momentum_text_proj(
      state, solved_text_proj(momentum, ema_after_update(state)["image_proj"]))
  state["queue"]["txt"] = state["queue"]["img"].copy()
  online, momentum = (world.forward(p, world.batch) for p in (state["params"],
                                                              ema_after_update(state)))
  np.testing.assert_allclose(online["t"], online["v"], atol=1e-5)
  np.testing.assert_allclose(momentum["t"], momentum["v"], atol=1e-5)
  assert np.abs(online["v"] - momentum["v"]).max() > 1e-3  # yet online and momentum differ

  _, metrics = world.run(state)
  assert abs(metrics["train/kl_align"]) < 1e-6
  assert metrics["train/itc"] > 0.1
  np.testing.assert_allclose(metrics["train/itc"], reference_terms(world, state,
                                                                   world.batch)["itc"], **TOL)


def test_total_loss_is_the_weighted_sum_of_independently_computed_terms(world):
  _, metrics = world.run()
  terms = reference_terms(world, world.state, world.batch)
  assert sorted(k for k in metrics if k.removeprefix("train/") in terms) == sorted(
      f"train/{name}" for name in WEIGHTS)
  want = sum(WEIGHTS[name] * value for name, value in terms.items())
  np.testing.assert_allclose(metrics["train/loss"], want, **TOL)
  for name, value in terms.items():
    np.testing.assert_allclose(metrics[f"train/{name}"], value, err_msg=name, **TOL)


def test_directional_kl_and_itc_in_the_one_plus_k_layout(world):
  """kl.direction = i2t_to_t2i is KL(p || q), p the image-to-text distribution, and the BriVL
  layout (positive at column 0, queue negatives only) for ITC and KL; the same state, another
  step of the real `make_update_fn`."""
  config = state_lib.prepare_config(objectives_config(**{
      "queue.in_batch_negatives": False, "kl.direction": "i2t_to_t2i", "loss.mlm": 0.0,
      "loss.mvm": 0.0}))
  update = jax.jit(step_lib.make_update_fn(config, world.model, world.optimizer))
  _, metrics = world.run(update=update)
  terms = reference_terms(world, world.state, world.batch, config=config)
  np.testing.assert_allclose(metrics["train/kl_align"], terms["kl_align"], **TOL)
  np.testing.assert_allclose(metrics["train/itc"], terms["itc"], **TOL)
  np.testing.assert_allclose(metrics["train/loss"], WEIGHTS["itc"] * terms["itc"]
                             + WEIGHTS["kl_align"] * terms["kl_align"], **TOL)
  assert "train/mlm" not in metrics and "train/mvm" not in metrics
  reverse = reference_terms(world, world.state, world.batch,
                            config=objectives_config(**{
                                "queue.in_batch_negatives": False, "kl.direction": "t2i_to_i2t",
                                "loss.mlm": 0.0, "loss.mvm": 0.0}))
  assert abs(reverse["kl_align"] - terms["kl_align"]) > 1e-2 * terms["kl_align"]


def test_multi_positive_itc_counts_the_queued_caption_of_the_same_image_as_a_positive(world):
  """Pre-training with queue.multi_positive: a queue slot holding another caption of pair 0's
  image is a positive of pair 0 (ALBEF idx_queue); the loss is the numpy cross-entropy against
  the target spread over the row's positives, and differs from the single-positive loss."""
  config = state_lib.prepare_config(objectives_config(**{
      "queue.multi_positive": True, "loss.mlm": 0.0, "loss.mvm": 0.0, "loss.kl_align": 0.0}))
  state = _tree_copy(world.state)
  state["queue"]["idx"][[1, 5]] = world.batch["image_id"][0]  # slot 1 valid, slot 5 valid
  state["queue"]["idx"][3] = world.batch["image_id"][0]  # an invalid slot is never a positive
  update = jax.jit(step_lib.make_update_fn(config, world.model, world.optimizer))
  _, metrics = world.run(state=state, update=update)

  online, momentum = world.forward(state["params"], world.batch), world.forward(
      ema_after_update(state), world.batch)
  queue, temp, ids = state["queue"], config.temp.init, world.batch["image_id"]
  l_i2t = np_logits(online["v"], momentum["t"], queue["txt"], queue["valid"], temp, True)
  l_t2i = np_logits(online["t"], momentum["v"], queue["img"], queue["valid"], temp, True)
  match = np.concatenate([ids[:, None] == ids[None, :],
                          (ids[:, None] == queue["idx"][None, :]) & queue["valid"][None, :]], 1)
  b = len(ids)
  assert match[0, b + 1] and match[0, b + 5] and not match[0, b + 3]
  target = match / match.sum(1, keepdims=True)

  def cross_entropy(logits):
    log_p = np_log_softmax(logits)
    return -np.sum(np.where(target > 0, target * log_p, 0.0), axis=1)

  itc = 0.5 * (cross_entropy(l_i2t) + cross_entropy(l_t2i))
  np.testing.assert_allclose(metrics["train/itc"], itc.mean(), **TOL)
  single = reference_terms(world, state, world.batch, config=config)["itc"]
  assert abs(metrics["train/itc"] - single) > 1e-3


def test_amf_catch_metrics_match_numpy():
  rng = np.random.default_rng(0)
  weights = (rng.random(64) < 0.7).astype(np.float32)
  replaced = rng.random(64) < 0.3
  metrics = jax.device_get(step_lib.amf_catch_metrics(jnp.asarray(weights),
                                                      jnp.asarray(replaced)))
  assert metrics["train/noisy_fraction"] == pytest.approx(replaced.mean())
  assert metrics["train/amf_kept_noisy"] == pytest.approx(weights[replaced].mean())
  assert metrics["train/amf_kept_clean"] == pytest.approx(weights[~replaced].mean())
  none = jax.device_get(step_lib.amf_catch_metrics(jnp.ones(4), jnp.zeros(4, bool)))
  assert (none["train/noisy_fraction"], none["train/amf_kept_noisy"]) == (0.0, 1.0)
