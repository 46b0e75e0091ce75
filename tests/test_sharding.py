"""Mesh construction, sharding rules as data, host-local -> global batches (design §5)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cots_jax import sharding


def test_make_mesh_fills_the_minus_one_axis_and_checks_sizes():
  devices = np.arange(8)
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 2)], devices=devices)
  assert mesh.shape == {"data": 4, "fsdp": 2}
  assert sharding.make_mesh([("data", -1)]).shape == {"data": jax.device_count()}
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    sharding.make_mesh([("data", -1), ("fsdp", 3)], devices=devices)
  with pytest.raises(ValueError, match="needs 6 devices, found 8"):
    sharding.make_mesh([("data", 3), ("fsdp", 2)], devices=devices)
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh([("data", -1), ("fsdp", -1)], devices=devices)


def test_tree_shardings_first_matching_rule_wins_else_replicated():
  mesh = sharding.make_mesh([("data", -1)])
  tree = {"image": {"kernel": np.zeros((4, 2)), "bias": np.zeros(2)}, "step": np.zeros(())}
  got = sharding.tree_shardings(tree, mesh, [("image/kernel", ("data", None)), ("image", (None,))])
  assert got["image"]["kernel"].spec == P("data", None)
  assert got["image"]["bias"].spec == P(None)
  assert got["step"].spec == P()
  with pytest.raises(ValueError, match="rank 0"):
    sharding.tree_shardings(tree, mesh, [("step", ("data",))])


def test_global_batch_keeps_values_and_shards_the_leading_axis():
  mesh = sharding.make_mesh([("data", -1)])
  host = {"image": np.arange(24, dtype=np.float32).reshape(4, 3, 2), "id": np.arange(4)}
  batch = sharding.global_batch(host, mesh)
  np.testing.assert_array_equal(np.asarray(batch["image"]), host["image"])
  assert batch["id"].sharding.spec == P(("data",))
  assert sharding.replicated(mesh).spec == P()
