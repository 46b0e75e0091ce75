"""Proof of TPU fit without a TPU: the real update step compiled ahead of time for a TPU topology
by libtpu, with nothing run (design §5, issue 6).

  python -m cots_jax.benchmarks.compile_tpu --config=configs/pretrain.py:model=base \
      --topology=v5e:16x16 --batch_size=4096 --out=v5e-256.json
  python -m cots_jax.benchmarks.compile_tpu --config=configs/pretrain.py:model=base \
      --topology=v4:4x4x4 --batch_size=4096 --mesh=data:-1,fsdp:8 --config.model.remat=True \
      --step_time=0.1 --out=v4-128.json     # FSDP over 8 devices, remat, MFU at 0.1 s/step

The state is the trainer's (`state.build`: ShapeDtypeStructs with the shardings of
`config.sharding_rules` on the mesh), the step is `step.jit_update`, and the batch has the
shapes and dtypes of the input pipeline's (one real pair at the configured image size and
caption length, its leading axis set to the global batch). Prints and writes as JSON: memory
per chip from XLA's memory analysis (arguments + temporaries + outputs - aliased, i.e. the
donated state counted once) against the chip's HBM, XLA's FLOPs against the analytic count of
cots_jax.flops, the MFU that a stated step time would give, and the per-device shapes of the
contrastive logits.

XLA's cost and memory analyses describe one device (a matmul split over n devices reports 1/n
of its FLOPs; tests/test_compile_tpu.py checks it), so FLOPs are multiplied by the number of
devices and bytes by the devices per chip: libtpu shows each of a v4 chip's 2 TensorCores as a
device (design §8.9).
"""

import dataclasses
import importlib.util
import math
import os
import re
import time

from absl import app
from absl import flags
import jax
from jax.experimental import topologies
import numpy as np
from ml_collections import config_flags

from cots_jax import benchmarks
from cots_jax import checkpoint
from cots_jax import flops
from cots_jax import shapes
from cots_jax import sharding
from cots_jax import state as state_lib
from cots_jax import step as step_lib
from cots_jax.data import pipeline

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuChip:
  """What one chip offers: HBM bytes and the dense bfloat16 matmul peak in FLOP/s."""
  generation: str
  hbm_bytes: int
  peak_bf16_flops: float


# By jax's device_kind.
CHIPS = {
    "TPU v4": TpuChip("v4", 32 * GIB, 275e12),
    "TPU v5 lite": TpuChip("v5e", 16 * GIB, 197e12),
    "TPU v5": TpuChip("v5p", 95 * GIB, 459e12),
    "TPU v6 lite": TpuChip("v6e", 32 * GIB, 918e12),
}

# `  %name = TYPE op(...), ...` with TYPE `f32[16,65537]{1,0:T(8,128)}` or a tuple of such.
_HLO_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+) = (.*)$")
_HLO_ARRAY_TYPE = re.compile(r"\b(pred|bf16|[fsu](\d+))\[([\d,]*)\]")  # f32[16,65537]
# A computation's header: `%fused_computation.12 (p: f32[2]) -> f32[2] {` or `ENTRY %main ...`.
_HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) ")


def tpu_devices(topology):
  """The devices of TPU `topology` ("v5e:16x16", "v4:4x4x4", ...) as libtpu describes them.

  Raises:
    ImportError when libtpu is not installed; ValueError naming the topology when libtpu does
    not know it.
  """
  if importlib.util.find_spec("libtpu") is None:
    raise ImportError("compiling for a TPU topology needs libtpu: pip install -e '.[test]'")
  # libtpu looks for a TPU VM's accelerator type and worker hostnames when it loads, and prints
  # warnings and an error block without them; any values silence it, and neither changes the
  # topology compiled for (stack-notes §6). It also takes a lock file that stops a second process
  # from loading it; nothing here claims a chip, so compiles in several processes may share it.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
  except jax.errors.JaxRuntimeError as error:
    raise ValueError(
        f"libtpu gives no TPU topology --topology={topology!r} ({error}); names are "
        "GENERATION:SHAPE such as v5e:16x16, v4:4x4x4, v5p:4x4x4 or v6e:8x8") from error


def devices_per_chip(devices):
  """TensorCores of one chip that libtpu shows as separate devices (v4: 2; v5e, v5p, v6e: 1)."""
  return len(devices) // len({tuple(d.coords) for d in devices})


