"""EMA update and momentum decay schedule against numpy (method.md §4.4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cots_jax import momentum


def test_ema_update_matches_numpy_on_a_nested_tree_with_traced_decay():
  rng = np.random.default_rng(0)
  shapes = {"tower": {"kernel": (3, 2), "bias": (2,)}, "head": [(4,), (2, 2)]}
  make = lambda: jax.tree.map(lambda s: rng.normal(size=s), shapes,
                              is_leaf=lambda x: isinstance(x, tuple))
  ema, online = make(), make()
  decay = 0.9
  got = jax.jit(momentum.ema_update)(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), ema),
                                     jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), online),
                                     jnp.float32(decay))
  want = {"tower": {k: decay * ema["tower"][k] + (1 - decay) * online["tower"][k]
                    for k in ("kernel", "bias")},
          "head": [decay * e + (1 - decay) * o for e, o in zip(ema["head"], online["head"])]}
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_ema_update_keeps_the_ema_at_decay_one_takes_online_at_zero_and_keeps_bfloat16():
  ema = {"w": jnp.asarray([1.0, -2.0], jnp.bfloat16)}
  online = {"w": jnp.asarray([3.0, 5.0], jnp.float32)}
  for decay, want in ((1.0, [1.0, -2.0]), (0.0, [3.0, 5.0]), (0.75, [1.5, -0.25])):
    got = momentum.ema_update(ema, online, jnp.float32(decay))["w"]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_constant_decay_ignores_the_step():
  for step in (0, 10, 10_000):
    value = momentum.momentum_decay(step, 0.99)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, 0.99, rtol=1e-7)


def test_cosine_decay_matches_byol_formula_and_is_monotone():
  base, total = 0.99, 100
  steps = np.arange(0, 131)
  got = np.array([momentum.momentum_decay(s, base, "cosine", 1.0, total) for s in steps])
  byol = 1 - (1 - base) * (np.cos(np.pi * np.minimum(steps, total) / total) + 1) / 2
  np.testing.assert_allclose(got, byol, rtol=1e-6)
  np.testing.assert_allclose([got[0], got[total], got[-1]], [base, 1.0, 1.0], rtol=1e-7)
  assert np.all(np.diff(got) >= 0) and got[total // 2] < got[total]


def test_cosine_decay_reaches_a_final_value_under_jit():
  decay = jax.jit(lambda s: momentum.momentum_decay(s, 0.99, "cosine", 0.999, 40))
  np.testing.assert_allclose([decay(0), decay(20), decay(40), decay(80)],
                             [0.99, 0.9945, 0.999, 0.999], rtol=1e-6)


def test_unknown_schedule_is_rejected_by_name():
  with pytest.raises(ValueError, match="'linear'"):
    momentum.momentum_decay(0, 0.99, "linear")
