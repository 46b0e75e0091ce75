"""The TPU fit proof (cots_jax/benchmarks/compile_tpu.py): the real update step, compiled by libtpu
for small TPU topologies with tiny towers. libtpu is in the test extra; without it these tests fail
and say `pip install -e '.[test]'`.

Two compiles: the command line on v5e:2x2 (4 chips, a data mesh) in a subprocess, started first so
that it runs alongside the in-process compile on v4:2x2x1 (4 chips, 8 devices, data x fsdp).
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import common
from cots_jax import flops
from cots_jax.benchmarks import compile_tpu

# Ahead-of-time compiles for TPU topologies with libtpu: tens of seconds each (`-m "not slow"`
# leaves them out).
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
# runlocal's towers of width 64, with one layer each, on 16 px images and 8-token captions.
TINY = {"model.image.image_size": 16, "model.image.depth": 1, "model.text.depth": 1,
        "input.max_len": 8, "queue.size": 128}
BATCH = 64
STEP_TIME = 0.5


def tiny_config(mesh):
  """configs/pretrain.py:runlocal with TINY applied, global batch BATCH, on `mesh`."""
  config = common.base_config("tiny")
  common.shrink_for_runlocal(config)
  config.update_from_flattened_dict(TINY)
  config.input.batch_size = BATCH
  config.mesh = mesh
  return config


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
  """{"v5e": the command line's JSON and printout, "v4": compile_report's dict and config}."""
  out = tmp_path_factory.mktemp("compile_tpu") / "v5e.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  for name in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD"):
    env.pop(name, None)  # the program must set them itself
  command = [sys.executable, "-m", "cots_jax.benchmarks.compile_tpu",
             "--config=configs/pretrain.py:runlocal", "--topology=v5e:2x2", "--mesh=data:-1",
             f"--batch_size={BATCH}", f"--step_time={STEP_TIME}", f"--out={out}"]
  command += [f"--config.{dotted}={value}" for dotted, value in TINY.items()]
  cli = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
  try:
    v4_config = tiny_config([("data", -1), ("fsdp", 2)])
    v4 = compile_tpu.compile_report(v4_config, "v4:2x2x1", step_time=STEP_TIME)
    stdout, stderr = cli.communicate(timeout=600)
  finally:
    cli.kill()
  assert cli.returncode == 0, stderr[-3000:]
  with open(out, encoding="utf-8") as f:
    v5e = json.load(f)
  return {"v5e": (v5e, stdout, stderr, tiny_config([("data", -1)])), "v4": (v4, v4_config)}


def check_report(results, config, topology, kind, devices_per_chip, mesh):
  """The fields every report must have, each against its own definition."""
  assert results["topology"] == topology and results["device_kind"] == kind
  assert results["devices_per_chip"] == devices_per_chip and results["num_chips"] == 4
  assert results["mesh"] == mesh
  assert results["global_batch"] == BATCH and results["queue_size"] == 128
  assert results["dtype"] == "float32" and results["remat"] is False
  parts = results["per_chip_parts"]
  assert results["per_chip_bytes"] > 0
  assert results["per_chip_bytes"] == (parts["arguments"] + parts["temporaries"]
                                       + parts["outputs"] - parts["aliased"])
  # The donated state is aliased to the new state: the outputs do not count twice.
  assert parts["aliased"] > 0.9 * results["state_bytes_per_chip"]
  hbm = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB}[kind]
  assert results["hbm_bytes"] == hbm and results["fits_hbm"] is True
  analytic = flops.cots_step_flops_per_pair(config)["total"] * BATCH
  assert results["analytic_flops_per_step"] == pytest.approx(analytic)
  # Design ruling 9: XLA's count of the step without remat within 0.8-1.25 of the analytic one.
  assert 0.8 <= results["flops_ratio"] <= 1.25
  assert results["flops_ratio"] == pytest.approx(results["flops_per_step"] / analytic)
  peak = {"TPU v4": 275e12, "TPU v5 lite": 197e12}[kind]
  assert results["peak_flops_per_chip"] == peak
  assert results["mfu_at_step_time"] == pytest.approx(analytic / (STEP_TIME * 4 * peak))
  devices = 4 * devices_per_chip
  columns = 128 + BATCH  # runlocal's in-batch negatives: B + K columns
  logits = results["contrastive_logits"]
  assert logits["whole_shape"] == [BATCH, columns]
  assert f"f32[{BATCH // devices}, {columns}]" in logits["per_device_shapes"]
  assert not logits["materialised_whole"]
  assert logits["largest_per_device_bytes"] == BATCH // devices * columns * 4
  assert results["largest_buffers_per_device"][0]["bytes"] > 0


def test_command_line_on_v5e_with_a_data_mesh(reports):
  results, stdout, stderr, config = reports["v5e"]
  check_report(results, config, "v5e:2x2", "TPU v5 lite", 1, {"data": 4})
  # A data mesh replicates the state: every chip holds all of it.
  assert results["state_bytes_per_chip"] == results["state_bytes_total"]
  assert "fits" in stdout and f"f32[{BATCH // 4}, {128 + BATCH}]" in stdout
  assert "TPU_ACCELERATOR_TYPE" not in stderr and "TPU_WORKER_HOSTNAMES" not in stderr


def test_report_on_v4_with_a_data_by_fsdp_mesh(reports):
  results, config = reports["v4"]
  check_report(results, config, "v4:2x2x1", "TPU v4", 2, {"data": 4, "fsdp": 2})
  # FSDP over 2 devices halves the large arrays; small ones stay whole on every device.
  per_device = results["state_bytes_per_chip"] / 2
  assert results["state_bytes_total"] / 2 <= per_device < 0.6 * results["state_bytes_total"]
  text = compile_tpu.summary(results)
  assert "v4:2x2x1: 4 chips" in text and "fits" in text and "MFU at 0.5 s/step" in text
  assert f"f32[{BATCH // 8}, {128 + BATCH}]" in text and "never materialised" in text
  unread = {k: v for k, v in results.items()
            if k not in ("contrastive_logits", "largest_buffers_per_device")}
  unread_text = compile_tpu.summary({**unread, "hlo_unreadable": "INTERNAL: RET_CHECK failure"})
  assert unread_text.startswith(text.split("\ncontrastive")[0])
  assert unread_text.endswith("the compiled HLO is unreadable (INTERNAL: RET_CHECK failure)")


def test_cost_and_memory_analyses_are_per_device():
  """A [M, K] @ [K, N] product with rows split over 4 devices: XLA reports a quarter of its
  2 M K N FLOPs and a device's share of the arguments, so the report sums over devices."""
  m, k, n = 1024, 512, 256
  devices = compile_tpu.tpu_devices("v5e:2x2")
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  a = jax.ShapeDtypeStruct((m, k), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  b = jax.ShapeDtypeStruct((k, n), jnp.float32, sharding=NamedSharding(mesh, P()))
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  assert compiled.cost_analysis()["flops"] == 2 * m * k * n / 4
  assert compiled.memory_analysis().argument_size_in_bytes == (m // 4 * k + k * n) * 4


def test_missing_libtpu_says_how_to_install(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *args: None if name == "libtpu" else find_spec(name, *args))
  with pytest.raises(ImportError, match=r"needs libtpu: pip install -e '\.\[test\]'"):
    compile_tpu.tpu_devices("v5e:2x2")


def test_devices_per_chip():
  assert compile_tpu.devices_per_chip(compile_tpu.tpu_devices("v4:2x2x1")) == 2
  assert compile_tpu.devices_per_chip(compile_tpu.tpu_devices("v5e:2x2")) == 1


def test_unknown_topology_is_a_clear_error():
  with pytest.raises(ValueError, match=r"no TPU topology --topology='v9x:2x2'.*GENERATION:SHAPE"):
    compile_tpu.tpu_devices("v9x:2x2")


def test_parse_mesh():
  assert compile_tpu.parse_mesh("data:-1,fsdp:16") == [("data", -1), ("fsdp", 16)]
  assert compile_tpu.parse_mesh("data:8") == [("data", 8)]
  with pytest.raises(ValueError, match="name:size"):
    compile_tpu.parse_mesh("data=8")


HLO = """\
HloModule jit_step, is_scheduled=true

%fused_computation.1 (param_0: f32[4,80]) -> (f32[4], f32[4,80]) {
  %param_0 = f32[4,80]{1,0:T(4,128)} parameter(0)
  %exp.1 = f32[4,80]{1,0:T(4,128)} exponential(%param_0)
  ROOT %tuple.1 = (f32[4]{0:T(128)}, f32[4,80]{1,0:T(4,128)S(1)}) tuple(%r, %exp.1)
}

ENTRY %main (p.1: bf16[16,80]) -> f32[4] {
  %p.1 = bf16[16,80]{1,0:T(8,128)} parameter(0)
  %fusion.1 = (f32[4]{0}, f32[4,80]{1,0:T(4,128)S(1)}) fusion(%p.1), calls=%fused_computation.1
  %copy-start.1 = (bf16[16,80]{1,0}, bf16[16,80]{1,0}, u32[]) copy-start(%p.1)
  %all-gather.1 = s32[2,3,5]{2,1,0} all-gather(%x), dimensions={0}
  %convert.1 = s4[3]{0:E(4)} convert(%y)
  ROOT %get-tuple-element.1 = f32[4]{0:T(128)} get-tuple-element(%fusion.1), index=0
}
"""


class _UnreadableHlo:
  def as_text(self):
    raise jax.errors.JaxRuntimeError("INTERNAL: RET_CHECK failure\nstack trace")


def test_unreadable_hlo_leaves_the_other_figures():
  findings = compile_tpu.hlo_findings(_UnreadableHlo(), tiny_config([("data", -1)]), 4, 2)
  assert findings == {"hlo_unreadable": "INTERNAL: RET_CHECK failure"}


def test_hlo_arrays_reads_tuples_layouts_and_fusions():
  arrays = compile_tpu.hlo_arrays(HLO)
  found = [(a["name"], a["op"], a["dtype"], a["shape"], a["bytes"], a["in_fusion"])
           for a in arrays]
  assert found == [
      ("param_0", "parameter", "f32", (4, 80), 1280, True),
      ("exp.1", "exponential", "f32", (4, 80), 1280, True),
      ("tuple.1", "tuple", "f32", (4,), 16, True),
      ("tuple.1", "tuple", "f32", (4, 80), 1280, True),
      ("p.1", "parameter", "bf16", (16, 80), 2560, False),
      ("fusion.1", "fusion", "f32", (4,), 16, False),
      ("fusion.1", "fusion", "f32", (4, 80), 1280, False),
      ("copy-start.1", "copy-start", "bf16", (16, 80), 2560, False),
      ("copy-start.1", "copy-start", "bf16", (16, 80), 2560, False),
      ("copy-start.1", "copy-start", "u32", (), 4, False),
      ("all-gather.1", "all-gather", "s32", (2, 3, 5), 120, False),
      ("convert.1", "convert", "s4", (3,), 2, False),
      ("get-tuple-element.1", "get-tuple-element", "f32", (4,), 16, False),
  ]
  largest = compile_tpu.largest_buffers(arrays, top=2)
  assert [(a["name"], a["shape"]) for a in largest] == [("fusion.1", (4, 80)),
                                                        ("all-gather.1", (2, 3, 5))]
