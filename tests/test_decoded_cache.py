"""`input.cache_decoded`: training images decoded and downscaled once, kept in memory
(sources.DecodedImages, pipeline.train_source). The cached stream draws the same crops as the
uncached one, skips or fails on the same bad files, resumes and runs in worker processes; with
the cache off the stream is the one of before the option existed."""

import hashlib
import io
import json
import os

import numpy as np
import pytest
from absl import flags
from PIL import Image

from configs import common
from cots_jax import config_validation
from cots_jax.data import pipeline
from cots_jax.data import sources
from cots_jax.data import transforms
from cots_jax.data.transforms import BadExampleError

SIZE, BATCH = 24, 4
# min_input_side of the crop at crop_scale (0.5, 1): ceil(24 / sqrt(0.5 * 3 / 4)).
CACHE_SIDE = 40


def _pattern(height, width, k):
  """uint8 [height, width, 3]: smooth integer ramps (exact on every platform), distinct per k."""
  y, x = np.mgrid[:height, :width]
  return np.stack([(x * (k + 2) + y) % 256, (y * (k + 3)) % 256, (x + y * 2 + 40 * k) % 256],
                  axis=-1).astype(np.uint8)


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


# name -> (file bytes or None for a missing file, captions), in file order after one test image;
# the good images are larger and smaller than CACHE_SIDE, landscape and portrait.
TRAIN = {
    "wide.png": (_png(_pattern(90, 120, 0)), ["a wide picture", "wide again"]),
    "tall.png": (_png(_pattern(120, 90, 1)), ["a tall picture"]),
    "corrupt.png": (b"\x89PNG\r\n\x1a\n not really a png", ["corrupt"]),
    "small.png": (_png(_pattern(30, 36, 2)), ["a small picture", "small again"]),
    "missing.png": (None, ["missing"]),
    "square.png": (_png(_pattern(64, 64, 3)), ["a square picture", "   "]),
}
BAD = ("corrupt.png", "missing.png")


@pytest.fixture(name="root", scope="module")
def _root(tmp_path_factory):
  """A captions json: one test image, then TRAIN (so train ids are not train indices)."""
  root = tmp_path_factory.mktemp("cache")
  (root / "images").mkdir()
  entries = []
  for name, (data, captions), split in [("test.png", (_png(_pattern(50, 50, 9)), ["test"]),
                                         "test"), *((n, v, "train") for n, v in TRAIN.items())]:
    if data is not None:
      (root / "images" / name).write_bytes(data)
    entries.append({"filename": name, "split": split,
                    "sentences": [{"raw": caption} for caption in captions]})
  (root / "ann.json").write_text(json.dumps({"images": entries}))
  return str(root)


def _config(root, cache_decoded, **input_overrides):
  config = common.base_config("tiny")
  config.input.data.update(name="captions_json", annotations=os.path.join(root, "ann.json"),
                           images_dir=os.path.join(root, "images"))
  config.model.image.image_size, config.model.image.patch_size = SIZE, 8
  config.input.update({"batch_size": BATCH, "prefetch": 0, "mvm_min_block": 2,
                       "augment": "crop_flip", "cache_decoded": cache_decoded, **input_overrides})
  return config


def _take(config, n):
  iterator = pipeline.make_train_iterator(config)
  return [next(iterator) for _ in range(n)]


# Two epochs: 7 good pairs (the blank caption and the 2 bad files' pairs are skipped).
NUM_BATCHES = 4


