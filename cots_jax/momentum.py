"""Momentum (EMA) encoder update and its decay schedule (method §4.4, design.md §8.5)."""

import jax
import jax.numpy as jnp
import optax

MOMENTUM_SCHEDULES = ("constant", "cosine")


def ema_update(params_ema, params, decay):
  """decay·params_ema + (1 - decay)·params per leaf (decay may be traced; EMA dtypes kept)."""
  # optax's step_size is the weight of the new value, 1 - decay.
  averaged = optax.incremental_update(params, params_ema, 1.0 - decay)
  return jax.tree.map(lambda new, ema: new.astype(ema.dtype), averaged, params_ema)


def momentum_decay(step, base, schedule="constant", final=1.0, total_steps=1):
  """The EMA decay at `step` as a float32 scalar.

  Args:
    step: int step (may be traced).
    base: decay at step 0.
    schedule: "constant" (always base) or "cosine" (BYOL: base at step 0 rising along a half
      cosine to `final` at `total_steps`, held at `final` after).
    final: decay reached at `total_steps` by the cosine schedule.
    total_steps: length of the cosine schedule in steps (>= 1).

  Raises:
    ValueError naming `schedule` when it is unknown.
  """
  if schedule not in MOMENTUM_SCHEDULES:
    raise ValueError(f"momentum.schedule {schedule!r} is unknown; known: "
                     f"{', '.join(MOMENTUM_SCHEDULES)}")
  if schedule == "constant":
    return jnp.asarray(base, jnp.float32)
  if total_steps < 1:
    raise ValueError(f"momentum.schedule 'cosine' needs total_steps >= 1, got {total_steps}")
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
  return jnp.asarray(final - (final - base) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)),
                     jnp.float32)
