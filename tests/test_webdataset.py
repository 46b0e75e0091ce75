"""webdataset / img2dataset tar shards (cots_jax/data/webdataset.py), on shards written here
(PIL-made images, txt and json captions) and on a tar of real Flickr8k files."""

import collections
import io
import json
import os
import struct
import tarfile
import zlib

from absl import logging
from etils.epath import backend
import numpy as np
from PIL import Image
from PIL import features
import pytest

from configs import pretrain
from cots_jax import config_validation
from cots_jax import train
from cots_jax.data import pipeline
from cots_jax.data import registry
from cots_jax.data import shard_paths
from cots_jax.data import tokenizer as tokenizer_lib
from cots_jax.data import transforms
from cots_jax.data import webdataset
from cots_jax.data.transforms import BadExampleError
from cots_jax.metrics_writer import read_metrics
import support
from support import shared_dataset_dir


def _image(seed, image_format, size=(10, 8)):
  """Encoded bytes of a random RGB image of `size` (width, height)."""
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=image_format)
  return buffer.getvalue()


def _write_tar(path, members, mode="w"):
  """Writes [(member name, bytes)] as the tar at `path` (mode "w:gz": gzipped); returns path."""
  with tarfile.open(path, mode) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(path)


def _pair(key, seed, caption):
  """An img2dataset key: jpg, txt and the json img2dataset writes beside them."""
  return [(f"{key}.jpg", _image(seed, "JPEG")), (f"{key}.txt", caption.encode()),
          (f"{key}.json", json.dumps({"key": key, "caption": caption, "status": "success"})
           .encode())]


def _shard(path, count, first=0):
  """An img2dataset-style shard of `count` keys numbered from `first`; returns its path."""
  members = []
  for n in range(first, first + count):
    members += _pair(f"{n:09d}", n, f"caption {n}")
  return _write_tar(path, members)


def _shards(folder, count, per_shard):
  """`count` shards `folder/0000i.tar` of `per_shard` keys each (keys numbered across them)."""
  os.makedirs(folder, exist_ok=True)
  return [_shard(os.path.join(folder, f"{i:05d}.tar"), per_shard, i * per_shard)
          for i in range(count)]


def _names(items):
  """Example names, or the bad-example messages, of stream items."""
  return [item.get("name", item.get("bad_example")) for item in items]


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


# ------------------------------------------------------------------------------ shard lists


def test_expand_braces_keeps_padding_and_order():
  assert shard_paths.expand_braces("s/{00008..00011}.tar") == [
      "s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
  assert shard_paths.expand_braces("{cc3m,cc12m}/{0..1}.tar") == [
      "cc3m/0.tar", "cc3m/1.tar", "cc12m/0.tar", "cc12m/1.tar"]
  assert shard_paths.expand_braces("{a,{b,c}x}.tar") == ["a.tar", "bx.tar", "cx.tar"]
  assert shard_paths.expand_braces("{2..0}") == ["2", "1", "0"]
  for bad in ("s/{000..3.tar", "s/000}.tar", "s/{x}.tar"):
    with pytest.raises(ValueError, match="s/"):
      shard_paths.expand_braces(bad)


def test_expand_shards_lists_commas_braces_and_globs(tmp_path, monkeypatch):
  shards = [_write_tar(tmp_path / f"{i:05d}.tar", []) for i in range(4)]
  other = _write_tar(tmp_path / "other.tar", [])
  assert shard_paths.expand_shards(shards[::-1]) == shards[::-1]
  assert shard_paths.expand_shards(f"{shards[2]},{shards[0]}") == [shards[2], shards[0]]
  assert shard_paths.expand_shards(f"{tmp_path}/{{00001..00003}}.tar") == shards[1:]
  assert shard_paths.expand_shards(f"{tmp_path}/0000*.tar,{other}") == shards + [other]
  assert shard_paths.expand_shards(f"{tmp_path}/{{00002,other}}.tar") == [shards[2], other]
  # Listed shards that are missing (img2dataset's failed ones) are dropped, with a warning.
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda *args: warnings.append(args[0] % args[1:]))
  assert shard_paths.expand_shards(f"{tmp_path}/{{00002..00005}}.tar") == shards[2:]
  assert len(warnings) == 1 and "2 of its shards do not exist" in warnings[0]


