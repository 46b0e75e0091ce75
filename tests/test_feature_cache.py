"""Cached features of a locked tower (cots_jax/feature_cache.py, design §9.3): built once, read
back only under a matching fingerprint, format version, shape and dtype, rebuilt (with a log line
saying why) from anything else, written so that a crash leaves no half file."""

import json
import logging
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from cots_jax import feature_cache
# gs:// served from a local folder: test_remote_paths.py's stand-in for GCS.
from test_remote_paths import fixture_bucket_root  # noqa: F401  pylint: disable=unused-import

N, BATCH, D_IN, D = 23, 8, 4, 3
NAME = "coco_text"


def tower_weights(rng):
  """A tiny locked tower's parameters: one dense layer [D_IN -> D]."""
  return {"dense": {"kernel": rng.normal(size=(D_IN, D)).astype(np.float32),
                    "bias": rng.normal(size=(D,)).astype(np.float32)}}


def tower(weights, inputs):
  """[b, D_IN] -> [b, D] pooled features."""
  return jnp.tanh(inputs @ weights["dense"]["kernel"] + weights["dense"]["bias"])


WEIGHTS = tower_weights(np.random.default_rng(0))
INPUTS = np.random.default_rng(1).normal(size=(N, D_IN)).astype(np.float32)
PREPROCESSING = {"vocab": "ab12", "max_len": 30, "pooling": "cls"}
CAPTIONS = [f"a photo of thing {i}" for i in range(N)]
FINGERPRINT = feature_cache.fingerprint(weights=WEIGHTS, preprocessing=PREPROCESSING,
                                        examples=CAPTIONS)


class CountingBuild:
  """A `build` that returns `array` and counts its calls."""

  def __init__(self, array):
    self.array, self.calls = array, 0

  def __call__(self):
    self.calls += 1
    return self.array


def features(seed=2, shape=(N, D), dtype=np.float32):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def load(directory, build, fingerprint=FINGERPRINT, shape=(N, D), dtype=np.float32):
  return feature_cache.load_or_build(directory, NAME, fingerprint=fingerprint, shape=shape,
                                     dtype=dtype, build=build)


def cache_messages(caplog):
  """(level name, message) of each log line of the cache."""
  return [(r.levelname, r.getMessage()) for r in caplog.records
          if r.getMessage().startswith("feature cache")]


