"""The converter (cots_jax/data/convert.py): a Flickr8k subset to ArrayRecord shards, bit-exact,
with a manifest that matches the files, resumed and rebuilt, resized on request (through the
command line), and bad images skipped or fatal."""

import hashlib
import io
import json
import logging
import os
import shutil
import struct
import tarfile
import zlib

from array_record.python import array_record_module
import numpy as np
import pytest
from PIL import Image

from cots_jax.data import array_record
from cots_jax.data import convert
from cots_jax.data import records
from cots_jax.data import sources
from cots_jax.data import webdataset
from cots_jax.data.transforms import BadExampleError
from support import run_module, shared_dataset_dir

NUM_IMAGES, SHARD_SIZE = 20, 6


def _settings(source, resize=None, shard_size=SHARD_SIZE):
  return {"format": convert.FORMAT, "from": "captions_json", "to": "array_record",
          "resize": resize, "source": {"annotations": source.annotations,
                                       "images_dir": source.images_dir,
                                       "splits": list(source.splits)},
          "shard_size": shard_size}


def _convert(source, out_dir, workers=2, on_bad_example="skip", shard_size=SHARD_SIZE):
  return convert.convert(convert.captions_json_tasks(source, shard_size),
                         _settings(source, shard_size=shard_size), os.fspath(out_dir), workers,
                         on_bad_example, source)


@pytest.fixture(scope="module", name="flickr")
def _flickr(tmp_path_factory):
  """(CaptionsJson of the first NUM_IMAGES Flickr8k images, all as "train", on the shared image
  folder; the folder they were converted into, in shards of SHARD_SIZE by 2 workers)."""
  root = shared_dataset_dir("flickr8k")
  with open(os.path.join(root, "annotations.json"), encoding="utf-8") as f:
    images = json.load(f)["images"][:NUM_IMAGES]
  tmp = tmp_path_factory.mktemp("flickr_subset")
  annotations = tmp / "annotations.json"
  annotations.write_text(json.dumps({"images": [dict(entry, split="train") for entry in images]}))
  source = sources.CaptionsJson(annotations, os.path.join(root, "images"), "train")
  out_dir = tmp / "shards"
  _convert(source, out_dir)
  return source, out_dir


def _shard_names(count):
  return [f"train-{i:05d}.array_record" for i in range(count)]


def test_every_pair_survives_bit_exact(flickr):
  source, out_dir = flickr
  shards = array_record.ArrayRecordCaptions(f"{out_dir}/train-*.array_record")
  assert shards.paths == [os.fspath(out_dir / name) for name in _shard_names(4)]
  assert len(shards) == len(source) == NUM_IMAGES
  for i in range(NUM_IMAGES):
    expected, item = source[i], shards[i]
    with open(source.path(i), "rb") as f:
      assert item["image"] == f.read()
    assert item["captions"] == expected["captions"] and len(item["captions"]) == 5
    assert item["image_id"] == expected["image_id"] == i
    assert os.path.basename(source.path(i)) in item["name"]
  np.testing.assert_array_equal(shards.caption_counts(), source.caption_counts())


def test_records_hold_key_and_extension(flickr):
  source, out_dir = flickr
  reader = array_record_module.ArrayRecordReader(os.fspath(out_dir / "train-00003.array_record"))
  decoded = [records.decode_record(data, "test") for data in reader.read_all()]
  reader.close()
  assert [record["key"] for record in decoded] == [os.path.basename(source.path(i))
                                                   for i in (18, 19)]
  assert {record["ext"] for record in decoded} == {"jpg"}


def test_the_manifest_matches_the_files(flickr):
  source, out_dir = flickr
  manifest = records.read_manifest(out_dir)
  assert {key: manifest[key] for key in _settings(source)} == _settings(source)
  assert manifest["complete"] and [entry["file"] for entry in manifest["shards"]] == \
      _shard_names(4)
  for entry, size in zip(manifest["shards"], (6, 6, 6, 2)):
    data = (out_dir / entry["file"]).read_bytes()
    assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["records"] == size and entry["caption_counts"] == [5] * size
    assert entry["captions"] == 5 * size and entry["skipped"] == 0
  assert manifest["totals"] == {"shards": 4, "records": NUM_IMAGES, "captions": 5 * NUM_IMAGES,
                                "bytes": sum(e["bytes"] for e in manifest["shards"]),
                                "skipped": 0}
  assert not [name for name in os.listdir(out_dir) if name.endswith(".tmp")]


