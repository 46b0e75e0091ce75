"""The tokenizer and the grain pipelines (design §4.3, §6): shapes, agreement with the source,
determinism, process shards, per-epoch reshuffle, resumption, eval padding."""

import importlib.resources

import numpy as np
import pytest
from absl import flags

from configs import common
from cots_jax import config_validation
from cots_jax.data import eval_split
from cots_jax.data import masking
from cots_jax.data import pipeline
from cots_jax.data import synthetic
from cots_jax.data import tokenizer as tokenizer_lib
from cots_jax.data import transforms

NUM_IMAGES, BATCH = 16, 8
EXAMPLES = NUM_IMAGES * 5


def _config(**input_overrides):
  config = common.base_config("tiny")
  config.input.data.num_train_images = NUM_IMAGES
  config.input.data.num_eval_images = 12
  config.input.batch_size = BATCH
  for key, value in input_overrides.items():
    config.input[key] = value
  return config


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.load_tokenizer()


@pytest.fixture(scope="module")
def caption_ids(tokenizer):
  """{(image, tuple of caption token ids): caption index} over the train source of _config()."""
  config = _config()
  source = synthetic.SyntheticCaptions(NUM_IMAGES, "train", config.seed, 48)
  table = {}
  for i in range(NUM_IMAGES):
    ids, _ = tokenizer_lib.tokenize(tokenizer, source.captions(i), config.input.max_len)
    table.update({(i, tuple(row)): c for c, row in enumerate(ids)})
  assert len(table) == EXAMPLES
  return table


def _examples(batch, caption_ids):
  """Example indices (image * 5 + caption) of a batch, identified by image id and text."""
  return [i * 5 + caption_ids[(i, tuple(ids))]
          for i, ids in zip(batch["image_id"].tolist(), batch["text_ids"])]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------- tokenizer


def test_shipped_vocab_is_used(tokenizer):
  vocab_file = (importlib.resources.files("cots_jax.data") / "vocab" /
                tokenizer_lib.SHIPPED_VOCAB).read_text(encoding="utf-8").splitlines()
  assert len(tokenizer) == len(vocab_file) == 30522
  words = "a large red circle in the top left".split()
  ids = tokenizer("A Large RED circle in the top left")["input_ids"]
  assert ids == [vocab_file.index("[CLS]")] + [vocab_file.index(w) for w in words] + [
      vocab_file.index("[SEP]")]
  assert tokenizer.unk_token_id not in ids


def test_tokenize_pads_and_truncates(tokenizer):
  ids, mask = tokenizer_lib.tokenize(tokenizer, ["a red circle", "a " * 50], 8)
  assert ids.shape == mask.shape == (2, 8) and ids.dtype == mask.dtype == np.int32
  cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
  a_id, red, circle = tokenizer("a red circle")["input_ids"][1:4]
  np.testing.assert_array_equal(ids[0], [cls_id, a_id, red, circle, sep_id, 0, 0, 0])
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(ids[1], [cls_id] + [a_id] * 6 + [sep_id])
  np.testing.assert_array_equal(mask[1], 1)


