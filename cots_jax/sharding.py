"""Device mesh, state shardings as data, and host-local -> global batches (design §5).

Parameter sharding rules are `(regex, PartitionSpec-tuple)` pairs matched against the
"/"-joined path of each leaf; the first match wins and unmatched leaves are replicated.
"""

import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def make_mesh(mesh_axes, devices=None):
  """Builds a Mesh from `[(axis_name, size), ...]`; one size may be -1 (all remaining devices).

  `jax.make_mesh` lays the devices out: on TPU along the chips' physical axes, so that each mesh
  axis's collectives run over neighbouring chips; elsewhere in the given order (GPU: by id).

  Raises ValueError naming `config.mesh` when the sizes do not multiply to the device count.
  """
  devices = list(np.ravel(devices if devices is not None else jax.devices()))
  names = tuple(name for name, _ in mesh_axes)
  sizes = [int(size) for _, size in mesh_axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={mesh_axes!r} may leave at most one axis size at -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh={mesh_axes!r} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"config.mesh={mesh_axes!r} needs {int(np.prod(sizes))} devices, "
                     f"found {len(devices)}")
  # Auto axes, as `Mesh` has them: jax.make_mesh defaults to Explicit sharding mode.
  axis_types = (AxisType.Auto,) * len(names)
  try:
    return jax.make_mesh(sizes, names, axis_types, devices=devices)
  except (AssertionError, NotImplementedError):
    # The physical layout has no answer for libtpu's AOT topology descriptions of v4, which list
    # each chip's two TensorCores (stack-notes §6), nor for sizes that do not factor over the
    # physical axes (16x4 on v6e:8x8): the devices go in the given order there.
    return Mesh(np.asarray(devices).reshape(sizes), names, axis_types)


def replicated(mesh):
  """Sharding of an array kept whole on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  """Sharding of a `[B, ...]` batch: the leading axis split over every mesh axis."""
  return NamedSharding(mesh, P(mesh.axis_names))


def fsdp_spec(shape, mesh, min_size, axis="fsdp"):
  """PartitionSpec that splits the largest dimension divisible by the mesh's `axis` size.

  Arrays with fewer than `min_size` elements, meshes without `axis` and shapes with no divisible
  dimension stay replicated (`P()`): gathering a small array costs more than storing it.
  """
  if axis not in mesh.shape or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  divisible = [d for d, size in enumerate(shape) if size % mesh.shape[axis] == 0]
  if not divisible:
    return P()
  largest = max(divisible, key=lambda d: shape[d])
  return P(*(axis if d == largest else None for d in range(len(shape))))


def tree_shardings(abstract_tree, mesh, rules=(), fsdp_min_size=2**14):
  """NamedShardings for every leaf of `abstract_tree` from `(regex, spec)` rules.

  Args:
    abstract_tree: pytree of arrays or ShapeDtypeStructs.
    mesh: the device mesh.
    rules: sequence of `(regex, spec)`; spec is a tuple of mesh-axis names / None per array dim
      (`()` replicates), or the string "fsdp" for `fsdp_spec`. Rules are searched in the
      "/"-joined leaf path, so a rule for "params/.../kernel" also places that kernel's EMA copy
      and its optimizer moments ("params_ema/...", "opt/.../mu/...").
    fsdp_min_size: arrays with fewer elements stay replicated under an "fsdp" rule.

  Returns:
    pytree of NamedSharding with the structure of `abstract_tree`.
  """
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

  def leaf_sharding(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    for pattern, spec in compiled:
      if not pattern.search(name):
        continue
      if spec == "fsdp":
        return NamedSharding(mesh, fsdp_spec(leaf.shape, mesh, fsdp_min_size))
      if isinstance(spec, str) or len(spec) > len(leaf.shape):
        raise ValueError(f"sharding rule {pattern.pattern!r} gives {spec!r} to {name} of rank "
                         f"{len(leaf.shape)}; use a tuple of at most that many axes, or 'fsdp'")
      return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_tree)


def global_batch(host_batch, mesh):
  """Turns this host's numpy batch (its share of the global batch) into global jax Arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)


def replicated_everywhere():
  """Sharding of an array kept whole on every device of every process."""
  return replicated(Mesh(np.asarray(jax.devices()), ("all",)))


def replicate_globally(host_tree):
  """Host-local arrays, identical on every process (e.g. the frozen VQ tokenizer trained alike on
  each host), as global arrays replicated on all devices of all processes: what Orbax saves and
  what a jitted step takes in multi-process runs."""
  everywhere = replicated_everywhere()
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(everywhere, np.asarray(x)), host_tree)
