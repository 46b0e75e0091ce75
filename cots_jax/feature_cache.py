"""Cached features of a locked tower (design §9.3): the pooled output of a frozen tower for every
example of a dataset, computed once and kept as safetensors files.

Layout: one file per name, `DIRECTORY/<name>.safetensors`, holding one tensor, "features"
(`[num_examples, D]`), and these metadata keys (strings, as safetensors wants):

  format_version  FORMAT_VERSION of the writer
  fingerprint     `fingerprint(...)` of the weights, preprocessing and examples it was made from
  shape, dtype    of "features": the JSON list of its sizes, the numpy dtype name

Trust rule: `load_or_build` uses a file only when it reads whole and its format version,
fingerprint, shape and dtype are all the ones asked for. Anything else (a missing, truncated or
corrupt file, another fingerprint...) is never used, never raises: the features are built again,
with one log line naming the file and the reason, and written over it. A file is staged beside
its final name and renamed over it, so a crash never leaves half a file under that name.

DIRECTORY may be a local path or a gs:// URL (read and written through etils.epath, like the
workdir, see cots_jax/paths.py).
"""

import hashlib
import json
import os
import uuid

from absl import logging
import jax
import numpy as np
import safetensors
import safetensors.numpy
import tqdm

from cots_jax import paths

# Bumped whenever the file layout or the fingerprint's recipe changes: older files are rebuilt.
FORMAT_VERSION = "1"
_TENSOR = "features"
_SHORT = 12  # hex digits of a fingerprint shown in the logs


def _update_framed(digest, data):
  """Feeds `data` (bytes-like) to `digest` behind its length, so that consecutive fields cannot
  run into each other ("ab", "c" and "a", "bc" hash differently)."""
  data = memoryview(data).cast("B")
  digest.update(len(data).to_bytes(8, "little"))
  digest.update(data)


def fingerprint(*, weights, preprocessing, examples):
  """The key of a tower's cached features: a sha256 hex digest.

  Args:
    weights: a pytree of arrays (numpy or fully addressable jax), the tower's parameters. Each
      leaf's key path, dtype, shape and bytes count, in the pytree's flattening order.
    preprocessing: a JSON-serialisable dict of everything else that shapes the output (tokenizer
      settings, max_len, image size, normalisation, pooling...); key order is ignored.
    examples: a sequence of str or bytes naming the examples in order (captions' text, image paths
      with size and mtime: the caller decides); order counts.

  Returns:
    64 hex digits.
  """
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(weights))[0]
  digest.update(len(leaves).to_bytes(8, "little"))
  for path, leaf in leaves:
    array = np.ascontiguousarray(leaf)
    # dtype.name, not dtype.str: bfloat16's str is the anonymous "<V2".
    _update_framed(digest, f"{jax.tree_util.keystr(path)}:{array.dtype.name}:{array.shape}"
                   .encode())
    _update_framed(digest, array.reshape(-1).view(np.uint8))
  _update_framed(digest, json.dumps(preprocessing, sort_keys=True, separators=(",", ":"))
                 .encode())
  digest.update(len(examples).to_bytes(8, "little"))
  for example in examples:
    _update_framed(digest, example.encode() if isinstance(example, str) else example)
  return digest.hexdigest()


def _read(path):
  """(metadata dict, "features" array) of a cache file.

  Raises:
    OSError, safetensors.SafetensorError, KeyError or ValueError when it is not a whole
    safetensors file with a "features" tensor.
  """
  if paths.is_local(path):
    with safetensors.safe_open(os.fspath(path), framework="numpy") as file:
      return file.metadata() or {}, file.get_tensor(_TENSOR)
  data = path.read_bytes()  # safetensors opens local files only
  tensors = safetensors.numpy.load(data)  # checks the header read below
  header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
  return header.get("__metadata__") or {}, tensors[_TENSOR]


def _describe(shape, dtype):
  """'float32 [23, 16]'."""
  return f"{np.dtype(dtype).name} {list(shape)}"


def _cached(path, fingerprint, shape, dtype):
  """(the array of the cache file at `path`, None) when the trust rule lets it be used, else
  (None, the reason it is not, for the log line)."""
  if not path.exists():
    return None, "missing"
  try:
    metadata, array = _read(path)
  except (OSError, safetensors.SafetensorError, KeyError, ValueError) as error:
    return None, f"unreadable, truncated or corrupt ({type(error).__name__}: {error})"
  if metadata.get("format_version") != FORMAT_VERSION:
    return None, (f"format version {metadata.get('format_version')!r}, not {FORMAT_VERSION!r} "
                  "of this reader")
  if metadata.get("fingerprint") != fingerprint:
    return None, ("made for other weights, preprocessing or examples (fingerprint "
                  f"{str(metadata.get('fingerprint'))[:_SHORT]}, now {fingerprint[:_SHORT]})")
  if array.shape != shape or array.dtype != dtype:
    return None, f"holds {_describe(array.shape, array.dtype)}, not {_describe(shape, dtype)}"
  return array, None


