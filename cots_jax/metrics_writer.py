"""Writes scalars to `metrics.jsonl` and TensorBoard event files (design §4.2), on process 0 only.

The workdir may be local or a gs:// bucket (cots_jax/paths.py). Locally metrics.jsonl is an
append-mode file flushed at every line (one write call), so it is complete up to the last step
even when a run is killed. GCS objects cannot be appended to (gcsfs even turns append mode into
overwrite, with a warning, losing the earlier lines), so on a bucket metrics.jsonl is held in
memory, lines already there included, and uploaded whole: the first line at once, then at most
every `FLUSH_SECS`, and at `close`. An upload replaces the object at once, so a reader sees every
line up to one `FLUSH_SECS` ago and never half a line. TensorBoard events follow the same
schedule through tensorboardX's `flush_secs` (to gs:// with its own writer, google-cloud-storage,
which also uploads its whole event file at each flush).
"""

import io
import json
import math
import time

from etils import epath
import numpy as np
import tensorboardX

from cots_jax import paths

# Seconds that TensorBoard, and metrics.jsonl on a bucket, may lag behind the run.
FLUSH_SECS = 60


class _WholeObjectLog:
  """An append-only text file on an object store: keeps all of its text and uploads it whole at
  a `flush` once `flush_secs` have passed since the last upload, and at `close` (the text file
  interface `MetricWriter` needs: write, flush, close)."""

  def __init__(self, path, flush_secs):
    self._path = path
    self._flush_secs = flush_secs
    self._uploaded_at = -math.inf  # the first flush uploads
    self._text = io.StringIO(path.read_text() if path.exists() else "")
    self._text.seek(0, io.SEEK_END)

  def write(self, text):
    self._text.write(text)

  def flush(self):
    if time.monotonic() - self._uploaded_at >= self._flush_secs:
      self._upload()

  def close(self):
    self._upload()

  def _upload(self):
    self._path.write_text(self._text.getvalue())
    self._uploaded_at = time.monotonic()


class MetricWriter:
  """Appends `{"step": int, name: float, ...}` lines to WORKDIR/metrics.jsonl and mirrors them
  as TensorBoard scalars (tensorboardX) under WORKDIR/tensorboard. A no-op when `enabled` is False.
  A restarted run appends to the lines of the previous one, also on a bucket.
  """

  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    if enabled:
      jsonl = epath.Path(workdir) / "metrics.jsonl"
      self._jsonl = (jsonl.open("a", encoding="utf-8") if paths.is_local(workdir)
                     else _WholeObjectLog(jsonl, FLUSH_SECS))
      self._tb = tensorboardX.SummaryWriter(str(epath.Path(workdir) / "tensorboard"),
                                            flush_secs=FLUSH_SECS)

  def write(self, step, scalars):
    """Writes one line for `step` (flushed locally, uploaded on a bucket by the schedule of the
    module docstring); values become Python floats."""
    if not self.enabled:
      return
    values = {name: float(value) for name, value in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, int(step))

  def close(self):
    """Flushes and closes both files (uploads them on a bucket)."""
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def read_metrics(workdir):
  """Reads WORKDIR/metrics.jsonl (local or gs://) back as a list of dicts (for tests, reports
  and tables)."""
  text = (epath.Path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_series(workdir):
  """WORKDIR/metrics.jsonl as {name: (steps int64 [n], values float64 [n])}, sorted by step.

  A step logged twice (a resumed run) keeps the value of its LAST record (cots_jax/checkpoint.py);
  names keep the order in which they first appear.
  """
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: {workdir!r} has logged no metrics")
  by_name = {}
  for record in read_metrics(workdir):
    for name, value in record.items():
      if name != "step":
        by_name.setdefault(name, {})[int(record["step"])] = float(value)
  return {name: (np.array(sorted(values), np.int64),
                 np.array([values[step] for step in sorted(values)], np.float64))
          for name, values in by_name.items()}
