"""The unmasked tail (`model.image.unmasked_tuning_steps`, FLIP's unmasked tuning): the run's
last steps take the update of the same model without token drop (`step.update_phases`)."""

import jax
import jax.numpy as jnp
import pytest

from cots_jax import state as state_lib
from cots_jax import step as step_lib
from cots_jax import vq_trainer
from cots_jax.data import pipeline
from support import tiny_config


def _built(**overrides):
  """A tiny run (20 steps) whose ViT drops half of its 9 patches, MVM off (it needs them all)."""
  config = tiny_config(**{"model.image.token_drop": 0.5, "loss.mvm": 0.0, **overrides})
  return state_lib.build(config, state_lib.make_mesh(config),
                         vq_trainer.random_tokenizer(config, jax.random.PRNGKey(1)))


def test_update_of_step_picks_the_phase_that_holds_the_step():
  phases = [(1, "masked"), (18, "unmasked")]
  assert [step_lib.update_of_step(phases, step) for step in (1, 17, 18, 20)] == [
      "masked", "masked", "unmasked", "unmasked"]


def test_without_a_tail_every_step_takes_the_one_update():
  assert [first for first, _ in step_lib.update_phases(_built())] == [1]


def test_the_tail_runs_the_update_of_the_model_without_token_drop():
  built = _built(**{"model.image.unmasked_tuning_steps": 3})
  phases = step_lib.update_phases(built)
  assert [first for first, _ in phases] == [1, 18]
  state = jax.device_get(built.fresh_state())
  batch = next(iter(pipeline.make_train_iterator(built.config)))

  def loss(update):
    # The update donates its state: each call gets its own copy of the same one.
    _, metrics = update(jax.tree.map(jnp.asarray, state), batch)
    return float(metrics["train/loss"])

  unmasked = loss(step_lib.jit_update(_built(**{"model.image.token_drop": 0.0})))
  assert loss(step_lib.update_of_step(phases, 18)) == pytest.approx(unmasked, rel=1e-6)
  assert loss(step_lib.update_of_step(phases, 17)) != pytest.approx(unmasked, rel=1e-3)
