"""Locked towers, tower learning rates, the momentum copy of trainable leaves only, the state
without a momentum encoder, and the clamped temperature (issue 23 items 1, 4, 6)."""

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cots_jax import config_validation
from cots_jax import locking
from cots_jax import state as state_lib
from cots_jax import step as step_lib
from cots_jax import vq_trainer
from cots_jax.data import pipeline
from support import tiny_config

LOCK_TEXT = {"model.text.locked": "all", "model.text.lock_random_ok": True}
LIT = {"loss.itc": 0.0, "loss.cookie_cm": 1.0, "loss.kl_align": 0.0, "loss.mlm": 0.0,
       "loss.mvm": 0.0, "amf.enabled": False}


def built_and_batch(**overrides):
  config = tiny_config(**overrides)
  built = state_lib.build(config, state_lib.make_mesh(config),
                          vq_trainer.random_tokenizer(config, jax.random.PRNGKey(1)))
  batch = next(iter(pipeline.make_train_iterator(built.config)))
  return built, batch


def flat_paths(tree):
  return set(traverse_util.flatten_dict(tree))


def num_floats(tree):
  """Elements of the arrays of `tree` (scalars such as Adam's step counts left out)."""
  return sum(np.size(leaf) for leaf in jax.tree.leaves(tree) if np.ndim(leaf))


def compiled_flops(built, batch):
  update = jax.jit(step_lib.make_update_fn(built.config, built.model, built.optimizer))
  return update.lower(built.abstract, batch).compile().cost_analysis()["flops"]


# ------------------------------------------------------------------------------------ values


@pytest.mark.parametrize("value, depth, expected", [
    ("none", 3, 3), ("all", 3, 0), ("0", 3, 0), ("2", 3, 2), ("3", 3, 3)])
def test_unlocked_blocks_reads_none_all_and_a_count(value, depth, expected):
  assert locking.unlocked_blocks(value, depth, "model.text.locked") == expected


@pytest.mark.parametrize("value", ["4", "-1", "some", "", "1.5"])
def test_a_lock_outside_the_towers_depth_fails_naming_the_field(value):
  config = tiny_config(**{"model.text.depth": 3, "model.text.locked": value,
                          "model.text.lock_random_ok": True})
  with pytest.raises(ValueError, match=r"^config.model.text.locked=.*0\.\.3$"):
    config_validation.validate(config)


def test_locking_a_random_tower_is_refused_unless_asked_for():
  with pytest.raises(ValueError, match=r"^config.model.image.locked='all' freezes randomly "
                     r"initialised weights.*lock_random_ok=True"):
    config_validation.validate(tiny_config(**{"model.image.locked": "all"}))
  config_validation.validate(tiny_config(**{"model.image.locked": "all",
                                            "model.image.lock_random_ok": True}))
  config_validation.validate(tiny_config(**{"model.image.locked": "all", "init_from": "/run"}))


@pytest.mark.parametrize("field", ["optim.lr_mult_image", "optim.lr_mult_text"])
@pytest.mark.parametrize("value", [0.0, -0.5])
def test_a_learning_rate_multiplier_must_be_positive(field, value):
  with pytest.raises(ValueError, match=rf"^config.{field}={value} must be > 0"):
    config_validation.validate(tiny_config(**{field: value}))


def test_mlm_on_a_locked_text_tower_that_nothing_else_reaches_is_refused():
  config = tiny_config(**LOCK_TEXT, **{"model.mvlm_fusion": "none"})
  with pytest.raises(ValueError, match=r"^config.loss.mlm=0.1 can train nothing but its own "
                     r"head"):
    config_validation.validate(config)
  # With the image vector fused into its head, MLM still trains the image tower.
  config_validation.validate(tiny_config(**LOCK_TEXT))


# ------------------------------------------------------------------------------- which leaves


def test_top_blocks_and_the_vits_final_norm_train_the_rest_of_the_tower_is_locked():
  built, _ = built_and_batch(**{"model.image.depth": 3, "model.image.locked": "1",
                                "model.image.lock_random_ok": True, **LOCK_TEXT})
  mask = traverse_util.flatten_dict(locking.trainable_mask(built.config,
                                                           built.abstract["params"]))
  trainable_image = {path[1] for path, train in mask.items() if path[0] == "image" and train}
  assert trainable_image == {"block_2", "norm"}
  assert not any(train for path, train in mask.items() if path[0] == "text")
  assert all(train for path, train in mask.items() if path[0] not in ("image", "text"))
  # The momentum copy holds exactly the trainable leaves.
  assert flat_paths(built.abstract["params_ema"]) == {p for p, train in mask.items() if train}


def test_bert_layers_count_from_the_top():
  config = tiny_config(**{"model.text.depth": 3, "model.text.locked": "2",
                          "model.text.lock_random_ok": True})
  assert [locking.is_trainable(config, ("text", "encoder", f"layer_{i}", "output", "dense",
                                        "kernel")) for i in range(3)] == [False, True, True]
  assert not locking.is_trainable(config, ("text", "embeddings", "word_embeddings",
                                           "embedding"))
  assert locking.is_trainable(config, ("text_proj", "kernel"))


def test_the_optimizer_keeps_no_moments_for_locked_leaves():
  free, _ = built_and_batch()
  locked, _ = built_and_batch(**LOCK_TEXT)
  text_floats = num_floats(free.abstract["params"]["text"])
  # Adam's two moments of every text leaf are gone, and its momentum copy with them.
  assert num_floats(free.abstract["opt"]) - num_floats(locked.abstract["opt"]) == 2 * text_floats
  assert (num_floats(free.abstract["params_ema"]) - num_floats(locked.abstract["params_ema"])
          == text_floats)


