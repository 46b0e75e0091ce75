"""COOKIE (method §2): the weight-sharing transformer, the three contrastive terms in the step
against numpy, the config's checks, and a runlocal COOKIE run end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cookie_pretrain
from cots_jax import config_validation
from cots_jax.models import cots as cots_model
from cots_jax.models import wst
from support import build, run_module, tiny_config, tiny_flags


def cookie_config(arg="runlocal", **overrides):
  """configs/cookie_pretrain.py shrunk to the suite's tiny towers, a 1-layer WST."""
  return tiny_config(cookie_pretrain.get_config(arg), **{"model.wst_layers": 1, **overrides})


def init_params(config, seed=0):
  model = cots_model.CotsModel.from_config(config)
  size, length = config.model.image.image_size, config.input.max_len
  patches = (size // config.model.image.patch_size) ** 2
  params = model.init(jax.random.key(seed), jnp.zeros((2, size, size, 3)),
                      jnp.ones((2, length), jnp.int32), jnp.ones((2, length), jnp.int32),
                      jnp.zeros((2, patches), bool))["params"]
  return model, params


def np_info_nce(a, b, temp):
  """½[CE(a bᵀ/τ, diag) + CE(b aᵀ/τ, diag)] per row, float64."""
  a, b = np.float64(a), np.float64(b)

  def ce_rows(logits):
    top = logits.max(1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    return log_z - np.diag(logits)

  return 0.5 * (ce_rows(a @ b.T / temp) + ce_rows(b @ a.T / temp))


# ------------------------------------------------------------------------------------ the WST


def test_shared_wst_is_one_parameter_set_serving_both_modalities():
  config = cookie_config(**{"model.wst_modality_embed": False})
  model, params = init_params(config)
  assert "wst" in params and "wst_image" not in params and "wst_text" not in params
  # Literally the same function: one token sequence gives the same output as image and as text.
  tokens = jax.random.normal(jax.random.key(1), (2, 5, config.model.text.width))
  as_image = model.apply({"params": params}, "image", tokens, None, method=model.wst_tokens)
  as_text = model.apply({"params": params}, "text", tokens, jnp.ones((2, 5)),
                        method=model.wst_tokens)
  np.testing.assert_array_equal(as_image, as_text)

  # Both modalities train the same leaves, and both embeddings go through them.
  def output_sum(wst_params, modality, mask):
    return jnp.sum(model.apply({"params": {**params, "wst": wst_params}}, modality, tokens, mask,
                               method=model.wst_tokens) ** 3)

  for modality, mask in (("image", None), ("text", jnp.ones((2, 5)))):
    grads = jax.grad(output_sum)(params["wst"], modality, mask)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["block_0"]))
  batch = _fake_batch(config)
  moved = {**params, "wst": jax.tree.map(lambda x: x * 1.5, params["wst"])}
  for method, args in ((model.image_embedding, (batch["image"][:2],)),
                       (model.text_embedding, (batch["text_ids"][:2], batch["text_mask"][:2]))):
    before, after = (model.apply({"params": p}, *args, method=method)[0] for p in (params, moved))
    assert np.abs(np.asarray(before) - np.asarray(after)).max() > 1e-3


def test_unshared_wst_has_one_stack_per_modality_of_the_same_size():
  config = cookie_config(**{"model.wst_shared": False})
  model, params = init_params(config)
  assert "wst" not in params
  shapes = [jax.tree.map(jnp.shape, params[name]) for name in ("wst_image", "wst_text")]
  assert shapes[0] == shapes[1]
  assert shapes[0]["modality_embed"] == (1, config.model.text.width)
  _, shared = init_params(cookie_config())
  assert shared["wst"]["modality_embed"].shape == (2, config.model.text.width)
  blocks = lambda tree: {k: v for k, v in tree.items() if k.startswith("block")}  # noqa: E731
  assert jax.tree.map(jnp.shape, blocks(shared["wst"])) == blocks(shapes[0])
  tokens = jax.random.normal(jax.random.key(1), (2, 5, config.model.text.width))
  outputs = [model.apply({"params": params}, modality, tokens, None, method=model.wst_tokens)
             for modality in ("image", "text")]
  assert not np.allclose(outputs[0], outputs[1])


