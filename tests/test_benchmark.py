"""The benchmarks: the train step (GEMM shape, peak, result fields), the input pipeline and the
checkpoint save."""

import json
import math

import jax
import numpy as np
import pytest

from configs import common
from cots_jax import benchmarks
from cots_jax import flops
from cots_jax import state as state_lib
from cots_jax.benchmarks import checkpoint_save
from cots_jax.benchmarks import input_pipeline
from cots_jax.benchmarks import train_step


def _config():
  config = common.base_config("tiny")
  config.model.image.image_size, config.model.image.patch_size = 24, 8
  for tower in (config.model.image, config.model.text):
    tower.width, tower.depth, tower.heads = 32, 1, 2
  config.model.embed_dim, config.vq.codebook_size, config.vq.hidden = 16, 16, 16
  config.input.batch_size, config.queue.size = 8, 32
  config.input.data.num_train_images = 40
  config.input.mvm_min_block = 2
  return config


def test_largest_gemm_is_the_bigger_tower_mlp():
  config = _config()
  config.input.max_len = 36
  assert train_step.largest_gemm(config) == (8 * 36, 32, 128)  # 36 text tokens > 10 image tokens


def test_matmul_peak_is_a_positive_rate():
  assert train_step.matmul_peak((64, 32, 48), "float32", bursts=2, min_seconds=0.01) > 1e6


def test_benchmark_reports_consistent_figures():
  config = _config()
  results = train_step.benchmark(config, warmup_steps=1, timed_steps=2)
  assert results["analytic_flops_per_pair"] == flops.cots_step_flops_per_pair(config)["total"]
  assert results["pairs_per_sec"] == pytest.approx(8 / results["step_seconds_median"])
  assert results["mfu"] == pytest.approx(
      results["analytic_flops_per_pair"] * results["pairs_per_sec"]
      / results["peak_flops_per_sec"])
  assert results["xla_flops_per_pair"] > 0


def test_input_pipeline_benchmark_reports_rates_per_size_and_workers_needed():
  config = _config()
  results = input_pipeline.benchmark(config, num_batches=2, sizes=[32], warmup_steps=1,
                                     timed_steps=1)
  rates = results["images_per_sec_per_worker"]
  assert set(rates) == {"24", "32"} and min(rates.values()) > 0
  assert results["workers_needed"] == math.ceil(results["train_step_pairs_per_sec"] / rates["24"])
  assert config.model.image.image_size == 24  # the caller's config is left as it was


def test_randomized_state_keeps_shapes_shardings_and_integer_leaves():
  config = _config()
  built = state_lib.build(config, state_lib.make_mesh(config))
  state = built.fresh_state()
  step, queue_idx = np.asarray(state["step"]), np.asarray(state["queue"]["idx"])
  filled = checkpoint_save.randomized(state, built.shardings)
  for leaf, spec in zip(jax.tree.leaves(filled), jax.tree.leaves(built.abstract)):
    assert (leaf.shape, leaf.dtype, leaf.sharding) == (spec.shape, spec.dtype, spec.sharding)
  np.testing.assert_array_equal(filled["step"], step)
  np.testing.assert_array_equal(filled["queue"]["idx"], queue_idx)
  moments = max((x for x in jax.tree.leaves(filled["opt"]) if x.dtype == np.float32),
                key=lambda x: x.size)
  assert np.asarray(moments).std() > 0.5  # a fresh Adam moment is all zeros


def test_checkpoint_benchmark_reports_size_and_times(tmp_path):
  config = _config()
  results = checkpoint_save.benchmark(config, saves=2, workdir=str(tmp_path))
  assert 0.5 < results["checkpoint_bytes_on_disk"] / results["state_bytes"] < 1.5
  assert len(results["blocked_seconds"]) == len(results["written_seconds"]) == 2
  assert all(0 < b <= w for b, w in zip(results["blocked_seconds"], results["written_seconds"]))
  assert results["save_blocked_seconds_median"] == results["blocked_seconds"][1]


def test_write_results_writes_json_only_when_given_a_path(tmp_path):
  path = tmp_path / "out.json"
  benchmarks.write_results({"pairs_per_sec": 1.5}, str(path))
  assert json.loads(path.read_text()) == {"pairs_per_sec": 1.5}
  benchmarks.write_results({"pairs_per_sec": 2.0}, None)
  assert json.loads(path.read_text()) == {"pairs_per_sec": 1.5}
