"""metrics.jsonl and TensorBoard events (design §4.2)."""

import json
import os

import numpy as np
import pytest

from cots_jax.metrics_writer import MetricWriter, read_metrics, read_series


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


def test_read_series_keeps_the_last_record_of_a_step(tmp_path):
  records = [{"step": 3, "train/loss": 1.0, "train/temp": 0.07},
             {"step": 6, "train/loss": 3.0},
             {"step": 3, "train/loss": 10.0},  # the resumed run logs step 3 again
             {"step": 6, "eval/retrieval/t2i_r1": 50.0}]  # same step, separate write
  lines = [json.dumps(record) for record in records]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")
  metrics = read_series(tmp_path)
  assert list(metrics) == ["train/loss", "train/temp", "eval/retrieval/t2i_r1"]
  np.testing.assert_array_equal(metrics["train/loss"][0], [3, 6])
  np.testing.assert_array_equal(metrics["train/loss"][1], [10.0, 3.0])
  np.testing.assert_array_equal(metrics["train/temp"][1], [0.07])
  np.testing.assert_array_equal(metrics["eval/retrieval/t2i_r1"][0], [6])
  with pytest.raises(FileNotFoundError, match="has logged no metrics"):
    read_series(tmp_path / "nowhere")