def test_a_tower_of_another_width_is_projected_to_the_wst_width():
  config = cookie_config(**{"model.image.width": 48, "model.image.heads": 2})
  _, params = init_params(config)
  assert params["wst"]["image_input"]["kernel"].shape == (48, config.model.text.width)
  assert "text_input" not in params["wst"]
  config = cookie_config(**{"model.wst_width": 24, "model.wst_heads": 3})
  _, params = init_params(config)
  assert params["wst"]["text_input"]["kernel"].shape == (32, 24)
  assert params["wst"]["norm"]["scale"].shape == (24,)


def test_wst_refuses_a_modality_it_does_not_serve():
  stack = wst.WeightSharingTransformer(("image",), width=8, depth=1, heads=2, mlp_dim=16)
  tokens = jnp.zeros((1, 3, 8))
  params = stack.init(jax.random.key(0), tokens, None, "image")
  with pytest.raises(ValueError, match=r"serves \('image',\), not 'text'"):
    stack.apply(params, tokens, None, "text")


def test_the_modality_embedding_tells_the_modalities_apart():
  stack = wst.WeightSharingTransformer(wst.MODALITIES, width=8, depth=1, heads=2, mlp_dim=16)
  tokens = jax.random.normal(jax.random.key(0), (2, 3, 8))
  params = stack.init(jax.random.key(1), tokens, None, "image")
  assert params["params"]["modality_embed"].shape == (2, 8)
  as_image, as_text = (stack.apply(params, tokens, None, modality) for modality in wst.MODALITIES)
  assert np.abs(np.asarray(as_image) - np.asarray(as_text)).max() > 1e-4


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_padding_tokens_never_change_the_text_output(pool):
  config = cookie_config(**{"model.wst_pool": pool})
  model, params = init_params(config)
  batch = _fake_batch(config)
  mask = np.asarray(batch["text_mask"])
  other_ids = np.where(mask > 0, batch["text_ids"], (np.asarray(batch["text_ids"]) * 7 + 11)
                       % config.model.text.vocab_size)
  embed = lambda ids: model.apply({"params": params}, ids, mask,  # noqa: E731
                                  method=model.text_embedding)[0]
  np.testing.assert_allclose(embed(other_ids), embed(batch["text_ids"]), atol=1e-6)
  # The WST alone: anything at padded positions leaves the real tokens' outputs unchanged.
  hidden = np.asarray(jax.random.normal(jax.random.key(2), (*mask.shape, 32)))
  garbage = np.where(mask[..., None] > 0, hidden, 1e3)
  out = [np.asarray(model.apply({"params": params}, "text", h, mask, method=model.wst_tokens))
         for h in (hidden, garbage)]
  np.testing.assert_allclose(out[1][mask > 0], out[0][mask > 0], atol=1e-5)


# ---------------------------------------------------------------------------- the step's terms


def _fake_batch(config, seed=0):
  """A training batch of `config` with random pixels, captions of varied length, a second view."""
  rng = np.random.default_rng(seed)
  b, size, length = config.input.batch_size, config.model.image.image_size, config.input.max_len
  lengths = rng.integers(4, length + 1, size=b)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  return {"image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
          "image_view": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
          "text_ids": np.where(mask > 0, rng.integers(1000, 2000, (b, length)), 0).astype(np.int32),
          "text_mask": mask, "image_id": np.arange(b, dtype=np.int32),
          "skipped": np.zeros(b, np.int32)}


def _step_terms(config, batch):
  """One jitted step of `config` on `batch` -> (metrics, params and rng key the step used)."""
  state, update_fn, _ = build(config)
  _, metrics = jax.jit(update_fn)(state, batch)
  return metrics, jax.device_get(state["params"]), state["rng"]


