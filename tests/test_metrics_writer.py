"""metrics.jsonl and TensorBoard events (design §4.2)."""

import os

import numpy as np

from cots_jax.metrics_writer import MetricWriter, read_metrics


def test_write_read_round_trip_and_tensorboard_events(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(10, {"train/loss": np.float32(1.5), "train/lr": 0.1})
  writer.write(20, {"eval/retrieval/i2t_r1": 50.0})
  writer.close()
  assert read_metrics(str(tmp_path)) == [
      {"step": 10, "train/loss": 1.5, "train/lr": 0.1},
      {"step": 20, "eval/retrieval/i2t_r1": 50.0}]
  events = os.listdir(tmp_path / "tensorboard")
  assert events and all(f.startswith("events.out.tfevents") for f in events)
  assert os.path.getsize(tmp_path / "tensorboard" / events[0]) > 100


def test_disabled_writer_writes_nothing(tmp_path):
  writer = MetricWriter(str(tmp_path), enabled=False)
  writer.write(1, {"train/loss": 1.0})
  writer.close()
  assert os.listdir(tmp_path) == []
