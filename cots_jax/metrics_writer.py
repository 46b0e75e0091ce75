"""Writes scalars to `metrics.jsonl` and TensorBoard event files (design §4.2), on process 0 only."""

import json
import os

import tensorboardX


class MetricWriter:
  """Appends `{"step": int, name: float, ...}` lines to WORKDIR/metrics.jsonl and mirrors them
  as TensorBoard scalars (tensorboardX) under WORKDIR/tensorboard. A no-op when `enabled` is False.
  """

  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    if enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step, scalars):
    """Writes one line for `step`; values are converted to Python floats."""
    if not self.enabled:
      return
    values = {name: float(value) for name, value in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def read_metrics(workdir):
  """Reads WORKDIR/metrics.jsonl back as a list of dicts (for tests, reports and tables)."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