def parse_mesh(text):
  """"data:-1,fsdp:16" -> [("data", -1), ("fsdp", 16)] (the form of config.mesh)."""
  axes = []
  for item in text.split(","):
    name, _, size = item.strip().partition(":")
    if not name or not re.fullmatch(r"-?\d+", size.strip()):
      raise ValueError(f"--mesh={text!r}: each axis must be name:size (one size may be -1), "
                       f"got {item!r}")
    axes.append((name, int(size)))
  return axes


def abstract_batch(config, mesh):
  """ShapeDtypeStructs of one global training batch, sharded over `mesh` like the trainer's.

  Shapes and dtypes come from a real pipeline batch of one pair of the synthetic source (the
  source does not change them; this needs no data files), with the leading axis set to
  `input.batch_size`: image [B, H, W, 3], text and mask fields [B, L], ... (design §4.3).
  """
  probe = config.copy_and_resolve_references()
  probe.input.batch_size = 1
  probe.input.data.name, probe.input.data.num_train_images = "synthetic", 1
  probe.input.num_workers, probe.input.prefetch = 0, 0
  example = next(pipeline.make_train_iterator(probe))
  batch_sharding = sharding.batch_sharding(mesh)
  return {name: jax.ShapeDtypeStruct((config.input.batch_size,) + value.shape[1:], value.dtype,
                                     sharding=batch_sharding)
          for name, value in example.items()}


def compile_update(config, devices):
  """Lowers and compiles the trainer's update step for `devices` on `config.mesh`; runs nothing.

  Returns:
    (compiled, abstract_state, mesh).
  """
  built = state_lib.build(config, state_lib.make_mesh(config, devices))
  state, mesh = built.abstract, built.mesh
  lowered = step_lib.jit_update(built).lower(state, abstract_batch(built.config, mesh))
  # A persistent compilation cache (the tests') cannot load what is compiled for a TPU that is
  # not there ("PjRtCompiler must be constructed with a Client"): keep it out of the cache.
  min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", math.inf)
  try:
    return lowered.compile(), state, mesh
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)


def _split_result_type(rest):
  """"f32[4]{0:T(128)} add(%a, %b), ..." -> ("f32[4]{0:T(128)}", "add"): the result type ends at
  the first space outside brackets (layouts hold parentheses, tuple types hold spaces)."""
  depth = 0
  for i, char in enumerate(rest):
    if char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == " " and depth == 0:
      return rest[:i], rest[i + 1:].split("(", 1)[0]
  return rest, ""


def hlo_arrays(hlo_text):
  """Every array that an instruction of compiled (per-device) HLO text produces, one per element
  of a tuple result.

  Returns:
    list of dicts: name, op, dtype, shape (tuple), bytes, and in_fusion: True inside a fused
    computation, whose values stay in registers / VMEM instead of becoming HBM buffers.
  """
  fused = set(re.findall(r"calls=%?([\w.\-]+)", hlo_text))
  arrays, in_fusion = [], False
  for line in hlo_text.splitlines():
    header = _HLO_COMPUTATION.match(line)
    if header and line.rstrip().endswith("{"):
      in_fusion = header.group(1) in fused
      continue
    instruction = _HLO_INSTRUCTION.match(line)
    if not instruction:
      continue
    name, rest = instruction.groups()
    result_type, op = _split_result_type(rest)
    for dtype, bits, dims in _HLO_ARRAY_TYPE.findall(result_type):
      shape = tuple(int(d) for d in dims.split(",") if d)
      bits = {"pred": 8, "bf16": 16}.get(dtype) or int(bits)
      arrays.append({"name": name, "op": op, "dtype": dtype, "shape": shape,
                     "bytes": math.ceil(math.prod(shape) * bits / 8), "in_fusion": in_fusion})
  return arrays


def largest_buffers(arrays, top):
  """The `top` largest arrays of `hlo_arrays` that the step computes into HBM: outside fusions,
  neither arguments nor views (parameter, get-tuple-element, tuple, bitcast) nor the halves of
  asynchronous ops, whose tuples repeat their operands."""
  views = ("parameter", "get-tuple-element", "tuple", "bitcast")
  buffers = [a for a in arrays if not a["in_fusion"] and a["op"] not in views
             and not a["op"].endswith(("-start", "-done"))]
  return sorted(buffers, key=lambda a: -a["bytes"])[:top]