def test_decoded_images_hold_each_good_image_downscaled_once(root):
  source = sources.CaptionsJson(os.path.join(root, "ann.json"), os.path.join(root, "images"),
                                "train")
  cached = sources.DecodedImages(source, CACHE_SIDE, num_threads=2)
  assert len(cached) == len(source) and cached.num_bad == len(BAD)
  assert cached.captions(2) == source.captions(2)
  np.testing.assert_array_equal(cached.caption_counts(), source.caption_counts())
  nbytes = 0
  for i, name in enumerate(TRAIN):
    if name == "missing.png":
      with pytest.raises(BadExampleError, match="missing file"):
        cached[i]  # pylint: disable=pointless-statement
      continue
    item, original = cached[i], source[i]
    if name == "corrupt.png":  # not kept: the source's bytes, which fail to decode as before
      assert item == original
      continue
    assert {k: v for k, v in item.items() if k not in ("image", "full_size")} == {
        k: v for k, v in original.items() if k != "image"}
    full = np.asarray(Image.open(io.BytesIO(original["image"])).convert("RGB"))
    height, width = full.shape[:2]
    assert item["full_size"] == (height, width)
    factor = CACHE_SIDE / min(height, width)
    expected = full if factor >= 1 else np.asarray(Image.fromarray(full).resize(
        (round(width * factor), round(height * factor)), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(item["image"], expected)
    nbytes += expected.nbytes
  assert cached.nbytes == nbytes


def _digest(batches):
  """sha256 of every field but image_id (whose numbering changed with the option), in order."""
  digest = hashlib.sha256()
  for batch in batches:
    for key in sorted(set(batch) - {"image_id"}):
      digest.update(key.encode() + np.ascontiguousarray(batch[key]).tobytes())
  return digest.hexdigest()


def test_with_the_cache_off_the_stream_is_the_one_of_before_the_option(root, monkeypatch):
  """Recorded with the pipeline of commit 2bbe3a7, before input.cache_decoded existed (pinned
  grain, pillow and tokenizer): crops, flips, second views, masks and skips, bit for bit."""
  monkeypatch.setattr(sources, "DecodedImages", None)  # never built when off
  batches = _take(_config(root, False, second_view=True, view_flip_prob=0.5), NUM_BATCHES)
  assert _digest(batches) == "7ab567d979ed3f8236dcbe94b562ec2b2c090e33eaa00f43a20dc6e458c565d1"


def test_the_cached_stream_draws_the_same_crops_as_the_uncached_one(root):
  """Every field but the pixels is equal (same draws, same skips); the pixels differ by the
  resampling of the downscale only: under 2 levels of 255 on average."""
  for overrides in ({"second_view": True, "view_flip_prob": 0.5}, {"augment": "none"}):
    plain = _take(_config(root, False, **overrides), NUM_BATCHES)
    cached = _take(_config(root, True, **overrides), NUM_BATCHES)
    for p, c in zip(plain, cached):
      assert p.keys() == c.keys()
      for key in p:
        if key in ("image", "image_view"):
          difference = np.abs(p[key] - c[key]).mean(axis=(1, 2, 3)) * 127.5
          assert difference.max() < 2, (key, difference)
        else:
          np.testing.assert_array_equal(p[key], c[key], err_msg=key)


def test_the_vq_image_stream_reads_the_cache_too(root):
  """A batch of 4 is the 4 good train images: the downscaled ones differ by resampling only."""
  plain, cached = (next(pipeline.make_image_iterator(_config(root, cache), 4, seed=1))
                   for cache in (False, True))
  np.testing.assert_array_equal(plain["skipped"], cached["skipped"])
  difference = np.abs(plain["image"] - cached["image"]).mean(axis=(1, 2, 3)) * 127.5
  assert 0 < difference.max() < 2


def test_cached_crops_and_flips_still_randomise(root):
  batches = _take(_config(root, True), NUM_BATCHES)
  # Two epochs of the 7 good pairs: every pair is cropped anew in the second.
  first = {(int(i), t.tobytes()): x for b in batches[:2] for i, t, x in
           zip(b["image_id"], b["text_ids"], b["image"])}
  second = [((int(i), t.tobytes()), x) for b in batches[2:] for i, t, x in
            zip(b["image_id"], b["text_ids"], b["image"])]
  repeated = [(first[key], x) for key, x in second if key in first]
  assert repeated and all(not np.array_equal(a, b) for a, b in repeated)
  whole = dict(crop_scale=(1.0, 1.0))
  kept, mirrored = (_take(_config(root, True, flip_prob=p, **whole), 1)[0]["image"]
                    for p in (0.0, 1.0))
  np.testing.assert_array_equal(mirrored, kept[:, :, ::-1])


def test_the_cache_keeps_the_side_the_second_view_needs(root):
  config = _config(root, True, second_view=True, view_crop_scale=(0.25, 1.0))
  side = pipeline.train_source(config).min_side
  assert side == transforms.ImageTransform.for_views(config).min_input_side() > CACHE_SIDE
  assert pipeline.train_source(_config(root, True)).min_side == CACHE_SIDE


def test_a_bad_image_fails_the_cached_stream_as_it_fails_the_uncached_one(root):
  messages = []
  for cache in (False, True):
    with pytest.raises(Exception) as error:
      _take(_config(root, cache, on_bad_example="fail"), NUM_BATCHES)
    messages.append(str(error.value))
  assert messages[0] == messages[1]
  assert any(name in messages[1] for name in (*BAD, "square.png")), messages[1]


def test_the_cached_stream_resumes_exactly(root):
  config = _config(root, True)
  iterator = pipeline.make_train_iterator(config)
  next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  resumed = pipeline.make_train_iterator(config)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(2)]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_worker_process_gives_the_cached_stream(root):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  expected = _take(_config(root, True), 2)
  iterator = pipeline.make_train_iterator(_config(root, True, num_workers=1))
  for a in expected:
    b = next(iterator)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  iterator.close()


def test_cache_decoded_is_refused_for_video():
  config = common.base_config("tiny")
  config.input.data.name = "synthetic_video"
  config.loss.mvm = 0.0
  config.input.cache_decoded = True
  with pytest.raises(ValueError, match=r"config.input.cache_decoded=True must be False with "
                                       "video data"):
    config_validation.validate(config)
