"""Video in the model: temporal aggregation (mean / transformer, masking) and `video_embedding`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cots_jax.models import cots as cots_model
from cots_jax.models import temporal
from support import tiny_config


def test_masked_frame_mean_matches_numpy_and_an_empty_clip_gives_zero():
  frames = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.int32)
  want = np.stack([frames[0, :2].mean(0), frames[1].mean(0), np.zeros(5)])
  np.testing.assert_allclose(temporal.masked_frame_mean(frames, mask), want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(temporal.masked_frame_mean(frames, None), frames.mean(1), rtol=1e-6)


def _aggregator(mode, num_frames=4):
  module = temporal.TemporalAggregator(mode, num_frames, layers=1, heads=2)
  frames = jax.random.normal(jax.random.key(0), (2, num_frames, 8))
  return module, module.init(jax.random.key(1), frames), frames


def test_mean_aggregation_has_no_parameters_and_ignores_frame_order():
  module, params, frames = _aggregator("mean")
  assert not jax.tree.leaves(params)
  reversed_frames = frames[:, ::-1]
  np.testing.assert_allclose(module.apply(params, reversed_frames), module.apply(params, frames),
                             rtol=1e-6)


def _with_trained_output(params, kernel=None):
  """The aggregator's parameters with `kernel` (default: a random one) in place of the
  zero-initialised output projection."""
  out = params["params"]["out"]
  if kernel is None:
    kernel = jax.random.normal(jax.random.key(7), out["kernel"].shape)
  return {"params": {**params["params"], "out": {**out, "kernel": kernel}}}


def test_transformer_aggregation_starts_as_mean_pooling():
  module, params, frames = _aggregator("transformer")
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  np.testing.assert_allclose(module.apply(params, frames, mask),
                             temporal.masked_frame_mean(frames, mask), atol=1e-6)


def test_transformer_aggregation_reads_deviations_from_the_clip_mean():
  """Shifting every frame by one vector shifts the clip vector by it and changes nothing else:
  the transformer sees only the frames' deviations from their mean."""
  module, params, frames = _aggregator("transformer")
  params = _with_trained_output(params)
  shift = jax.random.normal(jax.random.key(3), (2, 1, 8)) * 10
  np.testing.assert_allclose(module.apply(params, frames + shift),
                             module.apply(params, frames) + shift[:, 0], atol=1e-4)


def _order_sensitivity(module, params, frames):
  """Mean over clips of |reading(clip) - reading(reversed clip)| / |reading(clip)|, where the
  reading is what the aggregator adds to the clip mean."""
  clip_mean = temporal.masked_frame_mean(frames, None)
  forward = module.apply(params, frames) - clip_mean
  backward = module.apply(params, frames[:, ::-1]) - clip_mean
  return float(jnp.linalg.norm(forward - backward, axis=-1).mean()
               / jnp.linalg.norm(forward, axis=-1).mean())


@pytest.mark.parametrize("deviation_scale", [1e-2, 1.0, 10.0])
def test_transformer_aggregation_sees_order_at_init_whatever_the_scale_of_the_motion(
    deviation_scale):
  """Frames of one clip are a large common part plus small differences whose scale depends on
  the tower: at init, reversing a clip changes the transformer's reading by a fixed, large share
  of it (the deviations are normalised and the positions are of their scale), not by a share
  that vanishes when the differences are small or large."""
  module = temporal.TemporalAggregator("transformer", 4, layers=1, heads=2)
  content = jax.random.normal(jax.random.key(0), (16, 1, 32)) * 3
  motion = jax.random.normal(jax.random.key(1), (16, 4, 32))
  params = _with_trained_output(module.init(jax.random.key(2), content + motion), jnp.eye(32))
  reference = _order_sensitivity(module, params, content + motion)
  assert reference > 0.2
  np.testing.assert_allclose(
      _order_sensitivity(module, params, content + deviation_scale * motion), reference,
      rtol=0.05)