@pytest.mark.parametrize("pattern", ["nothing-*.tar", "{00007..00009}.tar", "none.tar",
                                     "gone/{a,b}.tar"])
def test_a_pattern_matching_nothing_fails_naming_it(tmp_path, pattern):
  _write_tar(tmp_path / "00000.tar", [])
  with pytest.raises(ValueError) as error:
    shard_paths.expand_shards(f"{tmp_path / '00000.tar'},{tmp_path}/{pattern}")
  message = str(error.value)
  assert f"{tmp_path}/{pattern}: no shard matches this pattern" in message
  assert "\n" not in message


def test_gs_without_credentials_fails_in_one_line(monkeypatch):
  class DefaultCredentialsError(Exception):
    """What google-auth raises on a machine without credentials."""

  calls = []

  def no_credentials(path):
    calls.append(str(path))
    raise DefaultCredentialsError("Your default credentials were not found.\nTo set up ...")

  # gs:// goes through epath's fsspec backend; nothing here may reach the network.
  monkeypatch.setattr(backend.fsspec_backend, "fs", no_credentials)
  for action, path in [
      (shard_paths.expand_shards, "gs://bucket/cc3m/{00000..00003}.tar"),
      (shard_paths.expand_shards, "gs://bucket/cc3m/*.tar"),
      (lambda path: list(webdataset.iter_examples(path, on_bad_example="skip")),
       "gs://bucket/cc3m/00000.tar")]:
    with pytest.raises(ValueError) as error:
      action(path)
    message = str(error.value)
    assert message.startswith(path) and "\n" not in message, message
    assert "credentials" in message and "network" in message and "DefaultCredentials" in message
  assert calls and all(call.startswith("gs://bucket/cc3m") for call in calls)


# -------------------------------------------------------------------- examples of one shard


def test_members_are_grouped_by_key(tmp_path):
  jpeg, png, webp = _image(1, "JPEG"), _image(2, "PNG"), _image(3, "WEBP")
  members = [("a/000.jpg", jpeg), ("a/000.txt", b"a jpeg"), ("a/000.json", b'{"caption": "x"}'),
             ("a/001.json", b'{"caption": "a png", "url": "u"}'), ("a/001.png", png),
             ("a/002.JPEG", jpeg), ("a/002.json", b'{"caption": ["one", "two"]}')]
  if features.check("webp"):
    members += [("a/003.webp", webp), ("a/003.txt", "ein Bild \u00e9".encode())]
  shard = _write_tar(tmp_path / "s.tar", members)
  examples = list(webdataset.iter_examples(shard))
  expected = [("a/000", jpeg, "jpg", ["a jpeg"]), ("a/001", png, "png", ["a png"]),
              ("a/002", jpeg, "jpeg", ["one", "two"]),
              ("a/003", webp, "webp", ["ein Bild \u00e9"])][:len(examples)]
  assert len(examples) == 3 + features.check("webp")
  assert [(e["key"], e["image"], e["ext"], e["captions"]) for e in examples] == expected
  assert {e["shard"] for e in examples} == {shard}
  # The caption field of the json is a parameter; gzipped shards read the same.
  other = _write_tar(tmp_path / "t.tar.gz", [("k.png", png), ("k.json", b'{"text": "t"}')],
                     "w:gz")
  assert [e["captions"] for e in webdataset.iter_examples(other, caption_field="text")] == [["t"]]