def test_load_tokenizer_from_a_local_directory(tokenizer, tmp_path):
  tokenizer.save_pretrained(tmp_path)
  loaded = tokenizer_lib.load_tokenizer(str(tmp_path))
  texts = ["three shapes: a small cyan cross at the top", "upper left: big white square"]
  for a, b in zip(tokenizer_lib.tokenize(tokenizer, texts, 16),
                  tokenizer_lib.tokenize(loaded, texts, 16)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- training stream


def test_train_batches_match_the_source_and_the_contract(tokenizer, caption_ids):
  config = _config()
  source = synthetic.SyntheticCaptions(NUM_IMAGES, "train", config.seed, 48)
  L = config.input.max_len
  P = masking.num_mlm_predictions(config.input.mlm_prob, L)
  N = (config.model.image.image_size // config.model.image.patch_size) ** 2
  for batch in _take(pipeline.make_train_iterator(config), 3):
    expected = {"image": ((BATCH, 48, 48, 3), np.float32), "text_ids": ((BATCH, L), np.int32),
                "text_mask": ((BATCH, L), np.int32), "image_id": ((BATCH,), np.int32),
                "mlm_ids": ((BATCH, L), np.int32), "mlm_positions": ((BATCH, P), np.int32),
                "mlm_targets": ((BATCH, P), np.int32), "mlm_weights": ((BATCH, P), np.float32),
                "mvm_mask": ((BATCH, N), np.bool_), "skipped": ((BATCH,), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    np.testing.assert_array_equal(batch["mvm_mask"].sum(axis=1), round(0.4 * N))
    _examples(batch, caption_ids)  # every text is a caption of its image
    for row in range(BATCH):
      image = source[int(batch["image_id"][row])]["image"]
      np.testing.assert_allclose(batch["image"][row], image / 127.5 - 1, atol=1e-6)
      ids, mask = batch["text_ids"][row], batch["text_mask"][row]
      np.testing.assert_array_equal(mask, ids != tokenizer.pad_token_id)
      weights = batch["mlm_weights"][row]
      n_real = int(mask.sum()) - 2
      assert weights.sum() == min(P, max(1, round(0.15 * n_real)))
      positions = batch["mlm_positions"][row][weights > 0]
      np.testing.assert_array_equal(batch["mlm_targets"][row][weights > 0], ids[positions])
      changed = np.flatnonzero(batch["mlm_ids"][row] != ids)
      assert set(changed) <= set(positions)


def test_fields_that_no_term_reads_are_left_out_and_the_rest_unchanged(caption_ids):
  full = next(pipeline.make_train_iterator(_config()))
  config = _config()
  config.loss.update(mlm=0.0, mvm=0.0)
  cached_text = {"text": np.arange(EXAMPLES * 4, dtype=np.float32).reshape(EXAMPLES, 4)}
  assert pipeline.fields_read(config, cached_text) == (False, False, False)
  lean = next(pipeline.make_train_iterator(config, features=cached_text))
  assert set(lean) == {"image", "image_id", "text_features", "skipped"}
  for key in lean.keys() - {"text_features"}:
    np.testing.assert_array_equal(lean[key], full[key], err_msg=key)
  # Each pair carries the feature row of its own caption (rows in pair_table order).
  np.testing.assert_array_equal(lean["text_features"][:, 0],
                                4 * np.array(_examples(full, caption_ids)))
  assert pipeline.fields_read(config, None) == (True, False, False)
  config.loss.update(mvm=0.1, cookie_tt=1.0)
  assert pipeline.fields_read(config, cached_text) == (True, False, True)
  config.loss.cookie_intra_mode = "cross_model"  # reads the pooled features, not the tokens
  assert pipeline.fields_read(config, cached_text) == (False, False, True)


def test_train_stream_is_deterministic_by_seed():
  first = _take(pipeline.make_train_iterator(_config()), 3)
  _assert_same(first, _take(pipeline.make_train_iterator(_config()), 3))
  other = _config()
  other.seed = 1
  different = _take(pipeline.make_train_iterator(other), 3)
  assert not np.array_equal(first[0]["image"], different[0]["image"])


def test_epochs_cover_every_example_once_and_reshuffle(caption_ids):
  batches_per_epoch = EXAMPLES // BATCH
  batches = _take(pipeline.make_train_iterator(_config(prefetch=0)), 2 * batches_per_epoch)
  epochs = [sum((_examples(b, caption_ids) for b in batches[e * batches_per_epoch:
                                                                (e + 1) * batches_per_epoch]), [])
            for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(EXAMPLES))
  assert epochs[0] != epochs[1]
  # Masks are drawn anew each epoch: the same example gets another MVM mask.
  masks = [{} for _ in range(2)]
  for e in range(2):
    for b in batches[e * batches_per_epoch:(e + 1) * batches_per_epoch]:
      masks[e].update(zip(_examples(b, caption_ids), b["mvm_mask"]))
  assert sum(np.array_equal(masks[0][x], masks[1][x]) for x in range(EXAMPLES)) < EXAMPLES // 10


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_process_shards_are_disjoint_and_complete(caption_ids, process_count):
  """Over 3 epochs, process p gets the single-process stream's examples p, p + N, ... with the
  same masks, so the shards are disjoint and together hold every example 3 times."""
  config = _config()
  config.input.batch_size = 6 if process_count == 3 else BATCH
  num_batches = 3 * EXAMPLES // config.input.batch_size
  whole = _take(pipeline.make_train_iterator(config), num_batches)
  stream = sum((_examples(b, caption_ids) for b in whole), [])
  stream_masks = np.concatenate([b["mvm_mask"] for b in whole])
  shards = []
  for process_index in range(process_count):
    iterator = pipeline.make_train_iterator(config, process_index=process_index,
                                            process_count=process_count)
    shard = _take(iterator, num_batches)
    assert shard[0]["image"].shape[0] == config.input.batch_size // process_count
    shards.append(sum((_examples(b, caption_ids) for b in shard), []))
    assert shards[-1] == stream[process_index::process_count]
    np.testing.assert_array_equal(np.concatenate([b["mvm_mask"] for b in shard]),
                                  stream_masks[process_index::process_count])
  assert sorted(sum(shards, [])) == sorted(list(range(EXAMPLES)) * 3)


def test_long_and_unicode_captions_tokenise(tokenizer):
  long_caption = " ".join(["a red circle"] * 100)
  ids, mask = tokenizer_lib.tokenize(tokenizer, [long_caption, "café, naïve 東京 — ☃"], 12)
  assert ids.shape == mask.shape == (2, 12) and mask[0].all()
  assert ids[0, 0] == tokenizer.cls_token_id and ids[0, -1] == tokenizer.sep_token_id
  words = tokenizer.convert_ids_to_tokens(ids[1][mask[1] == 1].tolist())
  assert words[:4] == ["[CLS]", "cafe", ",", "naive"] and "東" in words and "[SEP]" in words


def test_get_state_set_state_resumes_exactly():
  config = _config()
  iterator = pipeline.make_train_iterator(config)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 2)
  resumed = pipeline.make_train_iterator(config)
  resumed.set_state(state)
  _assert_same(expected, _take(resumed, 2))


def test_second_view_is_another_crop_of_the_same_image_and_changes_nothing_else():
  plain = _take(pipeline.make_train_iterator(_config()), 2)
  assert "image_view" not in plain[0]
  config = _config(second_view=True)
  with_view = _take(pipeline.make_train_iterator(config), 2)
  for p, v in zip(plain, with_view):
    assert v.keys() == p.keys() | {"image_view"}
    _assert_same([p], [{k: x for k, x in v.items() if k != "image_view"}])
    assert v["image_view"].shape == v["image"].shape and v["image_view"].dtype == np.float32
    assert v["image_view"].min() >= -1 and v["image_view"].max() <= 1
    for image, view in zip(v["image"], v["image_view"]):
      assert not np.array_equal(image, view)
  _assert_same(with_view, _take(pipeline.make_train_iterator(config), 2))
  other_seed = _config(second_view=True)
  other_seed.seed = 1
  assert not np.array_equal(with_view[0]["image_view"],
                            _take(pipeline.make_train_iterator(other_seed), 1)[0]["image_view"])


def test_second_view_crop_and_flip_follow_the_config():
  """A crop of the whole area is the (already full-size) synthetic image itself; flip 1 mirrors
  it left-right."""
  whole = _take(pipeline.make_train_iterator(
      _config(second_view=True, view_crop_scale=(1.0, 1.0))), 1)[0]
  np.testing.assert_array_equal(whole["image_view"], whole["image"])
  mirrored = _take(pipeline.make_train_iterator(
      _config(second_view=True, view_crop_scale=(1.0, 1.0), view_flip_prob=1.0)), 1)[0]
  np.testing.assert_array_equal(mirrored["image_view"], whole["image"][:, :, ::-1])


def test_second_view_resumes_exactly():
  config = _config(second_view=True)
  iterator = pipeline.make_train_iterator(config)
  _take(iterator, 2)
  state = iterator.get_state()
  expected = _take(iterator, 2)
  resumed = pipeline.make_train_iterator(config)
  resumed.set_state(state)
  _assert_same(expected, _take(resumed, 2))


def test_worker_processes_give_the_same_stream():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags (stack-notes §2)
  expected = _take(pipeline.make_train_iterator(_config(prefetch=0)), 2)
  iterator = pipeline.make_train_iterator(_config(num_workers=1))
  _assert_same(expected, _take(iterator, 2))
  iterator.close()


def test_bad_configs_fail_with_the_field_name():
  config = _config()
  config.input.data.name = "coco"
  with pytest.raises(ValueError, match="input.data.name='coco'"):
    pipeline.make_train_dataset(config)
  config = _config()
  config.model.image.patch_size = 5
  with pytest.raises(ValueError, match="model.image.patch_size=5"):
    pipeline.make_train_dataset(config)
  with pytest.raises(ValueError, match="input.batch_size=8"):
    pipeline.make_train_dataset(_config(), process_index=0, process_count=3)


# ----------------------------------------------------------------------------- VQ images, eval


def test_image_iterator_shuffles_the_train_images_each_epoch():
  config = _config()
  source = synthetic.SyntheticCaptions(NUM_IMAGES, "train", config.seed, 48)
  references = np.stack([source[i]["image"] / 127.5 - 1 for i in range(NUM_IMAGES)])
  batches = _take(pipeline.make_image_iterator(config, 4, seed=3), 2 * NUM_IMAGES // 4)
  assert batches[0].keys() == {"image", "skipped"} and batches[0]["image"].dtype == np.float32
  order = []
  for b in batches:
    assert b["image"].shape == (4, 48, 48, 3)
    distance = np.abs(b["image"][:, None] - references[None]).max(axis=(2, 3, 4))
    assert np.all(distance.min(axis=1) < 1e-6)
    order += distance.argmin(axis=1).tolist()
  assert sorted(order[:NUM_IMAGES]) == sorted(order[NUM_IMAGES:]) == list(range(NUM_IMAGES))
  assert order[:NUM_IMAGES] != order[NUM_IMAGES:]
  again = _take(pipeline.make_image_iterator(config, 4, seed=3), 1)
  np.testing.assert_array_equal(again[0]["image"], batches[0]["image"])
  other = _take(pipeline.make_image_iterator(config, 4, seed=4), 4)
  assert [b["image"].tobytes() for b in other] != [b["image"].tobytes() for b in batches[:4]]


def test_eval_split_pads_the_last_batch_and_maps_texts_to_images(tokenizer):
  config = _config()
  split = eval_split.make_eval_split(config, batch_size=5)
  source = synthetic.SyntheticCaptions(12, "eval", config.seed, 48)
  assert (split.num_images, split.num_texts) == (12, 60) and len(split.captions) == 60
  assert split.txt2img.dtype == np.int32 and split.txt2img.shape == (60,)
  for text, image in zip(split.captions, split.txt2img):
    assert text in source.captions(int(image))

  image_batches = list(split.image_batches())
  assert [b["valid"].tolist() for b in image_batches][-1] == [True, True, False, False, False]
  images = np.concatenate([b["image"][b["valid"]] for b in image_batches])
  for b in image_batches:
    assert b["image"].shape == (5, 48, 48, 3) and b["image"].dtype == np.float32
  np.testing.assert_allclose(images, np.stack([source[i]["image"] for i in range(12)]) / 127.5 - 1,
                             atol=1e-6)

  split7 = eval_split.make_eval_split(config, batch_size=7)
  text_batches = list(split7.text_batches())
  assert len(text_batches) == 9 and sum(b["valid"].sum() for b in text_batches) == 60
  assert text_batches[-1]["valid"].tolist() == [True] * 4 + [False] * 3
  ids = np.concatenate([b["text_ids"][b["valid"]] for b in text_batches])
  mask = np.concatenate([b["text_mask"][b["valid"]] for b in text_batches])
  for b in text_batches:
    assert b["text_ids"].shape == b["text_mask"].shape == (7, config.input.max_len)
    assert b["text_ids"].dtype == b["text_mask"].dtype == np.int32
  expected_ids, expected_mask = tokenizer_lib.tokenize(tokenizer, split7.captions,
                                                       config.input.max_len)
  np.testing.assert_array_equal(ids, expected_ids)
  np.testing.assert_array_equal(mask, expected_mask)


def test_eval_batch_size_defaults_to_the_eval_config():
  config = _config()
  config.eval.batch_size = 8
  batches = list(eval_split.make_eval_split(config).image_batches())
  assert [b["image"].shape[0] for b in batches] == [8, 8]
  assert [int(b["valid"].sum()) for b in batches] == [8, 4]


def test_eval_view_batches_crop_each_image_with_its_own_seeded_generator():
  config = _config(view_crop_scale=(0.5, 0.9), view_flip_prob=0.5)
  split = eval_split.make_eval_split(config, batch_size=5)
  source = synthetic.SyntheticCaptions(12, "eval", config.seed, 48)
  batches = list(split.view_batches(seed=3))
  assert [b["valid"].tolist() for b in batches] == [[True] * 5] * 2 + [[True] * 2 + [False] * 3]
  for b in batches:
    assert b["image"].shape == (5, 48, 48, 3) and b["image"].dtype == np.float32
  views = np.concatenate([b["image"][b["valid"]] for b in batches])
  expected = [transforms.random_resized_crop(source[i]["image"], np.random.default_rng((3, i)),
                                             48, scale=(0.5, 0.9), flip_prob=0.5)
              for i in range(12)]
  np.testing.assert_allclose(views, np.stack(expected) / 127.5 - 1, atol=1e-6)
  again = np.concatenate([b["image"][b["valid"]] for b in split.view_batches(seed=3)])
  np.testing.assert_array_equal(again, views)
  other = np.concatenate([b["image"][b["valid"]] for b in split.view_batches(seed=4)])
  assert all(not np.array_equal(a, b) for a, b in zip(other, views))


def test_eval_views_of_the_whole_area_without_flip_are_the_images():
  split = eval_split.make_eval_split(_config(view_crop_scale=(1.0, 1.0)), batch_size=5)
  for view, image in zip(split.view_batches(seed=0), split.image_batches(), strict=True):
    np.testing.assert_array_equal(view["image"], image["image"])
    np.testing.assert_array_equal(view["valid"], image["valid"])


# ----------------------------------------------------------------------------- caption noise


def test_caption_noise_pairs_replace_a_seeded_fraction_with_other_images_captions():
  pairs = np.stack([np.repeat(np.arange(20), 5), np.tile(np.arange(5), 20)], axis=1)
  source_pair = pipeline.caption_noise_pairs(pairs, 0.2, seed=3)
  replaced = np.flatnonzero(source_pair != np.arange(100))
  assert len(replaced) == 20
  assert (pairs[source_pair[replaced], 0] != pairs[replaced, 0]).all()
  np.testing.assert_array_equal(source_pair, pipeline.caption_noise_pairs(pairs, 0.2, seed=3))
  assert not np.array_equal(source_pair, pipeline.caption_noise_pairs(pairs, 0.2, seed=4))
  np.testing.assert_array_equal(pipeline.caption_noise_pairs(pairs, 0.0, 3), np.arange(100))
  with pytest.raises(ValueError, match="counts its captions"):
    pipeline.caption_noise_pairs(np.stack([np.arange(4), np.full(4, -1)], axis=1), 0.5, 0)


def test_caption_noise_batches_carry_the_recorded_replacements(caption_ids):
  """Every pair of an epoch is its image with its own caption, or, exactly for the pairs that
  caption_noise_record lists (and the batch flags), with the recorded caption of another image."""
  config = _config(caption_noise=0.25, prefetch=0)
  record = {r["pair"]: r for r in pipeline.caption_noise_record(config)}
  assert len(record) == round(0.25 * EXAMPLES)
  tokenizer = tokenizer_lib.load_tokenizer()
  seen_replaced = 0
  for batch in _take(pipeline.make_train_iterator(config), EXAMPLES // BATCH):
    for row, image in enumerate(batch["image_id"].tolist()):
      ids = tuple(batch["text_ids"][row])
      if batch["caption_replaced"][row]:
        seen_replaced += 1
        matches = [r for r in record.values() if r["image_index"] == image and tuple(
            tokenizer_lib.tokenize(tokenizer, [r["caption"]], config.input.max_len)[0][0]) == ids]
        assert matches and (image, ids) not in caption_ids
      else:
        assert (image, ids) in caption_ids
  assert seen_replaced == len(record)
  for r in record.values():
    assert r["caption"] != r["original"] and r["caption_from_pair"] // 5 != r["image_index"]


def test_caption_noise_is_refused_with_several_captions_per_image():
  config = _config(caption_noise=0.2, captions_per_image=5)
  config.loss.update(itc=0.0, kl_align=0.0, mlm=0.0, cookie_cm=1.0)
  config.amf.enabled = False
  with pytest.raises(ValueError, match=r"config.input.caption_noise=0.2 replaces the caption of "
                                       r"single pairs"):
    config_validation.validate(config)
