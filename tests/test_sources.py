"""Image-caption sources: the Karpathy captions json (fixtures made here and the real Flickr8k
copy), a tiny TFDS dataset built here, and make_source's dispatch on config.input.data."""

import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import common
from cots_jax.data import registry
from cots_jax.data import sources
from cots_jax.data.transforms import BadExampleError
from support import REPO, shared_dataset_dir



def _random_image(seed, height, width):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encoded(array, image_format):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=image_format)
  return buffer.getvalue()


# ----------------------------------------------------------------------------- captions json

# (entry, what is on disk): "png"/"jpeg" files, "missing", "empty" (0 bytes), "dir" (a folder).
_ENTRIES = [
    ({"filename": "a.png", "split": "train", "imgid": 0,
      "sentences": [{"raw": "A red square ."}, {"raw": "  "}]}, "png"),
    ({"filename": "b.jpg", "split": "restval",
      "sentences": [{"raw": "b one"}, {"raw": "b two"}, {"raw": "b three"}]}, "jpeg"),
    ({"filename": "c.jpg", "filepath": "val2014", "split": "test", "cocoid": 7,
      "sentences": [{"raw": "c one", "tokens": ["c", "one"]}]}, "jpeg"),
    ({"filename": "missing.jpg", "split": "train",
      "sentences": [{"raw": "gone"}, {"raw": "gone too"}]}, "missing"),
    ({"filename": "d.png", "split": "val", "sentences": []}, "png"),
    ({"filename": "empty.png", "split": "train", "sentences": [{"raw": "empty"}]}, "empty"),
    ({"filename": "folder.png", "split": "train", "sentences": [{"raw": "a folder"}]}, "dir"),
    ({"filename": "e.png", "split": "train", "sentences": [{"raw": "e"}] * 5}, "png"),
]


def _relative_path(entry):
  return os.path.join(entry.get("filepath", ""), entry["filename"])


@pytest.fixture(name="captions_tree")
def _captions_tree(tmp_path):
  """(annotations path, images dir) of _ENTRIES, with their files made as listed."""
  images_dir = tmp_path / "images"
  for index, (entry, kind) in enumerate(_ENTRIES):
    path = images_dir / _relative_path(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("png", "jpeg"):
      path.write_bytes(_encoded(_random_image(index, 6 + index, 8), kind.upper()))
    elif kind == "empty":
      path.write_bytes(b"")
    elif kind == "dir":
      path.mkdir()
  annotations = tmp_path / "ann.json"
  annotations.write_text(json.dumps({"dataset": "fixture",
                                     "images": [entry for entry, _ in _ENTRIES]}))
  return str(annotations), str(images_dir)


def _expected(splits):
  """[(relative path, captions)] of the _ENTRIES in `splits`, in file order."""
  return [(_relative_path(e), [s["raw"] for s in e["sentences"]])
          for e, _ in _ENTRIES if e["split"] in splits]


@pytest.mark.parametrize("splits", [("train",), ("train", "restval"), ("test",), ("val",),
                                    ("restval", "val")])
def test_captions_json_keeps_the_splits_in_file_order(captions_tree, splits):
  annotations, images_dir = captions_tree
  source = sources.CaptionsJson(annotations, images_dir, splits)
  expected = _expected(splits)
  assert len(source) == len(expected)
  for i, (relative_path, captions) in enumerate(expected):
    assert source.path(i) == os.path.join(images_dir, relative_path)
    assert source.captions(i) == captions
  np.testing.assert_array_equal(source.caption_counts(), [len(c) for _, c in expected])
  assert source.caption_counts().dtype == np.int64


def test_captions_json_items_are_the_undecoded_file_bytes(captions_tree):
  annotations, images_dir = captions_tree
  splits = ("train", "restval", "test")
  source = sources.CaptionsJson(annotations, images_dir, splits)
  kept = [p for p, _ in _expected(splits)]
  readable = {"a.png": 0, "b.jpg": 1, os.path.join("val2014", "c.jpg"): 2, "e.png": 7}
  for relative_path, entry_index in readable.items():
    i = kept.index(relative_path)
    item = source[i]
    path = os.path.join(images_dir, relative_path)
    assert item["name"] == path and item["image_id"] == entry_index  # the file position
    assert item["captions"] == [s["raw"] for s in _ENTRIES[entry_index][0]["sentences"]]
    with open(path, "rb") as f:
      assert item["image"] == f.read()
  png = source[kept.index("a.png")]["image"]
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), _random_image(0, 6, 8))