def test_unknown_extensions_are_ignored_and_counted_once(tmp_path, monkeypatch):
  monkeypatch.setattr(webdataset, "UNKNOWN_EXTENSIONS", collections.Counter())
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda *args: warnings.append(args[0] % args[1:]))
  members = []
  for n in range(3):
    members += _pair(f"{n}", n, f"c{n}") + [(f"{n}.cls", b"7")]
  shard = _write_tar(tmp_path / "s.tar", members + [("3.parquet", b"x"), ("README", b"r")])
  assert [e["key"] for e in webdataset.iter_examples(shard)] == ["0", "1", "2"]
  list(webdataset.iter_examples(shard))
  assert webdataset.UNKNOWN_EXTENSIONS == {"cls": 6, "parquet": 2, "": 2}
  assert len(warnings) == 3 and "'cls'" in warnings[0] and shard in warnings[0]


def test_a_key_without_caption_or_image_is_a_bad_example(tmp_path):
  shard = _write_tar(tmp_path / "s.tar", _pair("0", 0, "fine") + [
      ("1.jpg", _image(1, "JPEG")), ("2.txt", b"no image"), ("3.jpg", _image(3, "JPEG")),
      ("3.txt", b"   "), ("4.jpg", _image(4, "JPEG")), ("4.json", b"[1]")] + _pair("5", 5, "ok"))
  items = list(webdataset.iter_examples(shard, on_bad_example="skip"))
  assert [item.get("key") for item in items] == ["0", None, None, None, None, "5"]
  assert [item["bad_example"] for item in items[1:5]] == [
      f"{shard}:1: no caption (txt, or 'caption' of a json)", f"{shard}:2: no image "
      "(jpg|jpeg|png|webp)", f"{shard}:3: empty caption",
      f"{shard}:4: json is not a JSON object ('list' object has no attribute 'get')"]
  with pytest.raises(BadExampleError, match=f"{shard}:1: no caption"):
    list(webdataset.iter_examples(shard))
  with pytest.raises(BadExampleError, match=f"{shard}:1: no caption"):
    _take(iter(webdataset.WebDatasetShards(shard, shuffle_buffer=1, on_bad_example="fail")), 2)
  # A listed shard that is gone by the time it is read is a bad example too.
  gone = str(tmp_path / "gone.tar")
  assert list(webdataset.iter_examples(gone, on_bad_example="skip")) == [
      {"bad_example": f"{gone}: no such shard"}]


def _truncated(path, members, cut, mode="w"):
  """Writes the tar of `members` and keeps its first `cut(data)` bytes; returns the path."""
  _write_tar(path, members, mode)
  with open(path, "rb") as file:
    data = file.read()
  data = data[:cut(data)]
  with open(path, "wb") as file:
    file.write(data)
  return str(path)