def test_cross_model_terms_match_numpy():
  config = cookie_config("runlocal,intra=cross_model")
  batch = _fake_batch(config)
  metrics, params, _ = _step_terms(config, batch)
  model = cots_model.CotsModel.from_config(config)
  apply = lambda method, *args: model.apply({"params": params}, *args, method=method)  # noqa: E731
  v, image_global = apply(model.image_embedding, batch["image"])
  t, text_global = apply(model.text_embedding, batch["text_ids"], batch["text_mask"])
  v_enc, t_enc = apply(model.encoder_embeddings, image_global, text_global)
  temp = config.temp.init
  want = {"cookie_cm": np_info_nce(v, t, temp), "cookie_vv": np_info_nce(v, v_enc, temp),
          "cookie_tt": np_info_nce(t, t_enc, temp)}
  for name, per_pair in want.items():
    np.testing.assert_allclose(float(metrics[f"train/{name}"]), per_pair.mean(), rtol=1e-4)
  assert float(metrics["train/loss"]) == pytest.approx(sum(v.mean() for v in want.values()),
                                                       rel=1e-4)
  assert "train/itc" not in metrics and "train/mlm" not in metrics


def test_views_terms_match_numpy_with_two_views_and_two_dropout_passes():
  config = cookie_config()
  assert config.model.text.dropout > 0 and config.input.second_view
  batch = _fake_batch(config)
  metrics, params, state_rng = _step_terms(config, batch)
  model = cots_model.CotsModel.from_config(config)
  # The step's key layout (step.make_update_fn): state rng -> step key -> (clean, mlm, mvm,
  # intra); clean -> (image, text); intra -> (view, second text pass).
  step_key = jax.random.split(state_rng)[1]
  clean, _, _, intra = jax.random.split(step_key, 4)
  (image_key, text_key), (view_key, text2_key) = map(jax.random.split, (clean, intra))

  def embed(method, key, *args):
    return np.asarray(model.apply({"params": params}, *args, method=method, train=True,
                                  rngs={"dropout": key})[0])

  v = embed(model.image_embedding, image_key, batch["image"])
  v_view = embed(model.image_embedding, view_key, batch["image_view"])
  t = embed(model.text_embedding, text_key, batch["text_ids"], batch["text_mask"])
  t_again = embed(model.text_embedding, text2_key, batch["text_ids"], batch["text_mask"])
  assert np.abs(t - t_again).max() > 1e-3  # dropout really differs between the two passes
  temp = config.temp.init
  want = {"cookie_cm": np_info_nce(v, t, temp), "cookie_vv": np_info_nce(v, v_view, temp),
          "cookie_tt": np_info_nce(t, t_again, config.loss.cookie_text_temp)}
  for name, per_pair in want.items():
    np.testing.assert_allclose(float(metrics[f"train/{name}"]), per_pair.mean(), rtol=1e-4)


def test_queued_cross_modal_term_is_the_itc_term():
  """cookie_use_queue: L_cm is the ITC term over momentum keys and the queue (method §4.18), not
  the online in-batch InfoNCE."""
  queued = cookie_config(**{"loss.cookie_vv": 0.0, "loss.cookie_tt": 0.0,
                            "loss.cookie_use_queue": True})
  itc = cookie_config(**{"loss.cookie_vv": 0.0, "loss.cookie_tt": 0.0, "loss.cookie_cm": 0.0,
                         "loss.itc": 1.0})
  batch = _fake_batch(queued)
  (metrics, params, _), (itc_metrics, _, _) = (_step_terms(c, batch) for c in (queued, itc))
  assert float(metrics["train/cookie_cm"]) == pytest.approx(float(itc_metrics["train/itc"]),
                                                            rel=1e-6)
  model = cots_model.CotsModel.from_config(queued)
  v = model.apply({"params": params}, batch["image"], method=model.image_embedding)[0]
  t = model.apply({"params": params}, batch["text_ids"], batch["text_mask"],
                  method=model.text_embedding)[0]
  assert float(metrics["train/cookie_cm"]) != pytest.approx(np_info_nce(v, t, 0.07).mean(),
                                                            rel=1e-4)


