"""Real-data pipelines end to end (issue: captions_json through grain, bad input skipped or fatal):
pair tables, augmentation, skipping and counting, failing with the file named, the eval gallery,
the trainer's data/skipped, and the Flickr8k config on ../shared/data."""

import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from configs import common
from configs import pretrain
from cots_jax import train
from cots_jax.data import eval_split
from cots_jax.data import pipeline
from cots_jax.data import registry
from cots_jax.data import sources
from cots_jax.data import transforms
from cots_jax.metrics_writer import read_metrics
from support import shared_dataset_dir

SIZE, BATCH = 24, 4


def _png(colour, size=(30, 20), mode="RGB"):
  buffer = io.BytesIO()
  Image.new(mode, size, colour).save(buffer, format="PNG")
  return buffer.getvalue()


def _jpeg(colour, size=(40, 32)):
  buffer = io.BytesIO()
  Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


# name -> (file bytes or None for a missing file, captions); the good ones differ in size and mode.
GOOD = {
    "red.png": (_png((250, 0, 0)), ["a red picture", "all red"]),
    "green.jpg": (_jpeg((0, 250, 0)), ["a green picture", "green all over", "grass green"]),
    "grey.png": (_png(128, (16, 16), mode="L"), ["a grey picture"]),
    "blue.png": (_png((0, 0, 250, 255), (24, 40), mode="RGBA"), ["a blue picture", "sky blue"]),
}
BAD_FILES = {
    "corrupt.jpg": (b"\xff\xd8\xff\xe0 not really a jpeg", ["corrupt"]),
    "truncated.jpg": (_jpeg((9, 9, 9), (64, 64))[:200], ["truncated"]),
    "empty.png": (b"", ["empty"]),
    "text.png": (b"hello, I am text", ["text"]),
    "missing.jpg": (None, ["missing"]),
}
# The blank caption of an otherwise good image is one more bad pair.
BLANK = {"white.png": (_png((255, 255, 255)), ["a white picture", "   "])}


def _write_set(root, entries, split):
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  images = []
  for name, (data, captions) in entries.items():
    if data is not None:
      with open(os.path.join(root, "images", name), "wb") as f:
        f.write(data)
    images.append({"filename": name, "split": split,
                   "sentences": [{"raw": caption} for caption in captions]})
  return images


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  """A captions json whose train split mixes good and broken files; test split: good only."""
  root = str(tmp_path_factory.mktemp("captions"))
  images = _write_set(root, {**GOOD, **BAD_FILES, **BLANK}, "train")
  images += _write_set(root, {"t" + k: v for k, v in GOOD.items()}, "test")
  with open(os.path.join(root, "annotations.json"), "w", encoding="utf-8") as f:
    json.dump({"images": images}, f)
  return root


def _config(root, on_bad_example="skip", augment="none"):
  config = common.base_config("tiny")
  data = config.input.data
  data.name = "captions_json"
  data.annotations = os.path.join(root, "annotations.json")
  data.images_dir = os.path.join(root, "images")
  config.model.image.image_size, config.model.image.patch_size = SIZE, 8
  config.input.batch_size, config.input.prefetch = BATCH, 0
  config.input.augment, config.input.on_bad_example = augment, on_bad_example
  config.input.mvm_min_block = 2
  return config


NUM_PAIRS = sum(len(c) for _, c in {**GOOD, **BAD_FILES, **BLANK}.values())
NUM_BAD = sum(len(c) for _, c in BAD_FILES.values()) + 1


def _epoch(iterator, num_good):
  """Batches until at least `num_good` good pairs were seen."""
  batches = []
  while sum(len(b["image_id"]) for b in batches) < num_good:
    batches.append(next(iterator))
  return batches


def test_pair_table_lists_every_caption_or_draws_one():
  class Counted:
    def __len__(self):
      return 3

    def caption_counts(self):
      return np.array([2, 0, 3])

  class Uncounted(Counted):
    def caption_counts(self):
      return None

  np.testing.assert_array_equal(pipeline.pair_table(Counted()),
                                [[0, 0], [0, 1], [2, 0], [2, 1], [2, 2]])
  np.testing.assert_array_equal(pipeline.pair_table(Uncounted()), [[0, -1], [1, -1], [2, -1]])