def _end_of_last_member(path):
  """The offset just after the last member's data (padded to 512) of an uncompressed tar."""
  with tarfile.open(path) as tar:
    last = tar.getmembers()[-1]
  return last.offset_data + -(-last.size // 512) * 512


@pytest.mark.parametrize("case", ["mid-member", "at-a-header", "gzip"])
def test_a_truncated_shard_yields_what_it_can_then_a_bad_example(tmp_path, case):
  members = [member for n in range(5) for member in _pair(f"{n:03d}", n, f"c{n}")]
  path = tmp_path / ("s.tar.gz" if case == "gzip" else "s.tar")
  if case == "at-a-header":  # only the end-of-archive block is gone: tarfile alone says nothing
    shard = _truncated(path, members, lambda data: _end_of_last_member(path))
  else:
    shard = _truncated(path, members, lambda data: len(data) * 2 // 3,
                       "w:gz" if case == "gzip" else "w")
  items = list(webdataset.iter_examples(shard, on_bad_example="skip"))
  good = len(items) - 1
  assert [item.get("key") for item in items[:-1]] == [f"{n:03d}" for n in range(good)]
  assert items[-1]["bad_example"].startswith(
      f"{shard}: truncated or corrupt shard after {good} examples")
  # At a header, the last key is read whole but cannot be told complete: it is dropped too.
  assert good == 4 if case == "at-a-header" else 1 <= good < 4
  with pytest.raises(BadExampleError, match="truncated or corrupt shard"):
    list(webdataset.iter_examples(shard))


def _forged_png(width, height):
  """A 1 x 1 PNG whose header declares width x height pixels (checksum fixed)."""
  data = bytearray(_image(0, "PNG", (1, 1)))
  ihdr = data.index(b"IHDR")
  data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
  data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
  return bytes(data)


def _decoded_or_marker(example):
  """A stream item with its image decoded, or a bad marker (the pipeline's contract)."""
  if "bad_example" in example:
    return example
  try:
    return {**example, "image": transforms.decode_image(example["image"], example["name"])}
  except BadExampleError as error:
    return pipeline.bad_example(error, "skip")


def test_a_forged_30000_square_image_is_skipped_with_its_name(tmp_path):
  shard = _write_tar(tmp_path / "s.tar", _pair("0", 0, "before") + [
      ("bomb.png", _forged_png(30_000, 30_000)), ("bomb.txt", b"a bomb")]
      + _pair("2", 2, "after"))
  # The bytes pass through undecoded; decoding them refuses the bomb before allocating it.
  assert [e["key"] for e in webdataset.iter_examples(shard)] == ["0", "bomb", "2"]
  stream = webdataset.WebDatasetShards(shard, shuffle_buffer=1).map(_decoded_or_marker)
  markers = [item for item in _take(iter(stream), 3) if "bad_example" in item]
  assert len(markers) == 1 and markers[0]["bad_example"].startswith(
      f"{shard}:bomb: decompression bomb")
  good = _take(iter(pipeline._SkipBadExamples(stream)), 2)
  assert [(g["key"], int(g["skipped"])) for g in good] == [("0", 0), ("2", 1)]
  assert good[0]["image"].shape == (8, 10, 3)


def test_a_caption_of_a_million_characters_comes_through_and_is_truncated(tmp_path):
  caption = ("a dog runs " * 100_000)[:1_000_000]
  shard = _write_tar(tmp_path / "s.tar", [("0.jpg", _image(0, "JPEG")),
                                         ("0.txt", caption.encode())])
  (example,) = webdataset.iter_examples(shard)
  assert example["captions"] == [caption]
  max_len = pretrain.get_config("runlocal").input.max_len
  tokenizer = tokenizer_lib.load_tokenizer()
  ids, mask = tokenizer_lib.tokenize(tokenizer, example["captions"], max_len)
  assert ids.shape == mask.shape == (1, max_len) and mask.all()
  assert ids[0, 0] == tokenizer.cls_token_id and ids[0, -1] == tokenizer.sep_token_id


# --------------------------------------------------------------------------- training stream


def test_image_ids_are_stable_and_fit_int32():
  first = webdataset.image_id("/data/cc3m/00000.tar", "000000012")
  assert first == webdataset.image_id("gs://bucket/cc3m/00000.tar", "000000012")
  assert first != webdataset.image_id("/data/cc12m/00000.tar", "000000012")
  ids = {webdataset.image_id("/d/cc3m/00000.tar", f"{n:09d}") for n in range(1000)}
  assert len(ids) == 1000 and all(0 <= i < 2**31 for i in ids)


def test_each_process_reads_its_own_shards(tmp_path):
  shards = _shards(tmp_path, 7, 3)
  keys = []
  for index in range(3):
    stream = webdataset.WebDatasetShards(shards, shuffle_buffer=1, process_index=index,
                                         process_count=3)
    assert stream.shards == shards[index::3]
    examples = _take(iter(stream), len(stream.shards) * 3)
    assert {e["shard"] for e in examples} == set(stream.shards)
    keys += [e["key"] for e in examples]
  assert sorted(keys) == [f"{n:09d}" for n in range(21)]
  # grain's worker processes split a process's shards again.
  stream = webdataset.WebDatasetShards(shards, process_index=0, process_count=2)
  stream.set_slice(slice(1, None, 2))
  assert stream.shards == [shards[2], shards[6]]
  with pytest.raises(ValueError, match="none for the worker slice"):
    stream.set_slice(slice(4, None, 5))
  with pytest.raises(ValueError, match="7 shards for 8 processes"):
    webdataset.WebDatasetShards(shards, process_index=0, process_count=8)


def test_every_epoch_reads_every_shard_in_a_new_order(tmp_path):
  shards = _shards(tmp_path, 6, 3)
  stream = webdataset.WebDatasetShards(shards, seed=3, shuffle_buffer=1)
  items = _take(iter(stream), 3 * 18)
  epochs = [[e["shard"] for e in items[i:i + 18:3]] for i in (0, 18, 36)]
  for epoch, order in enumerate(epochs):
    assert order == [shards[i] for i in stream.shard_order(epoch)]
    assert sorted(order) == shards
  assert len({tuple(order) for order in epochs}) == 3
  assert sorted(e["key"] for e in items[:18]) == [f"{n:09d}" for n in range(18)]
  assert epochs[0] != [e["shard"] for e in _take(iter(webdataset.WebDatasetShards(
      shards, seed=4, shuffle_buffer=1)), 18)][::3]
  # A buffer of 5 yields each block of 5 reads in a new order, and the reads are unchanged.
  blocks = _take(iter(webdataset.WebDatasetShards(shards, seed=3, shuffle_buffer=5)), 40)
  for start in range(0, 40, 5):
    assert sorted(_names(blocks[start:start + 5])) == sorted(_names(items[start:start + 5]))
  assert _names(blocks) != _names(items[:40])


def _mixed_shards(folder):
  """Shards with bad keys, a truncated one and a missing one: markers resume too."""
  shards = _shards(folder, 3, 4)
  bad = _write_tar(os.path.join(folder, "bad.tar"), _pair("b0", 0, "x") + [
      ("b1.jpg", _image(1, "JPEG"))] + _pair("b2", 2, "y"))
  members = [m for n in range(4) for m in _pair(f"t{n}", n, f"t{n}")]
  cut = _truncated(os.path.join(folder, "cut.tar"), members, lambda data: len(data) // 2)
  return shards + [bad, cut]


def test_resume_is_exact(tmp_path):
  stream = webdataset.WebDatasetShards(_mixed_shards(tmp_path), seed=5, shuffle_buffer=7)
  uninterrupted = _take(iter(stream), 90)
  assert any("bad_example" in item for item in uninterrupted)
  for taken in (0, 6, 7, 13, 40):
    iterator = iter(stream)
    _take(iterator, taken)
    state = json.loads(json.dumps(iterator.get_state()))
    resumed = iter(stream)
    resumed.set_state(state)
    after = _take(resumed, 90 - taken)
    assert _names(after) == _names(uninterrupted[taken:])
    assert [e.get("image") for e in after] == [e.get("image") for e in uninterrupted[taken:]]
    assert _names(_take(iterator, 90 - taken)) == _names(after)
  assert state == {"epoch": state["epoch"], "position": state["position"],
                   "offset": state["offset"], "block": 5, "index": 5, "layout": stream.layout}
  assert stream.layout[:5] == [0, 1, None, None, None]


def test_resume_with_another_process_count_restarts_the_epoch(tmp_path):
  shards = _shards(tmp_path, 4, 3)
  one = iter(webdataset.WebDatasetShards(shards, seed=1, shuffle_buffer=1))
  _take(one, 15)  # into epoch 1
  state = one.get_state()
  two = webdataset.WebDatasetShards(shards, seed=1, shuffle_buffer=1, process_index=1,
                                    process_count=2)
  resumed = iter(two)
  resumed.set_state(state)
  order = [two.shards[i] for i in two.shard_order(1)]
  assert [e["shard"] for e in _take(resumed, 6)] == [s for s in order for _ in range(3)]


def test_flickr8k_bytes_survive_a_tar(tmp_path):
  root = shared_dataset_dir("flickr8k")
  with open(os.path.join(root, "annotations.json"), encoding="utf-8") as file:
    entries = json.load(file)["images"][:10]
  members, expected = [], []
  for n, entry in enumerate(entries):
    with open(os.path.join(root, "images", entry["filename"]), "rb") as file:
      image = file.read()
    caption = entry["sentences"][0]["raw"]
    members += [(f"{n:09d}.jpg", image), (f"{n:09d}.txt", caption.encode()),
                (f"{n:09d}.json", json.dumps({"caption": caption, "url": entry["filename"]})
                 .encode())]
    expected.append((image, [caption]))
  shard = _write_tar(tmp_path / "flickr.tar", members)
  examples = list(webdataset.iter_examples(shard))
  assert [(e["image"], e["captions"]) for e in examples] == expected
  assert transforms.decode_image(examples[0]["image"], "x").ndim == 3


# ------------------------------------------------------------------- the source in a run


def _run_config(tmp_path, **overrides):
  """A tiny run reading 3 training shards of 8 keys and an eval shard of 6."""
  train_shards = _shards(tmp_path / "train", 3, 8)
  eval_shard = _shards(tmp_path / "eval", 1, 6)[0]
  return support.tiny_config(**{
      "input.data.name": "webdataset", "input.data.paths": ",".join(train_shards),
      "input.data.eval_paths": eval_shard, "input.data.shuffle_buffer": 4, "loss.mlm": 0.0,
      "loss.mvm": 0.0, **overrides}), train_shards


def test_the_training_pipeline_streams_every_shard_once_an_epoch_and_resumes(tmp_path):
  config, train_shards = _run_config(tmp_path)
  expected = {webdataset.image_id(shard, f"{n:09d}")
              for i, shard in enumerate(train_shards) for n in range(8 * i, 8 * i + 8)}
  iterator = pipeline.make_train_iterator(config)
  epoch = _take(iterator, 3)  # 24 examples: one epoch of the 3 shards
  ids = np.concatenate([batch["image_id"] for batch in epoch])
  assert sorted(ids.tolist()) == sorted(expected)
  assert epoch[0]["image"].shape == (8, 24, 24, 3)
  assert epoch[0]["text_ids"].shape == (8, config.input.max_len)
  state = iterator.get_state()
  following = _take(iterator, 2)
  resumed = pipeline.make_train_iterator(config)
  resumed.set_state(state)
  for a, b in zip(following, _take(resumed, 2), strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_streamed_source_refuses_what_needs_a_list_of_examples(tmp_path):
  config, _ = _run_config(tmp_path, **{"input.cache_decoded": True})
  with pytest.raises(ValueError, match="input.cache_decoded.*convert its shards to ArrayRecord"):
    config_validation.validate(config)
  config.input.cache_decoded = False
  config_validation.validate(config)
  with pytest.raises(ValueError, match="streams its training shards"):
    registry.make_source(config, "train")
  split = registry.make_source(config, "eval")
  assert len(split) == 6 and split.captions(0) == ["caption 0"]


@pytest.mark.slow
def test_three_training_steps_and_an_eval_read_webdataset_shards(tmp_path):
  config, _ = _run_config(tmp_path, **{
      "total_steps": 3, "eval_every": 3, "checkpoint_every": 3, "log_every": 3})
  workdir = os.fspath(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  logged = read_metrics(workdir)
  assert any(record.get("step") == 3 and "data/skipped" in record for record in logged)
  assert any("eval/retrieval/i2t_r1" in record for record in logged)
  assert "3" in os.listdir(os.path.join(workdir, "checkpoints"))