def test_captions_json_image_ids_are_file_positions_unique_over_splits(tmp_path):
  """Train image 0 and test image 0 get different ids: each is its entry's position in the
  whole `images` list, whichever splits the source holds."""
  splits = ["test", "train", "train", "test", "val", "train"]
  (tmp_path / "images").mkdir()
  entries = []
  for position, split in enumerate(splits):
    (tmp_path / "images" / f"{position}.png").write_bytes(
        _encoded(_random_image(position, 4, 5), "PNG"))
    entries.append({"filename": f"{position}.png", "split": split,
                    "sentences": [{"raw": f"picture {position}"}]})
  (tmp_path / "ann.json").write_text(json.dumps({"images": entries}))

  def ids(split_names):
    source = sources.CaptionsJson(tmp_path / "ann.json", tmp_path / "images", split_names)
    return [source[i]["image_id"] for i in range(len(source))]
  assert ids("train") == [1, 2, 5] and ids("test") == [0, 3] and ids("val") == [4]
  assert ids(("train", "test")) == [0, 1, 2, 3, 5]


def test_a_single_split_name_is_the_same_as_a_tuple_of_it(captions_tree):
  as_str = sources.CaptionsJson(*captions_tree, "train")
  as_tuple = sources.CaptionsJson(*captions_tree, ("train",))
  assert len(as_str) == len(_expected(("train",)))
  assert [as_str.path(i) for i in range(len(as_str))] == [
      as_tuple.path(i) for i in range(len(as_tuple))]


@pytest.mark.parametrize("filename, reason", [("missing.jpg", "missing file"),
                                              ("empty.png", "empty file"),
                                              ("folder.png", "unreadable: ")])
def test_an_unreadable_image_is_a_bad_example_naming_its_path(captions_tree, filename, reason):
  annotations, images_dir = captions_tree
  source = sources.CaptionsJson(annotations, images_dir, ("train",))
  i = [p for p, _ in _expected(("train",))].index(filename)
  path = os.path.join(images_dir, filename)
  with pytest.raises(BadExampleError) as error:
    source[i]  # pylint: disable=pointless-statement
  assert error.value.name == path
  assert error.value.reason.startswith(reason)
  assert str(error.value).startswith(f"{path}: {reason}")
  # Its captions stay readable: pair tables are built without touching images.
  assert source.captions(i) == _expected(("train",))[i][1]


def test_indices_outside_the_source_are_index_errors(captions_tree):
  source = sources.CaptionsJson(*captions_tree, ("test",))
  for index in (-1, 1):
    for read in (source.__getitem__, source.captions, source.path):
      with pytest.raises(IndexError, match=rf"{index} out of range \[0, 1\)"):
        read(index)


def test_splits_that_select_nothing_name_the_splits_found(captions_tree):
  with pytest.raises(ValueError) as error:
    sources.CaptionsJson(*captions_tree, ("validation", "dev"))
  message = str(error.value)
  assert message.startswith(captions_tree[0] + ": ")
  assert "['validation', 'dev']" in message
  assert "['restval', 'test', 'train', 'val']" in message


_GOOD = {"filename": "a.png", "split": "train", "sentences": [{"raw": "x"}]}


def _without(key):
  return {k: v for k, v in _GOOD.items() if k != key}


