"""Mesh construction, sharding rules as data, host-local -> global batches (design §5)."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from cots_jax import sharding
from support import FakeDevice, fake_cpus


def test_make_mesh_fills_the_minus_one_axis_and_checks_sizes():
  devices = fake_cpus(8)
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 2)], devices=devices)
  assert mesh.shape == {"data": 4, "fsdp": 2}
  assert [d.id for d in mesh.devices.flat] == list(range(8))  # CPU: the given order
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert sharding.make_mesh([("data", -1)]).shape == {"data": jax.device_count()}
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    sharding.make_mesh([("data", -1), ("fsdp", 3)], devices=devices)
  with pytest.raises(ValueError, match="needs 6 devices, found 8"):
    sharding.make_mesh([("data", 3), ("fsdp", 2)], devices=devices)
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh([("data", -1), ("fsdp", -1)], devices=devices)


def test_make_mesh_lays_tpu_chips_out_by_their_coordinates_not_their_list_order():
  coords = [(1, 1, 0), (0, 0, 0), (1, 0, 0), (0, 1, 0)]
  chips = [FakeDevice(i, "tpu", "TPU v4", c) for i, c in enumerate(coords)]
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2)], devices=chips)
  assert sorted(d.coords for d in mesh.devices.flat) == sorted(coords)
  # Each fsdp row is one line of chips along a physical axis.
  for row in mesh.devices:
    assert sum(a != b for a, b in zip(row[0].coords, row[1].coords)) == 1


def test_make_mesh_keeps_the_given_order_for_two_tensorcores_per_chip():
  """libtpu's AOT description of v4 lists both TensorCores of a chip, which jax.make_mesh
  rejects; the mesh then takes the devices in the given order."""
  cores = [FakeDevice(2 * chip + core, "tpu", "TPU v4", (chip % 2, chip // 2, 0), core)
           for chip in range(4) for core in range(2)]
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 2)], devices=cores)
  assert mesh.shape == {"data": 4, "fsdp": 2}
  assert [d.id for d in mesh.devices.flat] == list(range(8))
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


def test_tree_shardings_first_matching_rule_wins_else_replicated():
  mesh = sharding.make_mesh([("data", -1)])
  tree = {"image": {"kernel": np.zeros((4, 2)), "bias": np.zeros(2)}, "step": np.zeros(())}
  got = sharding.tree_shardings(tree, mesh, [("image/kernel", ("data", None)), ("image", (None,))])
  assert got["image"]["kernel"].spec == P("data", None)
  assert got["image"]["bias"].spec == P(None)
  assert got["step"].spec == P()
  with pytest.raises(ValueError, match="rank 0"):
    sharding.tree_shardings(tree, mesh, [("step", ("data",))])


def test_tree_shardings_match_rules_against_slash_joined_keys_indices_and_fields():
  """Dict keys and list indices as before, optax state fields by their bare names."""
  mesh = sharding.make_mesh([("data", -1)])
  params = {"tower": [{"kernel": np.zeros((4, 2))}]}
  tree = {"params": params, "opt": optax.adam(1e-3).init(params)}
  rules = [(r"^params/tower/0/kernel$", ("data", None)),
           (r"^opt/0/mu/tower/0/kernel$", (None, "data")), (r"^opt/0/count$", ())]
  got = sharding.tree_shardings(tree, mesh, rules + [(".*", (None, None))])
  assert got["params"]["tower"][0]["kernel"].spec == P("data", None)
  assert got["opt"][0].mu["tower"][0]["kernel"].spec == P(None, "data")
  assert got["opt"][0].count.spec == P()
  assert got["opt"][0].nu["tower"][0]["kernel"].spec == P(None, None)


def test_global_batch_keeps_values_and_shards_the_leading_axis():
  mesh = sharding.make_mesh([("data", -1)])
  host = {"image": np.arange(24, dtype=np.float32).reshape(4, 3, 2), "id": np.arange(4)}
  batch = sharding.global_batch(host, mesh)
  np.testing.assert_array_equal(np.asarray(batch["image"]), host["image"])
  assert batch["id"].sharding.spec == P(("data",))
  assert sharding.replicated(mesh).spec == P()


def test_fsdp_spec_splits_the_largest_divisible_dim_and_replicates_small_arrays():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)], devices=fake_cpus(8))
  assert sharding.fsdp_spec((768, 3072), mesh, min_size=1) == P(None, "fsdp")
  assert sharding.fsdp_spec((30522, 768), mesh, min_size=1) == P(None, "fsdp")  # 30522 % 4 != 0
  assert sharding.fsdp_spec((12, 64, 768), mesh, min_size=1) == P(None, None, "fsdp")
  assert sharding.fsdp_spec((6, 10), mesh, min_size=1) == P()  # nothing divisible by 4
  assert sharding.fsdp_spec((768,), mesh, min_size=1024) == P()  # small
  assert sharding.fsdp_spec((1024,), mesh, min_size=1024) == P("fsdp")
  assert sharding.fsdp_spec((), mesh, min_size=0) == P()
  data_only = sharding.make_mesh([("data", -1)], devices=fake_cpus(8))
  assert sharding.fsdp_spec((768, 3072), data_only, min_size=1) == P()


def test_tree_shardings_fsdp_rule_places_params_ema_and_moments_alike():
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 1)])
  kernel = np.zeros((8, 16))
  tree = {"params": {"fc": {"kernel": kernel, "bias": np.zeros(16)}},
          "params_ema": {"fc": {"kernel": kernel}}, "opt": {"mu": {"fc": {"kernel": kernel}}},
          "queue": {"img": np.zeros((64, 4))}}
  got = sharding.tree_shardings(tree, mesh, [("^queue/", ()), (".*", "fsdp")], fsdp_min_size=64)
  for part in ("params", "params_ema", "opt"):
    leaf = got[part]["fc"]["kernel"] if part != "opt" else got["opt"]["mu"]["fc"]["kernel"]
    assert leaf.spec == P(None, "fsdp"), part
  assert got["params"]["fc"]["bias"].spec == P()
  assert got["queue"]["img"].spec == P()
  with pytest.raises(ValueError, match="use a tuple of at most that many axes, or 'fsdp'"):
    sharding.tree_shardings(tree, mesh, [("bias", "data")])


def test_replicate_globally_keeps_values_on_every_device():
  tree = {"w": np.arange(6.0).reshape(2, 3), "n": np.int32(3)}
  got = sharding.replicate_globally(tree)
  assert got["w"].sharding.is_fully_replicated
  assert len(got["w"].sharding.device_set) == jax.device_count()
  np.testing.assert_array_equal(np.asarray(got["w"]), tree["w"])
  assert int(got["n"]) == 3
