"""Tests of the VQ tokenizer (cots_jax/models/vq.py) against numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.common import base_config
from cots_jax import vq_trainer
from cots_jax.models import vq


def _init(model, *args):
  """Jitted init (one compilation instead of one per eager op) -> params."""
  return jax.jit(model.init)(jax.random.key(0), *args)["params"]


def _apply(model, params, *args, method=None):
  """Jitted `model.apply` of `method` (None = __call__)."""
  return jax.jit(model.apply, static_argnames="method")({"params": params}, *args, method=method)


def _config(mode="ema", patch=4, codebook=32):
  config = base_config("tiny")
  config.model.image.patch_size = patch
  config.vq.hidden = 32
  config.vq.code_dim = 8
  config.vq.codebook_size = codebook
  config.vq.codebook_update = mode
  return config


def _colour_blocks(rng, batch, size, patch):
  """`[batch, size, size, 3]` images whose patches are each one uniform random colour."""
  grid = size // patch
  colours = rng.uniform(0.0, 1.0, (batch, grid, grid, 3)).astype(np.float32)
  return np.repeat(np.repeat(colours, patch, axis=1), patch, axis=2)


def _np_perplexity(codes, size):
  counts = np.bincount(np.asarray(codes).ravel(), minlength=size).astype(np.float64)
  probs = counts[counts > 0] / counts.sum()
  return float(np.exp(-np.sum(probs * np.log(probs))))


@pytest.mark.parametrize("height,width,patch", [(8, 12, 4), (16, 16, 8), (18, 12, 6)])
def test_tokenizer_shapes_give_one_code_per_patch(height, width, patch):
  model = vq.VQTokenizer(patch_size=patch, hidden=16, code_dim=4, codebook_size=10)
  images = jax.random.uniform(jax.random.key(0), (2, height, width, 3))
  params = _init(model, images)
  out = _apply(model, params, images)
  grid = (height // patch, width // patch)
  assert out["recon"].shape == images.shape
  assert out["z_e"].shape == out["z_q"].shape == (2, *grid, 4)
  assert out["codes"].shape == (2, *grid)
  tokens = _apply(model, params, images, method="tokenize")
  assert tokens.shape == (2, grid[0] * grid[1]) and tokens.dtype == jnp.int32
  np.testing.assert_array_equal(tokens, np.asarray(out["codes"]).reshape(2, -1))
  assert 0 <= int(tokens.min()) and int(tokens.max()) < 10
  decoded = _apply(model, params, out["z_q"], method="decode")
  np.testing.assert_allclose(decoded, out["recon"], atol=1e-6)


def test_encode_rejects_size_not_multiple_of_patch():
  model = vq.VQTokenizer(patch_size=4, hidden=8, code_dim=4, codebook_size=5)
  params = _init(model, jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="multiple of the patch size 4"):
    _apply(model, params, jnp.zeros((1, 10, 8, 3)), method="encode")


def test_quantize_picks_nearest_code_and_passes_gradient_straight_through():
  model = vq.VQTokenizer(patch_size=2, hidden=8, code_dim=3, codebook_size=7)
  params = _init(model, jnp.zeros((1, 4, 4, 3)))
  z_e = jax.random.normal(jax.random.key(1), (2, 2, 2, 3))
  z_q, codes = _apply(model, params, z_e, method="quantize")

  codebook = np.asarray(params["codebook"])
  dist = ((np.asarray(z_e)[..., None, :] - codebook) ** 2).sum(-1)
  np.testing.assert_array_equal(codes, dist.argmin(-1))
  np.testing.assert_allclose(z_q, codebook[np.asarray(codes)], atol=1e-6)

  weights = jax.random.normal(jax.random.key(2), z_e.shape)
  objective = lambda p, z: jnp.sum(weights * model.apply({"params": p}, z, method="quantize")[0])
  grad_params, grad_z = jax.jit(jax.grad(objective, argnums=(0, 1)))(params, z_e)
  np.testing.assert_allclose(grad_z, weights, atol=1e-6)
  assert not np.any(np.asarray(grad_params["codebook"]))


def test_reconstruction_gradient_reaches_encoder_not_codebook():
  model = vq.VQTokenizer(patch_size=2, hidden=8, code_dim=3, codebook_size=7)
  images = jax.random.uniform(jax.random.key(0), (2, 4, 4, 3))
  params = _init(model, images)
  loss = lambda p: jnp.mean((model.apply({"params": p}, images)["recon"] - images) ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  encoder_norm = optax.tree.norm(grads["encoder"])
  assert float(encoder_norm) > 1e-6
  assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["encoder"]))
  assert not np.any(np.asarray(grads["codebook"]))


def test_nearest_codes_matches_numpy():
  rng = np.random.default_rng(0)
  z, codebook = rng.normal(size=(5, 6, 4)), rng.normal(size=(9, 4))
  expected = ((z[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)
  np.testing.assert_array_equal(vq.nearest_codes(jnp.asarray(z), jnp.asarray(codebook)), expected)


def test_codebook_perplexity_matches_numpy():
  rng = np.random.default_rng(1)
  codes = rng.integers(0, 6, size=(4, 9))  # codes 6..9 of the 10 never occur.
  np.testing.assert_allclose(vq.codebook_perplexity(jnp.asarray(codes), 10),
                             _np_perplexity(codes, 10), rtol=1e-5)
  np.testing.assert_allclose(vq.codebook_perplexity(jnp.arange(8), 8), 8.0, rtol=1e-5)
  np.testing.assert_allclose(vq.codebook_perplexity(jnp.full((5,), 3), 8), 1.0, rtol=1e-6)


def test_ema_codebook_update_matches_numpy():
  rng = np.random.default_rng(2)
  num_codes, dim, decay, eps = 5, 3, 0.9, 1e-5
  usage = rng.uniform(0, 3, num_codes).astype(np.float32)
  embed_sum = rng.normal(size=(num_codes, dim)).astype(np.float32)
  z = rng.normal(size=(11, dim)).astype(np.float32)
  codes = rng.integers(0, num_codes - 1, 11)  # the last code gets no vector this step.

  counts = np.zeros(num_codes)
  sums = np.zeros((num_codes, dim))
  for vector, code in zip(z, codes):
    counts[code] += 1
    sums[code] += vector
  want_usage = decay * usage + (1 - decay) * counts
  want_sum = decay * embed_sum + (1 - decay) * sums
  total = want_usage.sum()
  smoothed = (want_usage + eps) / (total + num_codes * eps) * total
  want_codebook = want_sum / smoothed[:, None]

  got_usage, got_sum, got_codebook = vq_trainer.ema_codebook_update(
      jnp.asarray(usage), jnp.asarray(embed_sum), jnp.asarray(z), jnp.asarray(codes), decay)
  np.testing.assert_allclose(got_usage, want_usage, rtol=1e-5)
  np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_codebook, want_codebook, rtol=1e-4, atol=1e-6)


def test_usage_update_matches_numpy():
  usage = np.array([1.0, 0.0, 2.0, 0.5], np.float32)
  codes = np.array([0, 2, 2, 3, 2])
  want = 0.8 * usage + 0.2 * np.array([1, 0, 3, 1])
  np.testing.assert_allclose(vq_trainer.usage_update(jnp.asarray(usage), jnp.asarray(codes), 0.8),
                             want, rtol=1e-6)


@pytest.mark.parametrize("mode", ["ema", "st"])
def test_revive_dead_codes_reseeds_exactly_the_dead_codes(mode):
  rng = np.random.default_rng(3)
  num_codes, dim, threshold = 6, 4, 1.0
  codebook = rng.normal(size=(num_codes, dim)).astype(np.float32)
  usage = np.array([5.0, 0.2, 1.0, 0.0, 3.0, 0.99], np.float32)
  z = rng.normal(size=(20, dim)).astype(np.float32) + 10.0  # far from every old code.
  state = {"params": {"codebook": jnp.asarray(codebook)}, "usage": jnp.asarray(usage)}
  if mode == "ema":
    state["embed_sum"] = jnp.asarray(codebook * usage[:, None])

  new_state, dead = vq_trainer.revive_dead_codes(state, jnp.asarray(z), threshold,
                                                 jax.random.key(0))
  want_dead = usage < threshold
  np.testing.assert_array_equal(dead, want_dead)
  new_codebook = np.asarray(new_state["params"]["codebook"])
  np.testing.assert_array_equal(new_codebook[~want_dead], codebook[~want_dead])
  sources = [int(np.flatnonzero((z == row).all(-1))[0]) for row in new_codebook[want_dead]
             if (z == row).all(-1).any()]
  assert len(sources) == want_dead.sum(), "every dead code must be a row of z"
  assert len(set(sources)) == len(sources), "drawn without replacement"
  np.testing.assert_array_equal(new_state["usage"], np.where(want_dead, threshold, usage))
  if mode == "ema":
    want_sum = np.where(want_dead[:, None], threshold * new_codebook, codebook * usage[:, None])
    np.testing.assert_allclose(new_state["embed_sum"], want_sum, rtol=1e-6)
  else:
    assert "embed_sum" not in new_state


def test_init_vq_state_layout_and_errors():
  config = _config("ema")
  state = vq_trainer.init_vq_state(config, jax.random.key(0), (16, 16, 3))
  assert set(state) == {"params", "usage", "embed_sum"}
  assert state["params"]["codebook"].shape == (32, 8)
  assert state["embed_sum"].shape == (32, 8) and not np.any(np.asarray(state["usage"]))
  assert vq_trainer.tokenizer_params(state) is state["params"]

  assert set(vq_trainer.init_vq_state(_config("st"), jax.random.key(0), (16, 16, 3))) == {
      "params", "usage"}
  with pytest.raises(ValueError, match=r"codebook_update must be one of \('ema', 'st'\)"):
    vq_trainer.init_vq_state(_config("kmeans"), jax.random.key(0), (16, 16, 3))


def _one_step(mode):
  config = _config(mode)
  optimizer = optax.adam(config.vq.lr)
  images = jnp.asarray(_colour_blocks(np.random.default_rng(4), 8, 16, 4))
  state = vq_trainer.init_vq_state(config, jax.random.key(0), images.shape[1:])
  opt_state = optimizer.init(state["params"])
  step = jax.jit(functools.partial(vq_trainer.vq_train_step, config=config, optimizer=optimizer))
  new_state, _, metrics = step(state, opt_state, images, jax.random.key(1))
  model = vq.VQTokenizer.from_config(config)
  z_e = _apply(model, state["params"], images, method="encode").reshape(-1, 8)
  return config, state, new_state, metrics, np.asarray(z_e)


def test_first_ema_step_seeds_whole_codebook_from_encoder_outputs():
  config, _, new_state, metrics, z_e = _one_step("ema")
  assert int(metrics["dead_codes"]) == config.vq.codebook_size  # usage 0.01 * count < 1.
  codebook = np.asarray(new_state["params"]["codebook"])
  matches = np.abs(codebook[:, None, :] - z_e[None]).max(-1).min(-1)
  np.testing.assert_array_less(matches, 1e-5)
  np.testing.assert_allclose(new_state["embed_sum"], codebook * config.vq.dead_code_threshold,
                             rtol=1e-6)
  assert {"loss", "recon_mse", "commitment", "perplexity", "dead_codes"} <= set(metrics)
  assert "codebook_loss" not in metrics


def test_st_step_learns_codebook_by_gradient():
  config, state, new_state, metrics, _ = _one_step("st")
  assert "codebook_loss" in metrics and float(metrics["codebook_loss"]) > 0
  np.testing.assert_allclose(
      metrics["loss"],
      metrics["recon_mse"] + config.vq.commitment * metrics["commitment"]
      + metrics["codebook_loss"], rtol=1e-5)
  assert "embed_sum" not in new_state
  changed = optax.tree.norm(jax.tree.map(lambda a, b: a - b, new_state["params"]["encoder"],
                                           state["params"]["encoder"]))
  assert float(changed) > 0


@pytest.mark.parametrize("mode", ["ema", "st"])
def test_train_vq_beats_mean_colour_and_uses_the_codebook(mode):
  config = _config(mode, patch=4, codebook=32)
  config.vq.log_every = 100
  config.vq.lr = 3e-3
  rng = np.random.default_rng(5)
  batches = (_colour_blocks(rng, 32, 16, 4) for _ in range(250))
  logged = []
  state = vq_trainer.train_vq(config, batches, steps=250, log_fn=lambda s, m: logged.append((s, m)))
  assert [s for s, _ in logged] == [100, 200, 250]
  assert all(np.isfinite(m["recon_mse"]) for _, m in logged)

  eval_images = _colour_blocks(np.random.default_rng(6), 64, 16, 4)
  model = vq.VQTokenizer.from_config(config)
  params = vq_trainer.tokenizer_params(state)
  recon = np.asarray(_apply(model, params, eval_images)["recon"])
  codes = np.asarray(_apply(model, params, eval_images, method="tokenize"))
  recon_mse = np.mean((recon - eval_images) ** 2)
  mean_colour_mse = np.mean((eval_images - eval_images.mean((1, 2), keepdims=True)) ** 2)
  # 32 codes for a uniform colour cube quantise to ~1/8 of the mean-colour error.
  assert recon_mse < 0.25 * mean_colour_mse, (recon_mse, mean_colour_mse)
  assert _np_perplexity(codes, 32) > 0.5 * 32
