"""The msgpack record encoding (cots_jax/data/records.py) and the ArrayRecord source
(cots_jax/data/array_record.py) on shards written here: random access, shard patterns, bad
shards and records, pickling, the manifest's caption counts, the registry and a 3-step run."""

import io
import json
import os
import pickle

from array_record.python import array_record_module
import msgpack
import numpy as np
import pytest
from PIL import Image

from configs import common
from cots_jax import train
from cots_jax.data import array_record
from cots_jax.data import pipeline
from cots_jax.data import records
from cots_jax.data import registry
from cots_jax.data.transforms import BadExampleError
from cots_jax.metrics_writer import read_metrics
from support import tiny_config


def _png(seed, size=(30, 20)):
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def _example(i):
  """(image, ext, captions, image_id, key) of example i: 0 to 3 captions, ids not positions."""
  return _png(i), "png", [f"picture {i} caption {j}" for j in range(i % 4)], 1000 + i, f"{i}.png"


def _write(path, payloads):
  """An ArrayRecord file at `path` holding the byte strings `payloads`."""
  writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
  for payload in payloads:
    writer.write(payload)
  writer.close()


@pytest.fixture(name="shards")
def _shards(tmp_path):
  """(shard paths, the examples in them): 3, 0 and 5 records."""
  paths, examples, start = [], [], 0
  for shard, size in enumerate((3, 0, 5)):
    chunk = [_example(i) for i in range(start, start + size)]
    paths.append(tmp_path / f"train-{shard:05d}.array_record")
    _write(paths[-1], [records.encode_record(*example) for example in chunk])
    examples += chunk
    start += size
  return [os.fspath(path) for path in paths], examples


# ----------------------------------------------------------------------------- records

def test_records_round_trip_every_field():
  image, ext, captions, image_id, key = _example(5)
  data = records.encode_record(image, ext, captions, image_id, key)
  assert records.decode_record(data, "here") == {"image": image, "ext": ext, "captions": captions,
                                                 "id": image_id, "key": key}
  assert msgpack.unpackb(data)["image"] == image  # plain msgpack, readable without this code


@pytest.mark.parametrize("data, message", [
    (b"\xc1 not msgpack", "not a cots_jax record"),
    (b"\x93\x01\x02\x03", "not a map"),  # a msgpack list
    (msgpack.packb({"captions": [], "id": 1, "key": "k", "ext": "png"}), "no 'image'"),
    (msgpack.packb({"captions": "one", "id": 1, "key": "k", "ext": "png",
                            "image": b"x"}), "'captions'] should be list"),
    (msgpack.packb({"captions": [3], "id": 1, "key": "k", "ext": "png",
                            "image": b"x"}), "str only"),
    (msgpack.packb({"captions": [], "id": -1, "key": "k", "ext": "png",
                            "image": b"x"}), "not a non-negative int32"),
])
def test_decode_record_names_where_on_bytes_that_are_no_record(data, message):
  with pytest.raises(ValueError, match=message) as error:
    records.decode_record(data, "shard.array_record[7]")
  assert str(error.value).startswith("shard.array_record[7]: ")


def test_encode_record_refuses_ids_beyond_int32_and_wrong_types():
  with pytest.raises(ValueError, match="a.png: id 2147483648 is not a non-negative int32"):
    records.encode_record(b"x", "png", ["c"], 2**31, "a.png")
  with pytest.raises(ValueError, match="id should be an int"):
    records.encode_record(b"x", "png", ["c"], True, "a.png")
  with pytest.raises(ValueError, match="captions should all be str"):
    records.encode_record(b"x", "png", [b"c"], 1, "a.png")
  with pytest.raises(ValueError, match="image should be bytes"):
    records.encode_record("x", "png", ["c"], 1, "a.png")


# ----------------------------------------------------------------------------- paths


def test_a_pattern_that_matches_nothing_fails_naming_it(tmp_path):
  pattern = f"{tmp_path}/nothing-*.array_record"
  with pytest.raises(ValueError) as error:
    array_record.ArrayRecordCaptions(pattern)
  assert str(error.value) == f"{pattern}: no shard matches this pattern"


@pytest.mark.parametrize("size", [1000, 200_000])
def test_a_file_that_is_no_array_record_fails_at_construction_naming_it(shards, tmp_path, size):
  paths, _ = shards
  bad = tmp_path / "random.array_record"
  bad.write_bytes(np.random.default_rng(size).bytes(size))
  with pytest.raises(ValueError, match="cannot read as an ArrayRecord file") as error:
    array_record.ArrayRecordCaptions([paths[0], os.fspath(bad)])
  assert str(error.value).startswith(f"{bad}: ") and "\n" not in str(error.value)
  with pytest.raises(ValueError, match=f"{tmp_path}/missing.array_record: no shard matches"):
    array_record.ArrayRecordCaptions(f"{tmp_path}/missing.array_record")


# ----------------------------------------------------------------------------- the source

def test_random_access_returns_the_records_written(shards):
  paths, examples = shards
  source = array_record.ArrayRecordCaptions(",".join(paths))
  assert len(source) == len(examples) == 8
  for i in np.random.default_rng(0).permutation(len(examples)):
    image, _, captions, image_id, key = examples[i]
    item = source[i]
    assert item["image"] == image and item["captions"] == captions
    assert item["image_id"] == image_id and key in item["name"]
    assert source.captions(i) == captions
  # Record 4 is position 1 of the third shard (the second is empty).
  assert source[4]["name"] == f"{paths[2]}[1] (4.png)"
  np.testing.assert_array_equal(source.caption_counts(), [i % 4 for i in range(8)])
  with pytest.raises(IndexError):
    source[8]  # pylint: disable=pointless-statement