def test_bad_examples_are_skipped_counted_and_named(dataset_dir, caplog):
  config = _config(dataset_dir)
  num_good = NUM_PAIRS - NUM_BAD
  with caplog.at_level(logging.WARNING):
    batches = _epoch(pipeline.make_train_iterator(config), num_good)
  # image_id is the position in the annotations, where the train entries come first.
  names_by_id = list({**GOOD, **BAD_FILES, **BLANK})
  names = [names_by_id[i] for b in batches for i in b["image_id"]]
  # The first epoch holds every good pair once and no bad one (it ends inside the last batch).
  first_epoch = names[:num_good]
  expected = {n: len(c) for n, (_, c) in GOOD.items()} | {"white.png": 1}
  assert {n: first_epoch.count(n) for n in set(first_epoch)} == expected
  assert sum(int(b["skipped"].sum()) for b in batches) >= NUM_BAD
  for batch in batches:
    assert batch["image"].shape == (BATCH, SIZE, SIZE, 3) and batch["skipped"].dtype == np.int32
  warnings = [r.getMessage() for r in caplog.records if "skipping bad example" in r.getMessage()]
  assert len(warnings) == pipeline.WARN_FIRST
  assert "only counted" in warnings[-1]
  assert any(name in " ".join(warnings) for name in BAD_FILES)


def test_skipped_counts_add_up_over_an_exact_epoch(dataset_dir):
  """With a batch that divides the good pairs, one epoch's `skipped` is exactly the bad pairs."""
  config = _config(dataset_dir)
  num_good = NUM_PAIRS - NUM_BAD
  config.input.batch_size = num_good
  batch = next(pipeline.make_train_iterator(config))
  assert len(batch["image_id"]) == num_good
  # Bad pairs after the last good one of the epoch count towards the next batch.
  assert int(batch["skipped"].sum()) <= NUM_BAD
  two = _epoch(pipeline.make_train_iterator(config), 2 * num_good)
  assert int(two[0]["skipped"].sum() + two[1]["skipped"].sum()) in range(NUM_BAD, 2 * NUM_BAD + 1)


def test_fail_stops_with_the_file_and_the_reason(dataset_dir):
  config = _config(dataset_dir, on_bad_example="fail")
  with pytest.raises(Exception) as error:
    _epoch(pipeline.make_train_iterator(config), NUM_PAIRS)
  message = str(error.value)
  assert any(name in message for name in [*BAD_FILES, "white.png"]), message
  assert any(word in message for word in ("empty", "missing", "corrupt", "truncated",
                                          "not an image", "cannot identify")), message


def test_crop_flip_is_seeded_and_differs_from_the_plain_resize(dataset_dir):
  plain = next(pipeline.make_train_iterator(_config(dataset_dir)))
  crop = next(pipeline.make_train_iterator(_config(dataset_dir, augment="crop_flip")))
  again = next(pipeline.make_train_iterator(_config(dataset_dir, augment="crop_flip")))
  np.testing.assert_array_equal(crop["image"], again["image"])
  np.testing.assert_array_equal(crop["text_ids"], plain["text_ids"])
  assert crop["image"].shape == plain["image"].shape == (BATCH, SIZE, SIZE, 3)
  # Single-colour images: the crop keeps the colour (up to resampling at the borders).
  np.testing.assert_allclose(crop["image"].mean(axis=(1, 2)), plain["image"].mean(axis=(1, 2)),
                             atol=0.05)


def test_eval_split_leaves_out_bad_images_and_blank_captions(dataset_dir):
  config = _config(dataset_dir)
  config.input.data.eval_split = "train"
  split = eval_split.make_eval_split(config, batch_size=3)
  good = {**GOOD, **BLANK}
  assert split.num_images == len(good)
  assert split.num_texts == sum(len(c) for _, c in GOOD.items()) + 1
  assert split.num_skipped == len(BAD_FILES) + 1
  assert "   " not in split.captions
  images = np.concatenate([b["image"][b["valid"]] for b in split.image_batches()])
  assert images.shape == (len(good), SIZE, SIZE, 3)
  red = images[list(good).index("red.png")]
  np.testing.assert_allclose(red.mean(axis=(0, 1)), np.array([250, 0, 0]) / 127.5 - 1, atol=0.02)
  for text, image in zip(split.captions, split.txt2img):
    assert text in list(good.values())[image][1]
  config.input.on_bad_example = "fail"
  with pytest.raises(Exception, match="corrupt.jpg|truncated.jpg|empty.png|text.png|missing.jpg"):
    eval_split.make_eval_split(config)


def _train_config(root, on_bad_example="skip"):
  config = _config(root, on_bad_example)
  config.model.embed_dim = 16
  for tower in (config.model.image, config.model.text):
    tower.width, tower.depth, tower.heads = 32, 1, 2
  config.vq.codebook_size, config.vq.hidden, config.vq.steps, config.vq.batch_size = 16, 16, 4, 4
  config.queue.size = 8
  config.total_steps, config.optim.warmup_steps = 6, 1
  config.log_every, config.eval_every, config.checkpoint_every = 3, 0, 0
  config.eval.batch_size = 4
  return config


