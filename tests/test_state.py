"""The state builder (cots_jax/state.py): optimizer, mesh, and the one `build` every part uses."""

import ast
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cots_jax import checkpoint
from cots_jax import state as state_lib
from cots_jax import vq_trainer
from support import REPO, fake_cpus, tiny_config


def test_build_validates_the_config_and_checks_the_batch_against_the_mesh():
  with pytest.raises(ValueError, match=r"^config.queue.size=30 must be a positive multiple"):
    state_lib.build(tiny_config(**{"queue.size": 30}), state_lib.make_mesh(tiny_config()))
  with pytest.raises(ValueError, match=r"config.input.batch_size=8 must be a multiple of the 3 "):
    state_lib.build(tiny_config(), types.SimpleNamespace(size=3))  # a mesh of 3 devices


def test_fresh_state_has_the_abstract_shapes_shardings_and_an_untrained_tokenizer():
  config = tiny_config()
  built = state_lib.build(config, state_lib.make_mesh(config))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(built.vq_variables))
  state = built.fresh_state()
  for leaf, spec in zip(jax.tree.leaves(state), jax.tree.leaves(built.abstract), strict=True):
    assert (leaf.shape, leaf.dtype, leaf.sharding) == (spec.shape, spec.dtype, spec.sharding)
  untrained = vq_trainer.random_tokenizer(config, jax.random.PRNGKey(1))
  for got, want in zip(jax.tree.leaves(state["vq"]), jax.tree.leaves(untrained), strict=True):
    np.testing.assert_array_equal(got, want)
  assert set(built.abstract_params) == {"params", "params_ema"}


def test_the_same_seed_builds_the_same_state_and_the_vq_variables_given_are_kept():
  config = tiny_config()
  mesh = state_lib.make_mesh(config)
  vq_variables = vq_trainer.random_tokenizer(config, jax.random.PRNGKey(7))
  first = state_lib.build(config, mesh, vq_variables).fresh_state()
  second = state_lib.build(config, mesh, vq_variables).fresh_state()
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(first["vq"]["params"]["codebook"],
                                vq_variables["params"]["codebook"])
  for online, momentum in zip(jax.tree.leaves(first["params"]),
                              jax.tree.leaves(first["params_ema"])):
    np.testing.assert_array_equal(online, momentum)


def test_initial_state_starts_from_the_towers_of_init_from(trained_run):
  config = tiny_config(**{"loss.mvm": 0.0, "loss.mlm": 0.0, "init_from": trained_run})
  built = state_lib.build(config, state_lib.make_mesh(config))
  state = built.initial_state()
  saved, step = checkpoint.restore_params(trained_run, {"params": built.abstract["params"]})
  assert step == 12
  for a, b, c in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(saved["params"]),
                     jax.tree.leaves(state["params_ema"])):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  assert int(state["step"]) == 0 and int(state["queue"]["ptr"]) == 0


def _imports(path):
  """The cots_jax modules that the Python file `path` imports (dotted names)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
    elif isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
  return names


def _package_files():
  root = os.path.join(REPO, "cots_jax")
  return [os.path.join(top, name) for top, _, names in os.walk(root) for name in names
          if name.endswith(".py")]


def test_only_main_imports_the_trainer_and_only_the_state_module_initialises_a_state():
  importers = [os.path.relpath(p, REPO) for p in _package_files()
               if "cots_jax.train" in _imports(p)]
  assert importers == ["cots_jax/main.py"]
  builders = [os.path.relpath(p, REPO) for p in _package_files()
              if "init_state" in open(p, encoding="utf-8").read()]
  assert builders == ["cots_jax/state.py"]


def test_weight_decay_mask_spares_biases_norms_and_position_embeddings():
  params = {"text": {"embeddings": {"position_embeddings": {"embedding": jnp.ones((4, 2))},
                                    "word_embeddings": {"embedding": jnp.ones((9, 2))}},
                     "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
                     "LayerNorm": {"scale": jnp.ones(2)}},
            "image": {"pos_embed": jnp.ones((1, 5, 2)), "cls": jnp.ones((1, 1, 2))}}
  mask = state_lib.weight_decay_mask(params)
  assert mask["text"]["dense"]["kernel"]
  assert mask["text"]["embeddings"]["word_embeddings"]["embedding"]
  assert not mask["text"]["dense"]["bias"] and not mask["text"]["LayerNorm"]["scale"]
  assert not mask["text"]["embeddings"]["position_embeddings"]["embedding"]
  assert not mask["image"]["pos_embed"] and not mask["image"]["cls"]


def test_learning_rate_schedule_warms_up_then_decays_to_end_lr():
  config = tiny_config(total_steps=10)
  schedule = state_lib.learning_rate_schedule(config)
  assert float(schedule(0)) == 0.0
  assert float(schedule(config.optim.warmup_steps)) == pytest.approx(config.optim.lr)
  assert float(schedule(config.total_steps)) == pytest.approx(config.optim.end_lr)


def test_make_mesh_checks_that_the_global_batch_splits_over_the_devices():
  config = tiny_config()
  assert state_lib.make_mesh(config).shape == {"data": jax.device_count()}
  assert state_lib.make_mesh(config, devices=fake_cpus(4)).shape == {"data": 4}
  with pytest.raises(ValueError, match=r"config.input.batch_size=8 must be a multiple of the 3 "):
    state_lib.make_mesh(config, devices=fake_cpus(3))
