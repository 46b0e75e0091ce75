"""Writes scalars to `metrics.jsonl` and TensorBoard event files (design §4.2), on process 0 only.

The workdir may be local or a gs:// bucket (cots_jax/paths.py). GCS objects cannot be appended
to (gcsfs even turns append mode into overwrite, with a warning, losing the earlier lines), so
on a bucket metrics.jsonl is held in memory, lines already there included, and uploaded whole at
every `write`: an upload replaces the object at once, so a reader sees every line written so far
and never half a line. That costs one upload of the whole file per write (a long run's file is a
few MB). TensorBoard events go to gs:// through tensorboardX's own writer (google-cloud-storage),
which likewise uploads its whole event file at each flush.
"""

import io
import json

from etils import epath
import tensorboardX

from cots_jax import paths


class _WholeObjectLog:
  """An append-only text file on an object store: keeps all of its text and re-uploads it at
  every `flush` (the text file interface `MetricWriter` needs: write, flush, close)."""

  def __init__(self, path):
    self._path = path
    self._text = io.StringIO(path.read_text() if path.exists() else "")
    self._text.seek(0, io.SEEK_END)

  def write(self, text):
    self._text.write(text)

  def flush(self):
    self._path.write_text(self._text.getvalue())

  def close(self):
    self.flush()


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
                     else _WholeObjectLog(jsonl))
      self._tb = tensorboardX.SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

  def write(self, step, scalars):
    """Writes one line for `step` (flushed: on a bucket, uploaded); values become Python floats."""
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
  """Reads WORKDIR/metrics.jsonl (local or gs://) back as a list of dicts (for tests, reports
  and tables)."""
  text = (epath.Path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]
