"""Throughput and MFU of the real COTS update step.

  python -m cots_jax.benchmarks.train_step --config=configs/pretrain.py --out=step.json
  python -m cots_jax.benchmarks.train_step --config=configs/pretrain.py \
      --config.loss.mlm=0 --config.loss.mvm=0 --config.loss.kl_align=0     # ITC only

Prints and writes as JSON: pairs/s (median over timed steps after warm-up), the analytic FLOPs
per pair (cots_jax.flops) and XLA's compiled count, the measured peak of a dense matmul of the
model's largest GEMM shape on all cores, and MFU = achieved FLOP/s / peak. The batches are real
pipeline batches, staged on the device before timing so the host pipeline is not measured. The
state is the run's (`state.build`, pretrained towers and init_from included), except that the
frozen VQ tokenizer is an untrained one of the configured shape (same FLOPs as a trained one),
and so are the batches: a fully locked tower's features are cached first (in
`config.feature_cache_dir`, else a temporary directory) and fed to the step, as in the run. The
JSON also records the locks, the cached towers, whether there is a momentum encoder and the
floats of each part of the state, which show what locking, caching and dropping the momentum
encoder save.
"""

import json
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from cots_jax import benchmarks
from cots_jax import features
from cots_jax import flops
from cots_jax import sharding
from cots_jax import state as state_lib
from cots_jax import step as step_lib
from cots_jax.data import pipeline

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.")
WARMUP = flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after compilation.")
STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
flags.mark_flags_as_required(["config"])


def largest_gemm(config):
  """(M, K, N) of the biggest matmul of the towers: the MLP up-projection over the batch."""
  b = config.input.batch_size
  image, text = config.model.image, config.model.text
  n_img = flops.image_tokens(config, train=True)
  gemms = [(b * n_img, image.width, int(image.width * image.mlp_ratio)),
           (b * config.input.max_len, text.width, int(text.width * text.mlp_ratio))]
  return max(gemms, key=lambda s: s[0] * s[1] * s[2])


def matmul_peak(shape, dtype, bursts=5, min_seconds=0.25):
  """FLOP/s of a dense `[M,K] @ [K,N]` in `dtype`.

  Single short calls vary by +-15% between runs on a CPU, so each timing is one jitted loop of
  back-to-back products that lasts at least `min_seconds`; the rate is the median of `bursts`.
  """
  m, k, n = shape

  @jax.jit
  def repeated_matmul(a, b, calls):
    def body(_, carry):
      # `carry` is always 0; it chains each product to the last so that XLA cannot hoist it.
      return jnp.max(jnp.matmul(a, b + carry)) * 0
    return jax.lax.fori_loop(0, calls, body, jnp.zeros((), dtype))

  a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)

  def burst(calls):
    start = time.perf_counter()
    repeated_matmul(a, b, calls).block_until_ready()
    return time.perf_counter() - start

  burst(1)
  calls, elapsed = 1, burst(1)
  while elapsed < min_seconds:
    calls = max(2 * calls, int(calls * 1.2 * min_seconds / elapsed))
    elapsed = burst(calls)
  times = [burst(calls) for _ in range(bursts)]
  return 2 * m * k * n * calls / float(np.median(times))


def benchmark(config, warmup_steps, timed_steps):
  """Runs the update step and returns the results dict."""
  built = state_lib.build(config, state_lib.make_mesh(config))
  config, mesh = built.config, built.mesh
  state = built.initial_state()
  update = step_lib.jit_update(built)

  with tempfile.TemporaryDirectory() as workdir:
    tables = features.feature_tables(config, built.model, state["params"], None, workdir)
  data = pipeline.make_train_iterator(config, features=tables.train if tables else None)
  batches = [sharding.global_batch(next(data), mesh) for _ in range(4)]
  compiled = update.lower(state, batches[0]).compile()
  cost = compiled.cost_analysis()
  for i in range(warmup_steps):
    state, metrics = update(state, batches[i % len(batches)])
  jax.block_until_ready(metrics)
  times = []
  for i in range(timed_steps):
    start = time.perf_counter()
    state, metrics = update(state, batches[i % len(batches)])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)

  step_seconds = float(np.median(times))
  pairs_per_sec = config.input.batch_size / step_seconds
  cached = features.cached_towers(config)
  analytic = flops.cots_step_flops_per_pair(config, cached)
  gemm = largest_gemm(config)
  dtype = jnp.dtype(config.model.dtype)
  peak = matmul_peak(gemm, dtype)
  achieved = analytic["total"] * pairs_per_sec
  return {
      "device": str(jax.devices()[0].device_kind),
      "num_devices": jax.device_count(),
      "batch_size": config.input.batch_size,
      "loss_weights": dict(config.loss),
      "locked": {tower: config.model[tower].locked for tower in ("image", "text")},
      "cached_towers": list(cached),
      "momentum_encoder": "params_ema" in state,
      "state_floats": {key: sum(int(x.size) for x in jax.tree.leaves(state[key]))
                       for key in ("params", "params_ema", "opt", "queue") if key in state},
      "step_seconds_median": step_seconds,
      "pairs_per_sec": pairs_per_sec,
      "analytic_flops_per_pair": analytic["total"],
      "analytic_flops_parts_per_pair": analytic,
      "xla_flops_per_pair": float(cost.get("flops", float("nan"))) / config.input.batch_size,
      "peak_gemm_shape": gemm,
      "peak_dtype": str(dtype),
      "peak_flops_per_sec": peak,
      "achieved_flops_per_sec": achieved,
      "mfu": achieved / peak,
  }


def main(argv):
  del argv
  results = benchmark(CONFIG.value, WARMUP.value, STEPS.value)
  print(json.dumps(results, indent=2))
  benchmarks.write_results(results, OUT.value)


if __name__ == "__main__":
  app.run(main)