@pytest.mark.slow
def test_training_counts_skipped_examples_in_metrics(dataset_dir, tmp_path):
  config = _train_config(dataset_dir)
  train.train_and_evaluate(config, str(tmp_path))
  logged = [r["data/skipped"] for r in read_metrics(str(tmp_path)) if "data/skipped" in r]
  iterator = pipeline.make_train_iterator(config)
  expected = np.cumsum([int(next(iterator)["skipped"].sum()) for _ in range(6)])
  assert logged == [expected[2], expected[5]] and expected[5] > 0


def test_training_stops_naming_the_bad_file_when_told_to_fail(dataset_dir, tmp_path):
  with pytest.raises(Exception, match="corrupt.jpg|truncated.jpg|empty.png|text.png|missing.jpg"):
    train.train_and_evaluate(_train_config(dataset_dir, "fail"), str(tmp_path))


def test_flickr8k_config_reads_the_shared_data(monkeypatch):
  monkeypatch.setenv("COTS_DATA_DIR", os.path.dirname(shared_dataset_dir("flickr8k")))
  config = pretrain.get_config("data=flickr8k")
  train_source = registry.make_source(config, "train")
  eval_source = registry.make_source(config, "eval")
  assert isinstance(train_source, sources.CaptionsJson)
  assert (len(train_source), len(eval_source)) == (6000, 1000)
  assert pipeline.pair_table(train_source).shape == (30000, 2)
  config.input.batch_size = 8
  batch = next(pipeline.make_train_iterator(config))
  size = config.model.image.image_size
  assert batch["image"].shape == (8, size, size, 3) and int(batch["skipped"].sum()) == 0
  assert -1 <= batch["image"].min() < batch["image"].max() <= 1


def _flickr8k_config(monkeypatch):
  """configs/pretrain.py:data=flickr8k on the shared copy, shrunk to 24 px batches of 8."""
  monkeypatch.setenv("COTS_DATA_DIR", os.path.dirname(shared_dataset_dir("flickr8k")))
  config = pretrain.get_config("data=flickr8k")
  config.model.image.image_size, config.model.image.patch_size = SIZE, 8
  config.input.batch_size, config.input.mvm_min_block = 8, 2
  return config


def test_flickr8k_test_image_ids_never_occur_in_the_training_stream(monkeypatch):
  """Ids are unique over the dataset: none of the 1000 test images shares an id with any of the
  6000 train images (all their pairs) or with the images of a few training batches."""
  config = _flickr8k_config(monkeypatch)
  train_source = registry.make_source(config, "train")
  eval_source = registry.make_source(config, "eval")
  test_ids = {eval_source[i]["image_id"] for i in range(len(eval_source))}
  train_ids = {train_source[int(i)]["image_id"]
               for i in np.unique(pipeline.pair_table(train_source)[:, 0])}
  assert (len(test_ids), len(train_ids)) == (1000, 6000) and not test_ids & train_ids
  iterator = pipeline.make_train_iterator(config)
  stream_ids = {int(i) for _ in range(3) for i in next(iterator)["image_id"]}
  assert stream_ids <= train_ids and not stream_ids & test_ids


def test_flickr8k_crops_of_decoded_once_photos_match_crops_of_the_files(monkeypatch):
  """input.cache_decoded on real photos: the same crops and flips (one seed per image), taken
  from images decoded and downscaled once, keep the pixels, the mean and the contrast of the
  crops of the decoded files (in uint8 levels)."""
  config = _flickr8k_config(monkeypatch)
  transform = transforms.ImageTransform.for_training(config)
  files = registry.make_source(config, "train")

  class First64:
    def __len__(self):
      return 64

    def __getitem__(self, index):
      return files[index]
  cached = sources.DecodedImages(First64(), transform.min_input_side())
  plain, from_cache = [], []
  for i in range(len(cached)):
    item = cached[i]
    plain.append(transform(files[i]["image"], "", np.random.default_rng(i)))
    from_cache.append(transform(item["image"], "", np.random.default_rng(i), item["full_size"]))
  plain, from_cache = np.stack(plain) * 127.5, np.stack(from_cache) * 127.5  # uint8 levels
  assert np.abs(plain - from_cache).mean() < 2
  assert abs(plain.mean() - from_cache.mean()) < 0.5 and abs(plain.std() - from_cache.std()) < 1
