"""Saving, loading and checking the VQ tokenizer used by pre-training (design §8.1, §8.12)."""

import jax
import numpy as np
import pytest

from configs import common
from cots_jax import vq_trainer
from cots_jax.metrics_writer import MetricWriter, read_metrics


def _config():
  config = common.base_config("tiny")
  config.model.image.image_size, config.model.image.patch_size = 24, 8
  config.vq.codebook_size, config.vq.hidden, config.vq.steps = 16, 16, 30
  config.vq.batch_size, config.vq.log_every = 16, 10
  config.input.data.num_train_images, config.input.data.num_eval_images = 64, 20
  return config


def test_save_load_round_trip_and_mismatch_names_the_fields(tmp_path):
  config = _config()
  variables = vq_trainer.random_tokenizer(config, jax.random.PRNGKey(0))
  vq_trainer.save_tokenizer(str(tmp_path / "vq"), variables["params"], config)
  for path in (tmp_path, tmp_path / "vq"):  # a workdir or the tokenizer dir itself
    loaded = vq_trainer.load_tokenizer(str(path), config)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  config.vq.codebook_size = 32
  with pytest.raises(ValueError, match=r"'codebook_size': \(16, 32\)"):
    vq_trainer.load_tokenizer(str(tmp_path), config)
  with pytest.raises(FileNotFoundError, match="config.vq.init"):
    vq_trainer.load_tokenizer(str(tmp_path / "nowhere"), config)


def test_obtain_tokenizer_trains_once_then_reuses_the_workdir(tmp_path, capsys):
  config = _config()
  workdir = str(tmp_path)
  writer = MetricWriter(workdir)
  first = vq_trainer.obtain_tokenizer(config, workdir, writer)
  assert "training a VQ tokenizer for 30 steps" in capsys.readouterr().out
  assert [r["step"] for r in read_metrics(workdir + "/vq") if "vq/loss" in r] == [10, 20, 30]
  second = vq_trainer.obtain_tokenizer(config, workdir, writer)
  assert "training" not in capsys.readouterr().out
  jax.tree.map(np.testing.assert_array_equal, first, second)
  writer.close()
  quality = [r for r in read_metrics(workdir) if "vq/eval_perplexity" in r]
  assert len(quality) == 2 and quality[0]["vq/eval_perplexity"] > 1


def test_obtain_tokenizer_with_mvm_off_trains_nothing(tmp_path, capsys):
  config = _config()
  config.loss.mvm = 0.0
  config.vq.init = str(tmp_path / "nowhere")  # never read when MVM is off
  writer = MetricWriter(str(tmp_path))
  variables = vq_trainer.obtain_tokenizer(config, str(tmp_path), writer)
  writer.close()
  assert "MVM is off" in capsys.readouterr().out
  assert not (tmp_path / "vq").exists() and read_metrics(str(tmp_path)) == []
  expected = vq_trainer.random_tokenizer(config, jax.random.PRNGKey(config.seed))
  jax.tree.map(np.testing.assert_array_equal, variables, expected)


def test_tokenizer_quality_against_numpy():
  config = _config()
  variables = vq_trainer.random_tokenizer(config, jax.random.PRNGKey(0))
  images = np.random.default_rng(0).uniform(-1, 1, (6, 24, 24, 3)).astype(np.float32)
  quality = vq_trainer.tokenizer_quality(config, variables["params"], images)
  expected_mean = np.mean((images - images.mean(axis=(1, 2), keepdims=True)) ** 2)
  assert quality["mean_colour_mse"] == pytest.approx(expected_mean, rel=1e-5)
  assert 1 <= quality["perplexity"] <= 16
  assert quality["codebook_fraction"] == pytest.approx(quality["perplexity"] / 16)