def test_a_rerun_skips_finished_shards_and_rebuilds_a_deleted_one(flickr, tmp_path):
  source, converted = flickr
  out_dir = tmp_path / "shards"
  shutil.copytree(converted, out_dir)
  mtimes = {name: os.stat(out_dir / name).st_mtime_ns for name in _shard_names(4)}
  _convert(source, out_dir)
  assert {name: os.stat(out_dir / name).st_mtime_ns for name in mtimes} == mtimes
  (out_dir / "train-00001.array_record").unlink()
  manifest = _convert(source, out_dir, workers=1)
  assert (out_dir / "train-00001.array_record").read_bytes() == \
      (converted / "train-00001.array_record").read_bytes()
  for name in ("train-00000.array_record", "train-00002.array_record", "train-00003.array_record"):
    assert os.stat(out_dir / name).st_mtime_ns == mtimes[name]
  assert manifest == records.read_manifest(converted)


def test_a_rerun_with_other_settings_is_refused(flickr, tmp_path):
  source, converted = flickr
  out_dir = tmp_path / "shards"
  shutil.copytree(converted, out_dir)
  with pytest.raises(ValueError, match="manifest.json: written with other shard_size"):
    _convert(source, out_dir, shard_size=SHARD_SIZE + 1)


def test_resize_through_the_command_line_gives_the_shorter_side(flickr, tmp_path):
  source, _ = flickr
  out_dir = tmp_path / "resized"
  result = run_module("cots_jax.data.convert", "--from=captions_json",
                      f"--annotations={source.annotations}", f"--images_dir={source.images_dir}",
                      "--splits=train", "--to=array_record", f"--out_dir={out_dir}",
                      "--shard_size=8", "--workers=1", "--resize=64")
  assert f"{NUM_IMAGES} images, {5 * NUM_IMAGES} captions, 3 shard(s)" in result.stdout
  manifest = records.read_manifest(out_dir)
  assert manifest["resize"] == 64 and manifest["shard_size"] == 8
  shards = array_record.ArrayRecordCaptions(f"{out_dir}/train-{{00000..00002}}.array_record")
  for i in range(NUM_IMAGES):
    with Image.open(source.path(i)) as original:
      size = original.size
    resized = Image.open(io.BytesIO(shards[i]["image"]))
    assert resized.format == "JPEG" and min(resized.size) == 64
    # The aspect ratio is kept (the longer side rounded).
    assert abs(max(resized.size) - 64 * max(size) / min(size)) <= 0.5
    assert shards[i]["captions"] == source.captions(i)


def _png(colour, size=(40, 30)):
  buffer = io.BytesIO()
  Image.new("RGB", size, colour).save(buffer, format="PNG")
  return buffer.getvalue()


def _forged_png(width, height):
  """A 1 x 1 PNG whose header declares width x height pixels (checksum fixed)."""
  data = bytearray(_png(0, (1, 1)))
  ihdr = data.index(b"IHDR")
  data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
  data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
  return bytes(data)


# name -> file bytes (None: no file)
BAD = {"text.png": b"hello, I am text", "missing.jpg": None, "empty.png": b"",
       "bomb.png": _forged_png(30_000, 30_000)}
GOOD = {"red.png": _png((250, 0, 0)), "blue.png": _png((0, 0, 250), (20, 50))}


@pytest.fixture(name="mixed")
def _mixed(tmp_path):
  """CaptionsJson of GOOD and BAD images, interleaved, one caption each."""
  names = ["red.png", "text.png", "missing.jpg", "empty.png", "bomb.png", "blue.png"]
  (tmp_path / "images").mkdir()
  for name in names:
    data = {**GOOD, **BAD}[name]
    if data is not None:
      (tmp_path / "images" / name).write_bytes(data)
  annotations = tmp_path / "annotations.json"
  annotations.write_text(json.dumps({"images": [
      {"filename": name, "split": "train", "sentences": [{"raw": f"the {name}"}]}
      for name in names]}))
  return sources.CaptionsJson(annotations, tmp_path / "images", "train")