def test_features_are_built_once_then_read_back(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  build = CountingBuild(features())
  first = load(tmp_path, build)
  second = load(tmp_path, build)
  assert build.calls == 1
  np.testing.assert_array_equal(first, build.array)
  np.testing.assert_array_equal(second, build.array)
  assert second.dtype == np.float32 and second.shape == (N, D)
  path = tmp_path / f"{NAME}.safetensors"
  assert cache_messages(caplog) == [
      ("INFO", f"feature cache {path}: missing; building it"),
      ("INFO", f"feature cache {path}: wrote float32 [{N}, {D}] (fingerprint {FINGERPRINT[:12]})"),
      ("INFO", f"feature cache {path}: using float32 [{N}, {D}] (fingerprint {FINGERPRINT[:12]})"),
  ]


def test_the_file_holds_the_features_and_says_what_they_were_made_from(tmp_path):
  load(tmp_path, CountingBuild(features()))
  with open(tmp_path / f"{NAME}.safetensors", "rb") as file:
    data = file.read()
  np.testing.assert_array_equal(safetensors.numpy.load(data)["features"], features())
  header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
  assert header["__metadata__"] == {"format_version": feature_cache.FORMAT_VERSION,
                                    "fingerprint": FINGERPRINT, "shape": f"[{N}, {D}]",
                                    "dtype": "float32"}


def changed_weights():
  weights = jax.tree.map(np.copy, WEIGHTS)
  weights["dense"]["kernel"][1, 2] += 1e-3
  return weights


@pytest.mark.parametrize("changed", [
    {"examples": CAPTIONS[:5] + ["a photo of another thing"] + CAPTIONS[6:]},
    {"weights": changed_weights()},
    {"preprocessing": {**PREPROCESSING, "max_len": 31}},
], ids=["one caption", "one weight by 1e-3", "max_len"])
def test_each_changed_input_changes_the_fingerprint_and_rebuilds_saying_why(tmp_path, caplog,
                                                                            changed):
  other = feature_cache.fingerprint(**{"weights": WEIGHTS, "preprocessing": PREPROCESSING,
                                       "examples": CAPTIONS, **changed})
  assert other != FINGERPRINT and len(other) == 64
  load(tmp_path, CountingBuild(features(seed=2)))
  caplog.set_level(logging.INFO)
  build = CountingBuild(features(seed=3))
  np.testing.assert_array_equal(load(tmp_path, build, fingerprint=other), build.array)
  assert build.calls == 1
  path = tmp_path / f"{NAME}.safetensors"
  assert cache_messages(caplog)[0] == (
      "WARNING", f"feature cache {path}: made for other weights, preprocessing or examples "
      f"(fingerprint {FINGERPRINT[:12]}, now {other[:12]}); building it")
  np.testing.assert_array_equal(load(tmp_path, build, fingerprint=other), build.array)
  assert build.calls == 1  # the rebuilt file is used under its new fingerprint


def test_fingerprint_ignores_preprocessing_key_order_and_follows_example_order():
  reordered = dict(reversed(list(PREPROCESSING.items())))
  assert list(reordered) != list(PREPROCESSING)
  assert feature_cache.fingerprint(weights=WEIGHTS, preprocessing=reordered,
                                   examples=CAPTIONS) == FINGERPRINT
  assert feature_cache.fingerprint(weights=WEIGHTS, preprocessing=PREPROCESSING,
                                   examples=CAPTIONS[::-1]) != FINGERPRINT
  # Each field stands alone: moving a character from one example to the next is a change.
  assert (feature_cache.fingerprint(weights={}, preprocessing={}, examples=["ab", "c"])
          != feature_cache.fingerprint(weights={}, preprocessing={}, examples=["a", "bc"]))


def test_fingerprint_is_the_same_for_numpy_and_jax_weights_and_bytes_examples():
  as_jax = jax.tree.map(jnp.asarray, WEIGHTS)
  as_bytes = [caption.encode() for caption in CAPTIONS]
  assert feature_cache.fingerprint(weights=as_jax, preprocessing=PREPROCESSING,
                                   examples=as_bytes) == FINGERPRINT
  as_bf16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), as_jax)
  assert feature_cache.fingerprint(weights=as_bf16, preprocessing=PREPROCESSING,
                                   examples=CAPTIONS) != FINGERPRINT