def test_captions_and_items_never_decode_the_image(tmp_path, monkeypatch):
  path = tmp_path / "raw.array_record"
  _write(path, [records.encode_record(b"no image at all", "jpg", ["a caption"], 3, "k")])
  monkeypatch.setattr(Image, "open", lambda *args: pytest.fail("an image was decoded"))
  source = array_record.ArrayRecordCaptions(os.fspath(path))
  assert source.captions(0) == ["a caption"] and source[0]["image"] == b"no image at all"


def test_a_damaged_record_is_a_bad_example_naming_shard_and_position(tmp_path):
  path = tmp_path / "damaged.array_record"
  _write(path, [records.encode_record(*_example(1)), b"\xc1 garbage"])
  source = array_record.ArrayRecordCaptions(os.fspath(path))
  assert source[0]["image_id"] == 1001
  with pytest.raises(BadExampleError, match=r"damaged.array_record\[1\]: not a cots_jax record"):
    source[1]  # pylint: disable=pointless-statement


def test_the_source_pickles_and_reads_the_same_after(shards):
  paths, examples = shards
  source = array_record.ArrayRecordCaptions(paths)
  assert source[0]["image"] == examples[0][0]  # opens a reader, which is not pickled
  copy = pickle.loads(pickle.dumps(source))
  assert len(copy) == len(source)
  for i in range(len(source)):
    assert copy[i] == source[i]
  np.testing.assert_array_equal(copy.caption_counts(), source.caption_counts())


def _manifest(directory, entries):
  with open(os.path.join(directory, records.MANIFEST), "w", encoding="utf-8") as f:
    json.dump({"shards": entries}, f)


def test_caption_counts_come_from_the_manifest_without_reading_records(shards, monkeypatch):
  paths, examples = shards
  counts = [len(example[2]) for example in examples]
  bounds = [0, 3, 3, 8]
  _manifest(os.path.dirname(paths[0]), [
      {"file": os.path.basename(path), "records": bounds[i + 1] - bounds[i],
       "caption_counts": counts[bounds[i]:bounds[i + 1]]} for i, path in enumerate(paths)])
  source = array_record.ArrayRecordCaptions(paths)
  monkeypatch.setattr(records, "decode_record", lambda *args: pytest.fail("a record was read"))
  np.testing.assert_array_equal(source.caption_counts(), counts)


def test_a_manifest_that_contradicts_a_shard_fails_naming_both(shards):
  paths, _ = shards
  directory = os.path.dirname(paths[0])
  _manifest(directory, [{"file": os.path.basename(paths[0]), "records": 4,
                         "caption_counts": [1, 1, 1, 1]}])
  with pytest.raises(ValueError, match="holds 3 records but .*manifest.json lists 4"):
    array_record.ArrayRecordCaptions(paths[0])
  # A manifest that does not list every shard's counts is not used: the records are read.
  _manifest(directory, [])
  np.testing.assert_array_equal(array_record.ArrayRecordCaptions(paths[0]).caption_counts(),
                                [0, 1, 2])


# ----------------------------------------------------------------------------- registry, training

def _dataset(root, split, first, count):
  """Shards of `count` 24 px photos-to-be (random pixels) with 2 captions each, ids from
  `first`; returns their brace pattern."""
  os.makedirs(root, exist_ok=True)
  for shard, start in enumerate(range(first, first + count, 8)):
    _write(os.path.join(root, f"{split}-{shard:05d}.array_record"),
           [records.encode_record(_png(i, (28, 24)), "png", [f"image {i}", f"photo {i}"], i,
                                  f"{i}.png") for i in range(start, min(start + 8, first + count))])
  last = (count - 1) // 8
  return os.path.join(root, f"{split}-{{00000..{last:05d}}}.array_record")


def test_registry_makes_the_array_record_source_from_the_config(tmp_path):
  config = common.base_config("tiny")
  config.input.data.name = "array_record"
  with pytest.raises(ValueError, match="input.data.paths=''"):
    registry.make_source(config, "train")
  config.input.data.paths = _dataset(os.fspath(tmp_path), "train", 0, 12)
  config.input.data.eval_paths = _dataset(os.fspath(tmp_path), "test", 100, 5)
  train_source = registry.make_source(config, "train")
  eval_source = registry.make_source(config, "eval")
  assert isinstance(train_source, array_record.ArrayRecordCaptions)
  assert (len(train_source), len(eval_source)) == (12, 5)
  assert eval_source[0]["image_id"] == 100
  assert pipeline.pair_table(train_source).shape == (24, 2)


@pytest.mark.slow
def test_three_training_steps_read_array_record_shards(tmp_path):
  root = os.fspath(tmp_path / "data")
  config = tiny_config(**{
      "input.data.name": "array_record", "input.data.paths": _dataset(root, "train", 0, 24),
      "input.data.eval_paths": _dataset(root, "test", 1000, 8), "loss.mvm": 0.0,
      "loss.mlm": 0.0, "total_steps": 3, "eval_every": 3, "checkpoint_every": 3,
      "log_every": 3})
  workdir = os.fspath(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  logged = read_metrics(workdir)
  assert any(record.get("step") == 3 and "data/skipped" in record for record in logged)
  assert any(any(key.startswith("eval/") for key in record) for record in logged)
  assert "3" in os.listdir(os.path.join(workdir, "checkpoints"))