@pytest.mark.parametrize("content, fragment", [
    ("{\"images\": [", "not JSON"),
    ("", "not JSON"),
    (json.dumps({"dataset": "x"}), "top-level 'images' list missing"),
    (json.dumps({"images": {"a.png": {}}}), "top-level 'images' list missing"),
    (json.dumps([_GOOD]), "top-level 'images' list missing"),
    (json.dumps({"images": [_GOOD, _without("filename")]}), "images[1] has no 'filename'"),
    (json.dumps({"images": [_GOOD, _without("split")]}), "images[1] has no 'split'"),
    (json.dumps({"images": [_GOOD, _without("sentences")]}), "images[1] has no 'sentences'"),
    (json.dumps({"images": [_GOOD, {**_GOOD, "sentences": [{"raw": "x"}, {"tokens": ["x"]}]}]}),
     "images[1].sentences[1] has no 'raw'"),
    (json.dumps({"images": [{**_GOOD, "sentences": [{"raw": None}]}]}),
     "images[0].sentences[0]['raw'] should be str, got NoneType"),
    (json.dumps({"images": [{**_GOOD, "filename": 3}]}),
     "images[0]['filename'] should be str, got int"),
    (json.dumps({"images": [{**_GOOD, "filepath": ["val2014"]}]}),
     "images[0]['filepath'] should be str, got list"),
    (json.dumps({"images": [{**_GOOD, "sentences": "x"}]}),
     "images[0]['sentences'] should be list, got str"),
    (json.dumps({"images": [_GOOD, "b.png"]}), "images[1] should be a JSON object, got str"),
])
def test_a_malformed_json_fails_naming_its_path_and_field(tmp_path, content, fragment):
  path = tmp_path / "ann.json"
  path.write_text(content)
  with pytest.raises(ValueError) as error:
    sources.CaptionsJson(path, tmp_path, ("train",))
  assert str(error.value).startswith(f"{path}: ")
  assert fragment in str(error.value)


def test_a_missing_annotations_file_fails_naming_it(tmp_path):
  path = str(tmp_path / "nothing.json")
  with pytest.raises(ValueError, match="annotations file not found") as error:
    sources.CaptionsJson(path, tmp_path, ("train",))
  assert str(error.value).startswith(path)


def test_captions_json_survives_pickling(captions_tree):
  source = sources.CaptionsJson(*captions_tree, ("train", "restval"))
  restored = pickle.loads(pickle.dumps(source))
  assert len(restored) == len(source)
  np.testing.assert_array_equal(restored.caption_counts(), source.caption_counts())
  for i in range(len(source)):
    assert restored.captions(i) == source.captions(i)
  assert restored[0] == source[0]


def test_real_flickr8k_annotations():
  root = shared_dataset_dir("flickr8k")
  annotations, images_dir = os.path.join(root, "annotations.json"), os.path.join(root, "images")
  captions_by_file = {}  # from captions.tsv, a second copy of the captions
  with open(os.path.join(root, "captions.tsv"), encoding="utf-8") as f:
    for line in f.read().splitlines()[1:]:
      filename, _, _, caption = line.split("\t")
      captions_by_file.setdefault(filename, []).append(caption)
  with open(annotations, encoding="utf-8") as f:
    entries = json.load(f)["images"]
  for split, size in (("train", 6000), ("dev", 1000), ("test", 1000)):
    source = sources.CaptionsJson(annotations, images_dir, (split,))
    assert len(source) == size
    np.testing.assert_array_equal(source.caption_counts(), np.full(size, 5))
    filenames = [os.path.relpath(source.path(i), images_dir) for i in range(size)]
    with open(os.path.join(root, "splits", f"{split}.txt"), encoding="utf-8") as f:
      assert sorted(filenames) == sorted(f.read().split())
    assert all(source.captions(i) == captions_by_file[name] for i, name in enumerate(filenames))
    first = source[0]
    assert os.path.isfile(first["name"]) and first["image"][:3] == b"\xff\xd8\xff"  # a JPEG
    assert first["captions"] == captions_by_file[filenames[0]]
    assert first["image_id"] == [e["split"] for e in entries].index(split)


# ----------------------------------------------------------------------------- tfds

_TFDS_SIZE = 16
_TFDS_SPLITS = {"train": range(0, 5), "test": range(5, 8)}


def _tfds_image(index):
  return _random_image(100 + index, _TFDS_SIZE, _TFDS_SIZE)


def _tfds_captions(index):
  """1-3 captions, one of them non-ASCII, so the utf-8 decoding is exercised."""
  return [f"picture {index} caption {k} \u00e9t\u00e9" for k in range(1 + index % 3)]


def _tfds_image_feature():
  return tfds.features.Image(shape=(_TFDS_SIZE, _TFDS_SIZE, 3), encoding_format="png")


class TinyPlainCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """captions: Sequence(Text()); images yielded as PNG bytes (no TensorFlow needed)."""
  name = "tiny_plain_captions"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": _tfds_image_feature(),
        "captions": tfds.features.Sequence(tfds.features.Text())}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(indices) for split, indices in _TFDS_SPLITS.items()}

  def _generate_examples(self, indices):
    for i in indices:
      yield i, {"image": _encoded(_tfds_image(i), "PNG"), "captions": _tfds_captions(i)}


class TinyCocoCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """coco_captions' layout: image/id and captions Sequence({"text", "id"}); PIL images."""
  name = "tiny_coco_captions"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": _tfds_image_feature(),
        "image/id": np.int64,
        "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64})}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(indices) for split, indices in _TFDS_SPLITS.items()}

  def _generate_examples(self, indices):
    for i in indices:
      yield i, {"image": Image.fromarray(_tfds_image(i)), "image/id": 1000 + i,
                "captions": [{"text": t, "id": 10 * i + k}
                             for k, t in enumerate(_tfds_captions(i))]}


@pytest.fixture(name="tfds_dir", scope="module")
def _tfds_dir(tmp_path_factory):
  """A TFDS data dir holding both tiny datasets, prepared as array_record."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for builder_class in (TinyPlainCaptions, TinyCocoCaptions):
    builder_class(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


# (dataset, TfdsCaptions keyword args, expected image_id of item i generated as example `original`)
_TFDS_CASES = [("tiny_plain_captions", {}, lambda i, original: i),
               ("tiny_coco_captions", {"caption_text_key": "text"},
                lambda i, original: 1000 + original)]


@pytest.mark.parametrize("name, kwargs, expected_image_id", _TFDS_CASES)
@pytest.mark.parametrize("split", ["train", "test"])
def test_tfds_captions_reads_back_the_dataset(tfds_dir, name, kwargs, expected_image_id, split):
  source = sources.TfdsCaptions(name, split, tfds_dir, **kwargs)
  assert len(source) == len(_TFDS_SPLITS[split])
  assert source.caption_counts() is None
  originals = []
  for i in range(len(source)):
    item = source[i]
    # tfds stores records shuffled: the caption text tells which generated example this is.
    original = int(item["captions"][0].split()[1])
    originals.append(original)
    assert item["captions"] == _tfds_captions(original)
    assert source.captions(i) == item["captions"]
    assert item["image"].dtype == np.uint8
    np.testing.assert_array_equal(item["image"], _tfds_image(original))
    assert item["name"] == f"{name}/{split}[{i}]"
    assert isinstance(item["image_id"], int)
    assert item["image_id"] == expected_image_id(i, original)
  assert sorted(originals) == list(_TFDS_SPLITS[split])


def test_tfds_caption_dicts_need_caption_text_key(tfds_dir):
  with pytest.raises(ValueError, match=r"holds dicts with keys \['id', 'text'\]"):
    sources.TfdsCaptions("tiny_coco_captions", "train", tfds_dir).captions(0)
  with pytest.raises(ValueError, match=r"has no 'caption'; it has \['id', 'text'\]"):
    sources.TfdsCaptions("tiny_coco_captions", "train", tfds_dir,
                         caption_text_key="caption").captions(0)
  with pytest.raises(ValueError, match=r"tiny_plain_captions/train\[0\] has no 'img'"):
    sources.TfdsCaptions("tiny_plain_captions", "train", tfds_dir, image_key="img")[0]
  with pytest.raises(IndexError, match=r"5 out of range \[0, 5\)"):
    sources.TfdsCaptions("tiny_plain_captions", "train", tfds_dir)[5]


def test_tfds_captions_pickles_without_its_open_data_source(tfds_dir):
  fresh = sources.TfdsCaptions("tiny_coco_captions", "train", tfds_dir, caption_text_key="text")
  used = sources.TfdsCaptions("tiny_coco_captions", "train", tfds_dir, caption_text_key="text")
  first = used[0]
  assert pickle.dumps(used) == pickle.dumps(fresh)
  # A fresh process that never defined the builder class (like a grain worker) reads it too.
  script = ("import pickle, sys; source = pickle.load(sys.stdin.buffer); item = source[0]; "
            "print(len(source), item['image_id'], item['image'].sum(), ascii(item['captions']))")
  result = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(used),
                          capture_output=True, check=True, cwd=REPO)
  assert result.stdout.decode().splitlines()[-1] == (
      f"{len(used)} {first['image_id']} {first['image'].sum()} {ascii(first['captions'])}")


# ----------------------------------------------------------------------------- make_source


def _data_config(**fields):
  """The default config of configs/common.py with `fields` of config.input.data changed."""
  config = common.base_config("tiny")
  config.input.data.update({"name": "captions_json", **fields})
  return config


def test_make_source_captions_json(captions_tree):
  annotations, images_dir = captions_tree
  config = _data_config(annotations=annotations, images_dir=images_dir,
                        train_splits=("train", "restval"), eval_split="val")
  train = registry.make_source(config, "train")
  evaluation = registry.make_source(config, "eval")
  assert isinstance(train, sources.CaptionsJson) and isinstance(evaluation, sources.CaptionsJson)
  assert [train.captions(i) for i in range(len(train))] == [
      c for _, c in _expected(("train", "restval"))]
  assert [evaluation.path(i) for i in range(len(evaluation))] == [
      os.path.join(images_dir, p) for p, _ in _expected(("val",))]


def test_make_source_tfds(tfds_dir):
  config = _data_config(name="tfds", tfds_name="tiny_coco_captions", tfds_data_dir=tfds_dir,
                        caption_text_key="text")
  for split_kind, split in (("train", "train"), ("eval", "test")):
    source = registry.make_source(config, split_kind)
    assert isinstance(source, sources.TfdsCaptions)
    assert len(source) == len(_TFDS_SPLITS[split])
    assert source[0]["image_id"] - 1000 in _TFDS_SPLITS[split]


@pytest.mark.parametrize("fields", [
    {"name": "synthetic", "num_train_images": 6, "num_eval_images": 4},
    {"name": "synthetic_video", "num_train_images": 8, "num_eval_images": 4, "clip_frames": 2},
    {"name": "tfds", "tfds_name": "tiny_plain_captions"}])
def test_make_source_numbers_the_eval_images_after_the_train_images(tfds_dir, fields):
  """Sources whose splits count from 0 on their own (synthetic ones; tfds records without
  `image/id`) give eval image i the id (train size) + i, so no id means two images."""
  config = _data_config(tfds_data_dir=tfds_dir, **fields)
  train, evaluation = (registry.make_source(config, kind) for kind in ("train", "eval"))
  assert [train[i]["image_id"] for i in range(len(train))] == list(range(len(train)))
  assert [evaluation[i]["image_id"] for i in range(len(evaluation))] == list(
      range(len(train), len(train) + len(evaluation)))


def test_tfds_image_ids_outside_int32_are_refused():
  source = sources.TfdsCaptions("any", "train", None)
  record = {"image": _tfds_image(0), "captions": [b"a picture"], "image/id": 2**31}
  source._data_source = [record]  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"any/train\[0\]: image_id 2147483648 is not a "
                                       "non-negative int32"):
    source[0]  # pylint: disable=pointless-statement


@pytest.mark.parametrize("fields, split_kind, message", [
    ({"name": "flickr"}, "train", "config.input.data.name='flickr' is not a source; known: "
                                  "synthetic, captions_json, tfds, array_record, webdataset, "
                                  "synthetic_video, msrvtt, frames_folder"),
    ({"annotations": "a.json", "images_dir": "images"}, "test",
     "split_kind must be 'train' or 'eval', got 'test'"),
    ({"images_dir": "images"}, "train", "config.input.data.annotations='' must be set"),
    ({"annotations": "a.json"}, "eval", "config.input.data.images_dir='' must be set"),
    ({"name": "tfds"}, "train",
     "config.input.data.tfds_name='' must be set for input.data.name='tfds'"),
    ({"name": "msrvtt", "annotations": "a.json"}, "train",
     "config.input.data.videos_dir='' must be set for input.data.name='msrvtt'"),
])
def test_make_source_rejects_bad_configs(fields, split_kind, message):
  with pytest.raises(ValueError) as error:
    registry.make_source(_data_config(**fields), split_kind)
  assert message in str(error.value)