def truncated(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def write_other_tensors(path):
  safetensors.numpy.save_file({"other": features()}, str(path),
                              metadata={"format_version": feature_cache.FORMAT_VERSION,
                                        "fingerprint": FINGERPRINT})


def write_format_version(version):
  def write(path):
    safetensors.numpy.save_file({"features": features()}, str(path),
                                metadata={"format_version": version, "fingerprint": FINGERPRINT})
  return write


def write_by_a_call(shape, dtype):
  def write(path):
    load(path.parent, CountingBuild(features(shape=shape, dtype=dtype)), shape=shape, dtype=dtype)
  return write


@pytest.mark.parametrize("spoil, reason", [
    (truncated, "unreadable, truncated or corrupt (SafetensorError: "),
    (lambda path: path.write_bytes(np.random.default_rng(4).bytes(3000)),
     "unreadable, truncated or corrupt (SafetensorError: "),
    (lambda path: path.write_bytes(b""), "unreadable, truncated or corrupt (SafetensorError: "),
    (write_other_tensors, "unreadable, truncated or corrupt ("),
    (write_format_version("0"), "format version '0', not '1' of this reader"),
    (lambda path: safetensors.numpy.save_file({"features": features()}, str(path)),
     "format version None, not '1' of this reader"),
    (write_by_a_call((N - 1, D), np.float32),
     f"holds float32 [{N - 1}, {D}], not float32 [{N}, {D}]"),
    (write_by_a_call((N, D), np.float16), f"holds float16 [{N}, {D}], not float32 [{N}, {D}]"),
], ids=["truncated", "random bytes", "empty", "no features tensor", "format version 0",
        "no metadata", "another shape", "another dtype"])
def test_unusable_files_are_rebuilt_never_used_naming_the_reason(tmp_path, caplog, spoil, reason):
  path = tmp_path / f"{NAME}.safetensors"
  load(tmp_path, CountingBuild(features(seed=2)))
  spoil(path)
  caplog.clear()
  build = CountingBuild(features(seed=3))
  np.testing.assert_array_equal(load(tmp_path, build), build.array)
  assert build.calls == 1
  level, message = cache_messages(caplog)[0]
  assert level == "WARNING"
  assert message.startswith(f"feature cache {path}: {reason}") and message.endswith("; building it")
  assert "\n" not in message
  np.testing.assert_array_equal(load(tmp_path, build), build.array)
  assert build.calls == 1  # the rewritten file is whole again


def test_no_staged_file_is_left_and_a_failing_build_keeps_the_old_file(tmp_path):
  load(tmp_path, CountingBuild(features()))
  path = tmp_path / f"{NAME}.safetensors"
  assert os.listdir(tmp_path) == [path.name]
  before = path.read_bytes()

  def failing_build():
    raise RuntimeError("tower crashed")

  with pytest.raises(RuntimeError, match="tower crashed"):
    load(tmp_path, failing_build, fingerprint="0" * 64)
  assert os.listdir(tmp_path) == [path.name] and path.read_bytes() == before


def test_a_failing_rename_leaves_no_staged_file(tmp_path):
  (tmp_path / f"{NAME}.safetensors").mkdir()  # unreadable, and no file can be renamed over it
  with pytest.raises(OSError):
    load(tmp_path, CountingBuild(features()))
  assert os.listdir(tmp_path) == [f"{NAME}.safetensors"]


def test_a_build_of_another_shape_or_dtype_is_refused_and_not_written(tmp_path):
  with pytest.raises(ValueError, match=rf"returned float32 \[{N}, 2\], not float32 \[{N}, {D}\]"):
    load(tmp_path, CountingBuild(features(shape=(N, 2))))
  with pytest.raises(ValueError, match=rf"returned float64 \[{N}, {D}\], not float32"):
    load(tmp_path, CountingBuild(features(dtype=np.float64)))
  assert not os.listdir(tmp_path)


def test_a_cache_on_a_bucket_is_built_read_back_and_rebuilt_when_truncated(bucket_root):
  build = CountingBuild(features())
  for _ in range(2):
    np.testing.assert_array_equal(load("gs://bucket/features", build), build.array)
  assert build.calls == 1
  stored = bucket_root / "bucket" / "features"
  assert os.listdir(stored) == [f"{NAME}.safetensors"]
  truncated(stored / f"{NAME}.safetensors")
  np.testing.assert_array_equal(load("gs://bucket/features", build), build.array)
  assert build.calls == 2


def test_compute_features_equals_the_tower_over_all_examples_in_one_compilation():
  fn = jax.jit(chex.assert_max_traces(lambda inputs: tower(WEIGHTS, inputs), n=1))
  asked = []

  def get_batch(indices):
    asked.append(indices)
    return INPUTS[indices]

  got = feature_cache.compute_features(fn, N, BATCH, get_batch, desc="text features")
  assert got.dtype == np.float32 and got.shape == (N, D)
  np.testing.assert_allclose(got, tower(WEIGHTS, INPUTS), atol=1e-6)
  assert [len(indices) for indices in asked] == [BATCH] * 3
  np.testing.assert_array_equal(asked[-1], [16, 17, 18, 19, 20, 21, 22, 22])  # padded by the last


def test_compute_features_refuses_a_tower_of_another_batch_shape():
  with pytest.raises(ValueError, match=r"fn must return \[8, D\] features; got \(4,\)"):
    feature_cache.compute_features(lambda batch: batch[:4, 0], N, BATCH, INPUTS.__getitem__, "x")
