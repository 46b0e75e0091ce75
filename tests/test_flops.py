"""The analytic FLOP model against XLA's compiled cost analysis of the real computations."""


import jax
import jax.numpy as jnp
import pytest

from configs import common
from cots_jax import flops
from cots_jax import state as state_lib
from cots_jax import step as step_lib
from cots_jax.models import vit


def _config():
  config = common.base_config("tiny")
  config.model.image.image_size, config.model.image.patch_size = 32, 8
  config.model.image.width = config.model.text.width = 128
  config.model.image.depth = config.model.text.depth = 2
  config.model.image.heads = config.model.text.heads = 4
  config.model.text.vocab_size = 1000
  config.input.batch_size, config.queue.size = 8, 64
  return config


def _xla_flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_transformer_forward_flops_counts_the_matmuls():
  tokens, width, depth, ratio = 17, 64, 2, 4.0
  expected = depth * (2 * tokens * width * 3 * width + 2 * tokens * tokens * width * 2
                      + 2 * tokens * width * width + 2 * 2 * tokens * width * ratio * width)
  assert flops.transformer_forward_flops(tokens, width, depth, ratio) == expected


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_image_tower_flops_match_xla_within_ten_percent(stem):
  config = _config()
  config.model.image.stem = stem
  model = vit.ViT.from_config(config.model.image, jnp.float32)
  images = jnp.zeros((1, 32, 32, 3))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  xla = _xla_flops(lambda p, x: model.apply(p, x), params, images)
  assert flops.image_tower_forward_flops(config) == pytest.approx(xla, rel=0.1)


LOCKED_TEXT = {"model.text.locked": "all", "model.text.lock_random_ok": True}
LIT = {"loss.itc": 0.0, "loss.cookie_cm": 1.0, "amf.enabled": False}


@pytest.mark.parametrize("weights, overrides", [
    ({}, {}), ({"mlm": 0.0, "mvm": 0.0, "kl_align": 0.0}, {}),
    ({"mlm": 0.0}, LOCKED_TEXT),
    ({"mlm": 0.0, "mvm": 0.0, "kl_align": 0.0}, {**LOCKED_TEXT, **LIT}),
    ({"mlm": 0.0, "mvm": 0.0, "kl_align": 0.0},
     {**LOCKED_TEXT, **LIT, "model.image.token_drop": 0.5})])
def test_step_flops_per_pair_match_xla_within_fifteen_percent(weights, overrides):
  """Also with the text tower locked (no backward through it), without a momentum encoder and
  with half the image tokens dropped."""
  config = _config()
  config.loss.update(weights)
  config.update_from_flattened_dict(overrides)
  built = state_lib.build(config, state_lib.make_mesh(config))
  state = built.abstract
  b, size, length = config.input.batch_size, 32, config.input.max_len
  batch = {"image": jnp.zeros((b, size, size, 3)), "text_ids": jnp.zeros((b, length), jnp.int32),
           "text_mask": jnp.ones((b, length), jnp.int32), "image_id": jnp.arange(b),
           "mlm_ids": jnp.zeros((b, length), jnp.int32),
           "mlm_positions": jnp.zeros((b, 6), jnp.int32),
           "mlm_targets": jnp.zeros((b, 6), jnp.int32), "mlm_weights": jnp.ones((b, 6)),
           "mvm_mask": jnp.arange(16)[None].repeat(b, 0) < 6,
           "skipped": jnp.zeros((b,), jnp.int32)}
  update = step_lib.make_update_fn(built.config, built.model, built.optimizer)
  xla = _xla_flops(update, state, batch) / b
  parts = flops.cots_step_flops_per_pair(config)
  assert parts["total"] == pytest.approx(xla, rel=0.15)
  assert ("masked_text" in parts) == ("mlm" not in weights)


def test_each_switch_removes_its_passes_from_the_count():
  config = _config()
  config.loss.update(mlm=0.0)
  full = flops.cots_step_flops_per_pair(config)
  config.update_from_flattened_dict(LOCKED_TEXT)
  locked = flops.cots_step_flops_per_pair(config)
  text = flops.text_tower_forward_flops(config)
  assert full["online_pair"] - locked["online_pair"] == 2 * text  # the backward is gone
  cached = flops.cots_step_flops_per_pair(config, cached=("text",))
  assert locked["online_pair"] - cached["online_pair"] == text
  assert locked["momentum_pair"] - cached["momentum_pair"] == text
  config.update_from_flattened_dict({**LIT, "loss.kl_align": 0.0, "loss.mvm": 0.0})
  lit = flops.cots_step_flops_per_pair(config, cached=("text",))
  assert "momentum_pair" not in lit and "contrastive_logits" not in lit
  assert lit["in_batch_logits"] > 0