def test_bad_images_are_skipped_counted_and_named(mixed, tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    manifest = _convert(mixed, tmp_path / "out", workers=1, shard_size=4)
  assert manifest["totals"]["records"] == 2 and manifest["totals"]["skipped"] == len(BAD)
  assert [entry["skipped"] for entry in manifest["shards"]] == [3, 1]
  warnings = " ".join(record.getMessage() for record in caplog.records)
  for name, reason in (("text.png", "not an image"), ("missing.jpg", "missing file"),
                       ("empty.png", "empty file"), ("bomb.png", "decompression bomb")):
    assert f"{name}: {reason}" in warnings
  shards = array_record.ArrayRecordCaptions(os.fspath(tmp_path / "out" / "train-*.array_record"))
  assert [shards[i]["image"] for i in range(2)] == [GOOD["red.png"], GOOD["blue.png"]]
  assert [shards[i]["image_id"] for i in range(2)] == [0, 5]


def test_a_bad_image_stops_the_run_when_told_to_fail(mixed, tmp_path):
  out_dir = tmp_path / "out"
  with pytest.raises(BadExampleError, match="text.png: not an image|missing.jpg: missing file|"
                     "empty.png: empty file|bomb.png: decompression bomb"):
    _convert(mixed, out_dir, workers=1, on_bad_example="fail", shard_size=1)
  manifest = records.read_manifest(out_dir)
  # The shards of good images that finished are listed (the last may have been cancelled).
  assert not manifest["complete"]
  assert {e["file"] for e in manifest["shards"]} - {"train-00005.array_record"} == \
      {"train-00000.array_record"}
  assert not [name for name in os.listdir(out_dir) if name.endswith(".tmp")]


def test_webdataset_tasks_name_a_shard_after_its_tar():
  tasks = convert.webdataset_tasks(["a/00000.tar", "gs://b/00001.tar"])
  assert tasks == [convert.Task("00000.array_record", "a/00000.tar"),
                   convert.Task("00001.array_record", "gs://b/00001.tar")]
  with pytest.raises(ValueError, match="b/00000.tar and a/00000.tar would both become"):
    convert.webdataset_tasks(["a/00000.tar", "b/00000.tar"])


def _write_tar(path, members):
  """The tar at `path` of [(member name, bytes)]."""
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return os.fspath(path)


def test_webdataset_tars_convert_bit_exact_with_bad_keys_skipped(flickr, tmp_path, caplog):
  """The Flickr8k subset as two img2dataset-style tars (jpg + json of the 5 captions per key),
  the second with a key without image and one whose image is text."""
  source, _ = flickr
  keys = [f"{i:09d}" for i in range(NUM_IMAGES)]
  members = [[(f"{keys[i]}.jpg", source[i]["image"]),  # the file's bytes
              (f"{keys[i]}.json", json.dumps({"caption": source.captions(i)}).encode())]
             for i in range(NUM_IMAGES)]
  half = NUM_IMAGES // 2
  bad = [("900000000.txt", b"a caption without image"),
         ("900000001.jpg", b"text, not a jpeg"), ("900000001.txt", b"a caption")]
  tars = [_write_tar(tmp_path / "00000.tar", sum(members[:half], [])),
          _write_tar(tmp_path / "00001.tar", sum(members[half:], []) + bad)]
  settings = {"format": convert.FORMAT, "from": "webdataset", "to": "array_record",
              "resize": None, "source": {"shards": f"{tmp_path}/*.tar"}, "shard_size": None}
  out_dir = os.fspath(tmp_path / "out")
  with caplog.at_level(logging.WARNING):
    manifest = convert.convert(convert.webdataset_tasks(tars), settings, out_dir, 1, "skip")
  assert [entry["records"] for entry in manifest["shards"]] == [half, half]
  assert [entry["skipped"] for entry in manifest["shards"]] == [0, 2]
  warnings = " ".join(record.getMessage() for record in caplog.records)
  assert "00001.tar:900000000: no image" in warnings
  assert "00001.tar:900000001: not an image" in warnings
  shards = array_record.ArrayRecordCaptions(f"{out_dir}/{{00000,00001}}.array_record")
  for i in range(NUM_IMAGES):
    item = shards[i]
    assert item["image"] == members[i][0][1] and item["captions"] == source.captions(i)
    assert item["image_id"] == webdataset.image_id(tars[i // half], keys[i])