def _write(path, array, fingerprint):
  """Writes `array` as the cache file `path`: staged under a unique name beside it (two processes
  may write the same cache), then renamed over it."""
  data = safetensors.numpy.save(
      {_TENSOR: array},
      metadata={"format_version": FORMAT_VERSION, "fingerprint": fingerprint,
                "shape": json.dumps(list(array.shape)), "dtype": array.dtype.name})
  path.parent.mkdir(parents=True, exist_ok=True)
  staged = path.parent / f"{path.name}.tmp-{uuid.uuid4().hex}"
  try:
    staged.write_bytes(data)
    staged.replace(path)
  finally:
    if staged.exists():  # the write or the rename failed
      staged.unlink()


def load_or_build(directory, name, *, fingerprint, shape, dtype, build):
  """The features cached in `DIRECTORY/<name>.safetensors`, or `build()`'s, then cached there.

  The file is used only under the trust rule of this module's docstring; otherwise (one log line
  says why) `build()` makes the features, which are written over the file and returned.

  Args:
    directory: a local path or a gs:// URL; created when absent.
    name: the file's name without ".safetensors" (e.g. "coco_train_text").
    fingerprint: `fingerprint(...)` of what the features are made from.
    shape: the features' shape, e.g. (num_examples, D).
    dtype: their numpy dtype (e.g. np.float32).
    build: () -> numpy or jax array of `shape` and `dtype`, called only when the file is unusable.

  Returns:
    numpy array of `shape` and `dtype`.

  Raises:
    ValueError when `build()` returns another shape or dtype (the file is then left as it was).
  """
  path = paths.absolute(directory) / f"{name}.safetensors"
  shape, dtype = tuple(shape), np.dtype(dtype)
  array, reason = _cached(path, fingerprint, shape, dtype)
  if reason is None:
    logging.info("feature cache %s: using %s (fingerprint %s)", path, _describe(shape, dtype),
                 fingerprint[:_SHORT])
    return array
  # A missing file is the normal first run; any other reason means an unusable file was found.
  (logging.info if reason == "missing" else logging.warning)(
      "feature cache %s: %s; building it", path, reason)
  array = np.asarray(build())
  if array.shape != shape or array.dtype != dtype:
    raise ValueError(f"build() for {path} returned {_describe(array.shape, array.dtype)}, not "
                     f"{_describe(shape, dtype)}")
  _write(path, array, fingerprint)
  logging.info("feature cache %s: wrote %s (fingerprint %s)", path, _describe(shape, dtype),
               fingerprint[:_SHORT])
  return array


def compute_features(fn, num_examples, batch_size, get_batch, desc):
  """Runs a tower over every example, in batches of one static shape (one compilation).

  The last batch is padded to `batch_size` by repeating its last index, so that padding rows are
  real inputs (an all-zero row, e.g. an empty attention mask, may give NaN); they are dropped.

  Args:
    fn: batch -> [batch_size, D] features (a jitted tower call).
    num_examples: N > 0, the examples are indices 0..N-1.
    batch_size: examples per call of `fn`.
    get_batch: int numpy array [batch_size] of indices -> the batch of those examples.
    desc: the progress bar's label (shown on process 0 only, as the trainer's).

  Returns:
    float32 numpy array [N, D], row i from example i.
  """
  if num_examples < 1 or batch_size < 1:
    raise ValueError(f"num_examples ({num_examples}) and batch_size ({batch_size}) must be >= 1")
  chunks = []
  with tqdm.tqdm(total=num_examples, unit="ex", dynamic_ncols=True, desc=desc,
                 disable=jax.process_index() != 0) as progress:
    for start in range(0, num_examples, batch_size):
      count = min(batch_size, num_examples - start)
      indices = np.arange(start, start + batch_size).clip(max=num_examples - 1)
      features = np.asarray(fn(get_batch(indices)), dtype=np.float32)
      if features.ndim != 2 or features.shape[0] != batch_size:
        raise ValueError(f"fn must return [{batch_size}, D] features; got {features.shape}")
      chunks.append(features[:count])
      progress.update(count)
  return np.concatenate(chunks)
