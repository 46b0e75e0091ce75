"""Local paths and object-store URLs (gs://, s3://, az://) behind one API: `etils.epath.Path`.

Every file of a workdir, `config.init_from` or `config.vq.init` goes through epath, so the same
code writes to a local disk and to the GCS bucket that all workers of a TPU pod share. epath
reaches gs:// through fsspec + gcsfs (or tf.io.gfile where TensorFlow is installed); Orbax uses
the same epath paths, and tensorstore writes the arrays itself.
"""

import os

from etils import epath

# The metrics of a run's last eval, written to WORKDIR when it finishes (train.py), read by
# cots_jax/experiments to tell a finished run and report it.
FINAL_EVAL_FILE = "final_eval.json"


def is_local(path):
  """True for a local path (relative or absolute), False for a URL such as gs://bucket/dir."""
  return "://" not in os.fspath(path)


def absolute(path):
  """`path` as an `epath.Path`: a local one made absolute (Orbax wants absolute directories), a
  URL as it is (`os.path.abspath` would turn gs://b/x into $PWD/gs:/b/x)."""
  return epath.Path(os.path.abspath(path) if is_local(path) else path)