def test_transformer_aggregation_sees_frame_order_and_ignores_masked_frames():
  module, params, frames = _aggregator("transformer")
  assert params["params"]["frame_pos_embed"].shape == (1, 4, 8)
  params = _with_trained_output(params)
  out = module.apply(params, frames)
  assert out.shape == (2, 8)
  assert np.abs(np.asarray(module.apply(params, frames[:, ::-1]) - out)).max() > 1e-4
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  changed = frames.at[0, 3].set(100.0).at[1, 2:].set(-50.0)
  np.testing.assert_allclose(module.apply(params, changed, mask),
                             module.apply(params, frames, mask),
                             atol=1e-5)


def test_aggregation_checks_the_frame_count_and_the_mode():
  module, params, frames = _aggregator("transformer")
  with pytest.raises(ValueError, match="built for 4 frames per clip, got 3"):
    module.apply(params, frames[:, :3])
  with pytest.raises(ValueError, match="temporal_agg must be one of"):
    temporal.TemporalAggregator("max", 4).init(jax.random.key(0), frames)


@pytest.mark.parametrize("use_wst", [False, True])
def test_a_clip_of_one_repeated_frame_embeds_like_that_image_with_mean_aggregation(use_wst):
  config = tiny_config(**{"model.num_frames": 3, "model.use_wst": use_wst,
                          "model.wst_layers": 1})
  model = cots_model.CotsModel.from_config(config)
  size = config.model.image.image_size
  image = jax.random.uniform(jax.random.key(0), (2, size, size, 3), minval=-1, maxval=1)
  video = jnp.repeat(image[:, None], 3, axis=1)
  params = model.init(jax.random.key(1), video, jnp.ones((2, 6), jnp.int32),
                      jnp.ones((2, 6), jnp.int32))["params"]
  assert "temporal" not in params
  clip_embed, clip_global = model.apply({"params": params}, video, method=model.video_embedding)
  image_embed, image_global = model.apply({"params": params}, image,
                                          method=model.image_embedding)
  np.testing.assert_allclose(clip_embed, image_embed, atol=1e-5)
  np.testing.assert_allclose(clip_global, image_global, atol=1e-5)


def test_transformer_aggregation_parameters_exist_for_video_input_only():
  config = tiny_config(**{"model.num_frames": 3, "model.temporal_agg": "transformer",
                          "model.temporal_layers": 1})
  model = cots_model.CotsModel.from_config(config)
  size, text = config.model.image.image_size, jnp.ones((1, 6), jnp.int32)
  video_params = model.init(jax.random.key(1), jnp.zeros((1, 3, size, size, 3)), text,
                            text)["params"]
  image_params = model.init(jax.random.key(1), jnp.zeros((1, size, size, 3)), text, text)["params"]
  width = config.model.image.width
  assert video_params["temporal"]["frame_pos_embed"].shape == (1, 3, width)
  assert "temporal" not in image_params
  out = video_params["temporal"]["out"]
  assert out["kernel"].shape == (width, width) and not np.asarray(out["kernel"]).any()
  video_params["temporal"]["out"]["kernel"] = jax.random.normal(jax.random.key(3), (width, width))
  video = jax.random.uniform(jax.random.key(2), (2, 3, size, size, 3))
  embed, _ = model.apply({"params": video_params}, video, method=model.video_embedding)
  np.testing.assert_allclose(np.linalg.norm(embed, axis=-1), 1.0, rtol=1e-5)
  reordered, _ = model.apply({"params": video_params}, video[:, ::-1],
                             method=model.video_embedding)
  assert np.abs(np.asarray(embed - reordered)).max() > 1e-5


def test_the_temporal_transformer_takes_the_wst_width_and_heads():
  """With the WST the frames' head inputs have the WST's width (here the text tower's 32, 2
  heads), not the ViT's (48, 3 heads, which do not divide 32)."""
  config = tiny_config(**{"model.num_frames": 2, "model.temporal_agg": "transformer",
                          "model.temporal_layers": 1, "model.use_wst": True,
                          "model.wst_layers": 1, "model.image.width": 48,
                          "model.image.heads": 3})
  model = cots_model.CotsModel.from_config(config)
  size, text = config.model.image.image_size, jnp.ones((1, 6), jnp.int32)
  params = model.init(jax.random.key(1), jnp.zeros((1, 2, size, size, 3)), text, text)["params"]
  assert params["temporal"]["frame_pos_embed"].shape == (1, 2, 32)