def contrastive_logits_report(config, arrays, num_devices):
  """Whether the [B, columns] ITC / KL logits exist whole on a device, from `hlo_arrays`.

  columns = 1 + K (B + K with in-batch negatives); per device they should be
  [B / devices, columns].
  """
  batch = config.input.batch_size
  columns = shapes.contrastive_columns(config)
  logits = [a for a in arrays if a["shape"] and a["shape"][-1] == columns]
  found = sorted({(a["dtype"], a["shape"]) for a in logits})
  return {
      "whole_shape": [batch, columns],
      "expected_per_device_shape": [batch // num_devices, columns],
      "per_device_shapes": [f"{dtype}{list(shape)}" for dtype, shape in found],
      "materialised_whole": any(math.prod(a["shape"][:-1]) >= batch for a in logits),
      "largest_per_device_bytes": max((a["bytes"] for a in logits), default=0),
  }


def hlo_findings(compiled, config, num_devices, top_buffers):
  """`contrastive_logits` (contrastive_logits_report) and `largest_buffers_per_device` from the
  compiled per-device HLO, or `hlo_unreadable` with the reason when jaxlib cannot read it back:
  its XLA is older than libtpu's (ViT-B on v5p: "async-update instruction should have 1
  operands but sees 3"); the memory and cost analyses do not need it."""
  try:
    arrays = hlo_arrays(compiled.as_text())
  except jax.errors.JaxRuntimeError as error:
    return {"hlo_unreadable": str(error).splitlines()[0]}
  return {
      "contrastive_logits": contrastive_logits_report(config, arrays, num_devices),
      "largest_buffers_per_device": [{**a, "shape": list(a["shape"])}
                                     for a in largest_buffers(arrays, top_buffers)],
  }


def state_bytes_per_device(abstract_state):
  """Bytes of the sharded train state held by each device (the largest shard of each leaf)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract_state))


def compile_report(config, topology, step_time=None, top_buffers=8):
  """Compiles the update step of `config` for TPU `topology` and returns the results dict.

  Args:
    config: the run's ConfigDict (config.mesh, config.input.batch_size as they will be run).
    topology: libtpu topology name, e.g. "v5e:16x16".
    step_time: seconds per step at which `mfu_at_step_time` is stated (None: not stated).
    top_buffers: how many of the largest per-device buffers of the compiled HLO to list.
  """
  devices = tpu_devices(topology)
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise ValueError(f"--topology={topology!r} has {kind!r} chips; known: {sorted(CHIPS)}")
  chip = CHIPS[kind]
  per_chip = devices_per_chip(devices)
  num_chips = len(devices) // per_chip

  start = time.perf_counter()
  compiled, state, mesh = compile_update(config, devices)
  compile_seconds = time.perf_counter() - start

  memory = compiled.memory_analysis()
  parts = {
      "arguments": memory.argument_size_in_bytes * per_chip,
      "temporaries": memory.temp_size_in_bytes * per_chip,
      "outputs": memory.output_size_in_bytes * per_chip,
      "aliased": memory.alias_size_in_bytes * per_chip,
      "generated_code": memory.generated_code_size_in_bytes * per_chip,
  }
  per_chip_bytes = (parts["arguments"] + parts["temporaries"] + parts["outputs"]
                    - parts["aliased"])
  flops_per_step = float(compiled.cost_analysis()["flops"]) * len(devices)
  analytic = flops.cots_step_flops_per_pair(config)
  batch = config.input.batch_size
  analytic_per_step = analytic["total"] * batch
  seconds_at_peak = analytic_per_step / (num_chips * chip.peak_bf16_flops)
  return {
      "topology": topology,
      "device_kind": kind,
      "num_chips": num_chips,
      "devices_per_chip": per_chip,
      "mesh": dict(mesh.shape),
      "sharding_rules": [list(rule) for rule in config.sharding_rules],
      "global_batch": batch,
      "queue_size": config.queue.size,
      "image_size": config.model.image.image_size,
      "max_len": config.input.max_len,
      "dtype": config.model.dtype,
      "remat": config.model.remat,
      "num_params": sum(x.size for x in jax.tree.leaves(state["params"])),
      "compile_seconds": compile_seconds,
      "per_chip_bytes": per_chip_bytes,
      "per_chip_gib": per_chip_bytes / GIB,
      "per_chip_parts": parts,
      "hbm_bytes": chip.hbm_bytes,
      "fits_hbm": per_chip_bytes <= chip.hbm_bytes,
      "state_bytes_per_chip": state_bytes_per_device(state) * per_chip,
      "state_bytes_total": checkpoint.state_bytes(state),
      "flops_per_step": flops_per_step,
      "analytic_flops_per_step": analytic_per_step,
      "analytic_flops_parts_per_step": {k: v * batch for k, v in analytic.items()},
      "flops_ratio": flops_per_step / analytic_per_step,
      "peak_flops_per_chip": chip.peak_bf16_flops,
      "step_seconds_at_peak": seconds_at_peak,
      "step_time": step_time,
      "mfu_at_step_time": seconds_at_peak / step_time if step_time else None,
      **hlo_findings(compiled, config, len(devices), top_buffers),
  }


def summary(results):
  """A few lines for people: memory per chip, FLOPs, MFU, the contrastive logits."""
  r, parts = results, results["per_chip_parts"]

  def gib(num_bytes):
    return f"{num_bytes / GIB:.2f}"

  mesh = " x ".join(f"{name}={size}" for name, size in r["mesh"].items())
  lines = [
      f"{r['topology']}: {r['num_chips']} chips ({r['device_kind']}, {r['devices_per_chip']} "
      f"device(s)/chip), mesh {mesh}; batch {r['global_batch']}, queue {r['queue_size']}, "
      f"{r['dtype']}, remat {'on' if r['remat'] else 'off'}; compiled in "
      f"{r['compile_seconds']:.0f} s",
      f"memory per chip: {gib(r['per_chip_bytes'])} GiB of {gib(r['hbm_bytes'])} GiB HBM "
      f"({'fits' if r['fits_hbm'] else 'DOES NOT FIT'}) = arguments {gib(parts['arguments'])} + "
      f"temporaries {gib(parts['temporaries'])} + outputs {gib(parts['outputs'])} - aliased "
      f"{gib(parts['aliased'])}; train state {gib(r['state_bytes_per_chip'])} GiB/chip, "
      f"{gib(r['state_bytes_total'])} GiB in all",
      f"FLOPs per step: compiled {r['flops_per_step']:.3e}, analytic "
      f"{r['analytic_flops_per_step']:.3e} (ratio {r['flops_ratio']:.3f}); at "
      f"{r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s per chip a step needs >= "
      f"{r['step_seconds_at_peak']:.3f} s",
  ]
  if r["step_time"]:
    lines.append(f"MFU at {r['step_time']} s/step: {100 * r['mfu_at_step_time']:.1f}%")
  if "hlo_unreadable" in r:
    lines.append(f"contrastive logits: the compiled HLO is unreadable ({r['hlo_unreadable']})")
    return "\n".join(lines)
  logits = r["contrastive_logits"]
  lines.append(f"contrastive logits per device: {', '.join(logits['per_device_shapes'])} "
               f"(whole {logits['whole_shape']}: "
               f"{'MATERIALISED' if logits['materialised_whole'] else 'never materialised'})")
  return "\n".join(lines)


def define_flags():
  """The command-line flags. Defined only when this module runs as a program: absl flags are
  process-wide, and other benchmarks that tests import beside this one define --config too."""
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  flags.DEFINE_string("topology", None,
                      "TPU topology GENERATION:SHAPE, e.g. v5e:16x16, v4:4x4x4, v5p:4x4x4.")
  flags.DEFINE_string("out", None, "Where to write the JSON results.")
  flags.DEFINE_string("mesh", None, "Mesh as name:size,... with one size -1 for the rest, e.g. "
                      "data:-1,fsdp:16 (default: config.mesh).")
  flags.DEFINE_integer("batch_size", None, "Global batch (default: config.input.batch_size).")
  flags.DEFINE_float("step_time", None, "Seconds per step at which to state the MFU.")
  flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  del argv
  jax.config.update("jax_platforms", "cpu")  # the host only traces; libtpu compiles
  args = flags.FLAGS
  config = args.config
  if args.mesh:
    config.mesh = parse_mesh(args.mesh)
  if args.batch_size:
    config.input.batch_size = args.batch_size
  results = compile_report(config, args.topology, args.step_time)
  print(summary(results))
  benchmarks.write_results(results, args.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