def test_the_wst_works_with_the_cots_objectives():
  """COTS's full objective (ITC with queues, KL, MLM, MVM, AMF) with the WST: the momentum WST
  follows by EMA and the queue holds the WST-level momentum keys."""
  config = tiny_config(**{"model.use_wst": True, "model.wst_layers": 1})
  state, update_fn, batches = build(config)
  new_state, metrics = jax.jit(update_fn)(state, batches[0])
  for name in ("itc", "kl_align", "mlm", "mvm"):
    assert np.isfinite(float(metrics[f"train/{name}"])), name
  m = config.momentum.decay
  np.testing.assert_allclose(
      new_state["params_ema"]["wst"]["norm"]["scale"],
      m * state["params_ema"]["wst"]["norm"]["scale"]
      + (1 - m) * state["params"]["wst"]["norm"]["scale"],
      rtol=1e-6)
  model = cots_model.CotsModel.from_config(config)
  keys = model.apply({"params": new_state["params_ema"]}, batches[0]["image"],
                     method=model.image_embedding)[0]
  np.testing.assert_allclose(new_state["queue"]["img"][:config.input.batch_size], keys,
                             rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    ({"model.use_wst": False, "loss.cookie_intra_mode": "cross_model", "input.second_view": False},
     r"config.loss.cookie_intra_mode='cross_model' compares .* needs config.model.use_wst=True"),
    ({"input.second_view": False},
     r"config.loss.cookie_vv=1.0 in 'views' mode needs .* config.input.second_view=True"),
    ({"model.text.dropout": 0.0},
     r"config.loss.cookie_tt=1.0 in 'views' mode .*config.model.text.dropout"),
    ({"loss.cookie_use_queue": True, "loss.itc": 1.0},
     r"config.loss.cookie_use_queue=True makes .* set one of loss.itc and loss.cookie_cm to 0"),
    ({"loss.cookie_use_queue": True, "queue.in_batch_negatives": False},
     r"needs config.queue.in_batch_negatives=True"),
    ({"loss.cookie_intra_mode": "both"}, r"config.loss.cookie_intra_mode='both' must be one of"),
    ({"model.wst_pool": "max"}, r"config.model.wst_pool='max' must be one of"),
    ({"model.wst_heads": 5}, r"config.model.wst_width=0 \(0 = the text width\) gives 32, not "
                             r"divisible by 5 WST heads"),
])
def test_config_checks_name_the_field(overrides, message):
  config = cookie_config(**overrides)
  with pytest.raises(ValueError, match=message):
    config_validation.validate(config)


def test_cookie_config_variants():
  for arg in ("", "runlocal", "intra=cross_model", "data=flickr8k", "model=base"):
    config_validation.validate(cookie_pretrain.get_config(arg))
  cross = cookie_pretrain.get_config("intra=cross_model")
  assert not cross.input.second_view and cross.loss.cookie_intra_mode == "cross_model"
  assert cookie_pretrain.get_config("data=flickr8k").input.view_flip_prob == 0.5
  assert cookie_pretrain.get_config("model=base").model.wst_pool == "cls"
  with pytest.raises(ValueError, match="config arg intra='both' is unknown"):
    cookie_pretrain.get_config("intra=both")


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_runlocal_cookie_run_trains_and_reports_every_evaluator(tmp_path):
  flags = tiny_flags(**{"total_steps": 30, "log_every": 1, "checkpoint_every": 0,
                        "model.wst_layers": 1, "input.data.num_train_images": 200})
  result = run_module("cots_jax.main", "--config=configs/cookie_pretrain.py:runlocal",
                      f"--workdir={tmp_path}", *flags)
  assert "no VQ tokenizer is trained" in result.stderr + result.stdout
  final = json.loads((tmp_path / "final_eval.json").read_text())
  for key in ("eval/retrieval/t2i_r1", "eval/text_matching/r1", "eval/image_instance/r10"):
    assert key in final, sorted(final)
  # COOKIE's in-batch terms read no momentum encoder: none is kept, and none is evaluated.
  assert not any("_momentum/" in key for key in final), sorted(final)
  assert "evals report the online encoder only" in (tmp_path / "log.txt").read_text()
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  # Single-batch losses are noisy: the last ten steps' mean against the first ten's.
  assert len(losses) == 30 and all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