# ---------------------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def locked_run():
  built, batch = built_and_batch(**LOCK_TEXT)
  update = jax.jit(step_lib.make_update_fn(built.config, built.model, built.optimizer))
  state = built.initial_state()
  before = jax.device_get(state)
  for _ in range(2):
    state, _ = update(state, batch)
  return built, batch, before, jax.device_get(state)


def test_a_locked_tower_does_not_move_and_the_rest_trains(locked_run):
  _, _, before, after = locked_run
  for a, b in zip(jax.tree.leaves(before["params"]["text"]),
                  jax.tree.leaves(after["params"]["text"])):
    np.testing.assert_array_equal(a, b)
  for name in ("image", "text_proj", "image_proj"):
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(before["params"][name]), jax.tree.leaves(after["params"][name])))
  assert "text" not in after["params_ema"] and "text_proj" in after["params_ema"]


def test_the_step_computes_no_backward_through_a_locked_tower(locked_run):
  locked, batch, _, _ = locked_run
  free, _ = built_and_batch()
  # The text tower's backward pass (about twice its forward) is gone from the compiled step.
  assert compiled_flops(locked, batch) < 0.9 * compiled_flops(free, batch)


def test_locked_leaves_get_zero_gradients(locked_run):
  built, batch, before, _ = locked_run
  loss_fn = step_lib.make_loss_fn(built.config, built.model)
  rng = jax.random.split(before["rng"])[1]
  params_ema = locking.like(before["params"], before["params_ema"])
  grads = jax.grad(lambda p: loss_fn(p, params_ema, before, batch, rng)[0])(before["params"])
  assert not any(np.any(leaf) for leaf in jax.tree.leaves(grads["text"]))
  assert all(np.any(leaf) for leaf in jax.tree.leaves(grads["text_proj"]))


def test_lr_mult_scales_the_first_adam_step_of_its_tower_only():
  def deltas(**overrides):
    built, batch = built_and_batch(**{"optim.grad_clip": 0.0, "optim.weight_decay": 0.0,
                                      **overrides})
    update = jax.jit(step_lib.make_update_fn(built.config, built.model, built.optimizer))
    # Step 0 has lr 0 (warm-up from 0); step 1 moves by about lr_1 * sign(g) (Adam).
    state, _ = update(built.initial_state(), batch)
    middle = jax.device_get(state["params"])
    state, _ = update(state, batch)
    return jax.tree.map(lambda a, b: b - a, middle, jax.device_get(state["params"]))

  base = deltas()
  half_text = deltas(**{"optim.lr_mult_text": 0.5})
  for a, b in zip(jax.tree.leaves(base["text"]), jax.tree.leaves(half_text["text"])):
    np.testing.assert_allclose(b, 0.5 * a, rtol=1e-3, atol=1e-9)
  for a, b in zip(jax.tree.leaves(base["image_proj"]), jax.tree.leaves(half_text["image_proj"])):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-9)


# ----------------------------------------------------------------------- no momentum encoder


def test_without_a_term_that_reads_them_there_are_no_momentum_towers_or_queues():
  lit, batch = built_and_batch(**LIT)
  assert "params_ema" not in lit.abstract and "queue" not in lit.abstract
  cots, _ = built_and_batch(**{**LIT, "amf.enabled": True})  # AMF reads the momentum pass
  assert "params_ema" in cots.abstract and "queue" in cots.abstract
  update = jax.jit(step_lib.make_update_fn(lit.config, lit.model, lit.optimizer))
  state, metrics = update(lit.initial_state(), batch)
  assert "params_ema" not in state and np.isfinite(float(metrics["train/cookie_cm"]))
  assert float(metrics["train/amf_kept"]) == 1.0
  # The momentum forward is gone from the compiled step.
  assert compiled_flops(lit, batch) < compiled_flops(
      built_and_batch(**{**LIT, "loss.cookie_use_queue": True, "loss.cookie_cm": 1.0})[0],
      batch)


# ---------------------------------------------------------------------------- temperature


def test_a_learnable_temperature_past_its_bound_comes_back_and_keeps_training():
  # At init the loss falls as the temperature rises (random embeddings), so from below its
  # minimum it has somewhere to go.
  built, batch = built_and_batch(**{"temp.learnable": True, "temp.min": 0.05, "temp.init": 0.1})
  loss_fn = step_lib.make_loss_fn(built.config, built.model)
  update = jax.jit(step_lib.make_update_fn(built.config, built.model, built.optimizer))
  state = built.initial_state()
  state["params"] = dict(state["params"], temp=jnp.float32(1e-4))  # pushed past the min

  def temp_grad(state):
    rng = jax.random.split(state["rng"])[1]
    params_ema = locking.like(state["params"], state["params_ema"])
    return float(jax.grad(lambda p: loss_fn(p, params_ema, state, batch, rng)[0])(
        state["params"])["temp"])

  assert temp_grad(jax.device_get(state)) == 0.0  # clamped in the forward only: stuck
  temps = []
  for _ in range(3):
    state, _ = update(state, batch)
    temps.append(float(state["params"]["temp"]))
  assert temps[0] == np.float32(0.05)
  assert temp_grad(jax.device_get(state)) != 0.0
  assert temps[0] < temps[1] < temps[2]
