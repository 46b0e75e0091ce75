"""grain input streams: training pairs and VQ-tokenizer images (design §6, §4.3).

The sources are chosen in data/registry.py, images augmented by data/transforms.py, grouped
batches ordered by data/grouped.py; the eval split is data/eval_split.py.

Training stream, per process:

  (image, caption) pairs of the source -> global shuffle, reseeded every epoch -> repeat forever
  -> read + decode + augment the image, tokenise and mask the caption (grain `random_map`, seeded
  by config.seed and the position in the global stream, i.e. by example and epoch) -> every
  process_count-th example, from process_index -> threads read ahead -> bad examples skipped and
  counted -> batch of batch_size // process_count -> worker processes.

With `input.cache_decoded` every training image is read, decoded and downscaled once, before the
stream starts (`train_source`), and an example only crops and flips it from memory; the crops
drawn, and every other field, are those of the uncached stream, the pixels equal up to the
resampling of the downscale.

Each process computes only its own examples, the stream does not depend on the number of workers
or threads, and the iterator's get_state() / set_state() resume it exactly. The data knows nothing
of models: MVM targets are computed in the step (design §8.1); here only `mvm_mask` is drawn.

Bad input (`config.input.on_bad_example`): an image that cannot be read or decoded, or an empty
caption, raises `transforms.BadExampleError` naming the file. "fail" lets it stop the run; "skip"
drops the example, names the first few in warnings and counts every one in the `skipped` field of
the next batch, which the trainer sums into `data/skipped`.
"""

import dataclasses
from typing import Any

from absl import logging
import grain
import numpy as np

from cots_jax import shapes
from cots_jax.data import grouped
from cots_jax.data import masking
from cots_jax.data import registry
from cots_jax.data import sources
from cots_jax.data import tokenizer as tokenizer_lib
from cots_jax.data import transforms

# Bad examples named in warnings (per iterator or eval split); later ones are only counted.
WARN_FIRST = 5
# A stream that yields nothing but bad examples for this long stops instead of spinning forever.
MAX_BAD_IN_A_ROW = 1000


def visual_input(batch):
  """The batch's `video` when it has one, else its `image`."""
  return batch["video"] if "video" in batch else batch["image"]


def pair_table(source):
  """int32 [P, 2] training pairs (image index, caption index) of `source`, in source order.

  A source that cannot count its captions without reading every record (TFDS) gives one row per
  image with caption index -1: a caption is then drawn at random for every example.
  """
  counts = source.caption_counts()
  if counts is None:
    images = np.arange(len(source))
    return np.stack([images, np.full_like(images, -1)], axis=1).astype(np.int32)
  counts = np.asarray(counts, np.int64)
  images = np.repeat(np.arange(len(counts)), counts)
  first_pair_of_image = np.repeat(np.cumsum(counts) - counts, counts)
  return np.stack([images, np.arange(len(images)) - first_pair_of_image], axis=1).astype(np.int32)


def caption_noise_pairs(pairs, fraction, seed):
  """int64 [P]: the pair whose caption each of the `pairs` (int [P, 2] of `pair_table`) reads.

  A pair reads its own caption, except round(fraction * P) of them, drawn with `seed`, that read
  the caption of a pair of another image, also drawn with `seed` (issue 24's noise study: the
  mismatched pairs that AMF should catch). Needs caption indices (not -1) and two images or more.
  """
  size = len(pairs)
  source_pair = np.arange(size, dtype=np.int64)
  count = int(round(fraction * size))
  if count == 0:
    return source_pair
  if (pairs[:, 1] < 0).any() or len(np.unique(pairs[:, 0])) < 2:
    raise ValueError("input.caption_noise needs a source that counts its captions and holds two "
                     "images or more")
  rng = np.random.default_rng([seed, 0xC0FFEE])
  replaced = rng.choice(size, count, replace=False)
  donors = rng.integers(size, size=count)
  same_image = pairs[donors, 0] == pairs[replaced, 0]
  while same_image.any():  # Redraw the donors of the pair's own image (rare: 5 of 30,000).
    donors[same_image] = rng.integers(size, size=int(same_image.sum()))
    same_image = pairs[donors, 0] == pairs[replaced, 0]
  source_pair[replaced] = donors
  return source_pair


def caption_noise_record(config):
  """The training pairs whose caption `input.caption_noise` replaces, as JSON-ready dicts (pair
  and image_index in the source's order, caption_from_pair, caption, original), in pair order;
  [] without noise."""
  if config.input.caption_noise <= 0:
    return []
  source = registry.make_source(config, "train")
  pairs = pair_table(source)
  source_pair = caption_noise_pairs(pairs, config.input.caption_noise, config.seed)
  record = []
  for pair in np.flatnonzero(source_pair != np.arange(len(pairs))):
    (image, caption), (donor_image, donor_caption) = pairs[pair], pairs[source_pair[pair]]
    record.append({"pair": int(pair), "image_index": int(image),
                   "caption_from_pair": int(source_pair[pair]),
                   "caption": source.captions(int(donor_image))[donor_caption],
                   "original": source.captions(int(image))[caption]})
  return record


def _pick_caption(item, caption_index, rng):
  """Caption `caption_index` of a source item (-1: one drawn with `rng`); BadExampleError when
  the item has no captions or the caption is blank."""
  captions = item["captions"]
  if not captions:
    raise transforms.BadExampleError(item["name"], "no captions")
  if caption_index < 0:
    caption_index = int(rng.integers(len(captions)))
  if not captions[caption_index].strip():
    raise transforms.BadExampleError(item["name"], f"caption {caption_index} is empty")
  return captions[caption_index]


# What to do with a bad example (`input.on_bad_example`).
ON_BAD_EXAMPLE = ("skip", "fail")


def bad_example(error, on_bad_example):
  """The marker of a skipped example, or `error` raised again when the config says fail."""
  if on_bad_example == "fail":
    raise error
  return {"bad_example": str(error)}


@dataclasses.dataclass(frozen=True)
class _MakePair:
  """(example index, rng) -> one training pair with its masks (design §4.3 names and shapes),
  plus `image_view` when `view_transform` is set, or a bad-example marker."""
  source: Any
  pairs: np.ndarray
  image_transform: transforms.ImageTransform
  view_transform: transforms.ImageTransform | None
  num_frames: int  # > 0: the source holds clips, and the pair `video` [T, H, W, 3]
  tokenizer: Any
  special_ids: tuple[int, ...]
  max_len: int
  mlm_prob: float
  max_predictions: int
  patch_grid: tuple[int, int]
  num_masked_patches: int
  mvm_mode: str
  mvm_min_block: int
  on_bad_example: str
  # The fields some part of the step reads (`fields_read`): what nothing reads is not computed.
  with_tokens: bool = True
  with_mlm: bool = True
  with_mvm: bool = True
  # A cached locked tower's pooled outputs (cots_jax/features.py): float32 [images, Di] (NaN rows:
  # did not decode) and [pairs, Dt]; the pair carries its row instead of needing the tower.
  image_features: np.ndarray | None = None
  text_features: np.ndarray | None = None
  # input.caption_noise: int64 [pairs], the pair whose caption each pair reads
  # (`caption_noise_pairs`); the pair then carries `caption_replaced`. None: no noise.
  caption_source: np.ndarray | None = None

  def _visual(self, item, image_index, rng):
    """The pair's visual fields, and the decoded pixels (None without) for a second view."""
    if self.image_features is not None:
      row = self.image_features[image_index]
      if np.isnan(row[0]):
        raise transforms.BadExampleError(item["name"], "it did not decode when the image "
                                         "features were cached")
      return {"image_features": row}, None
    if self.num_frames:
      return {"video": transforms.to_unit_range(self.image_transform.clip_pixels(
          item["video"], item["name"], self.num_frames, rng))}, None
    pixels = transforms.decode_image(item["image"], item["name"])
    full_size = item.get("full_size")  # set by the decoded-once cache
    return {"image": self.image_transform(pixels, item["name"], rng, full_size)}, pixels

  def _add_mvm_mask(self, pair, rng):
    """Adds `mvm_mask` [N] when MVM reads it."""
    if self.with_mvm:
      pair["mvm_mask"] = masking.mvm_mask(rng, *self.patch_grid, self.num_masked_patches,
                                          self.mvm_mode, self.mvm_min_block)

  def _view(self, pair, item, pixels, rng):
    """Adds `image_view`, drawn last, so turning the view on leaves every other field of the
    pair as it was."""
    if self.view_transform is not None:
      pair["image_view"] = self.view_transform(pixels, item["name"], rng, item.get("full_size"))
    return pair

  def __call__(self, example, rng):
    caption_pair = int(example if self.caption_source is None else self.caption_source[example])
    image_index = int(self.pairs[int(example), 0])
    caption_image, caption_index = self.pairs[caption_pair]
    try:
      item = self.source[image_index]
      if caption_image != image_index:  # input.caption_noise: another image's caption
        item = dict(item, captions=self.source.captions(int(caption_image)))
      caption = _pick_caption(item, caption_index, rng)
      visual, pixels = self._visual(item, image_index, rng)
    except transforms.BadExampleError as error:
      return bad_example(error, self.on_bad_example)
    pair = self._caption_fields(visual, item, caption, rng)
    if self.text_features is not None:
      pair["text_features"] = self.text_features[caption_pair]
    if self.caption_source is not None:
      pair["caption_replaced"] = np.bool_(caption_pair != int(example))
    return self._view(pair, item, pixels, rng)

  def _caption_fields(self, visual, item, caption, rng):
    """The pair of the `visual` fields and `caption`: image_id, the caption's tokens and MLM
    fields, `mvm_mask` (each when read: `fields_read`)."""
    pair = {**visual, "image_id": np.int32(item["image_id"])}
    if self.with_tokens:
      ids, mask = tokenizer_lib.tokenize(self.tokenizer, [caption], self.max_len)
      pair.update(text_ids=ids[0], text_mask=mask[0])
      if self.with_mlm:
        pair.update(masking.mlm_mask(ids[0], rng, self.mlm_prob, self.max_predictions,
                                     len(self.tokenizer), self.special_ids,
                                     self.tokenizer.mask_token_id))
    self._add_mvm_mask(pair, rng)
    return pair


@dataclasses.dataclass(frozen=True)
class _MakeStreamedPair(_MakePair):
  """(item of a streamed source or its bad-example marker, rng) -> one training pair as
  `_MakePair`'s, its caption drawn among the item's; `source` and `pairs` are None."""

  def __call__(self, item, rng):
    if "bad_example" in item:
      return item
    try:
      caption = _pick_caption(item, -1, rng)
      visual, pixels = self._visual(item, None, rng)
    except transforms.BadExampleError as error:
      return bad_example(error, self.on_bad_example)
    return self._view(self._caption_fields(visual, item, caption, rng), item, pixels, rng)


@dataclasses.dataclass(frozen=True)
class _MakeImageWithCaptions(_MakePair):
  """(image index, rng) -> one training image with `captions_per_image` of its captions (all of
  them, in order, when it has exactly that many; else drawn without replacement, or with it when
  it has fewer): text_ids, text_mask [K, L] (text_features [K, Dt]); no MLM fields."""
  captions_per_image: int = 1
  first_pair_of_image: np.ndarray | None = None

  def __call__(self, example, rng):
    image_index = int(example)
    try:
      item = self.source[image_index]
      captions = item["captions"]
      if not captions:
        raise transforms.BadExampleError(item["name"], "no captions")
      count, wanted = len(captions), self.captions_per_image
      chosen = (np.arange(count) if count == wanted
                else rng.choice(count, wanted, replace=count < wanted))
      texts = [_pick_caption(item, int(j), rng) for j in chosen]
      visual, pixels = self._visual(item, image_index, rng)
    except transforms.BadExampleError as error:
      return bad_example(error, self.on_bad_example)
    pair = {**visual, "image_id": np.int32(item["image_id"])}
    if self.with_tokens:
      ids, mask = tokenizer_lib.tokenize(self.tokenizer, texts, self.max_len)
      pair.update(text_ids=ids, text_mask=mask)
    self._add_mvm_mask(pair, rng)
    if self.text_features is not None:
      pair["text_features"] = self.text_features[self.first_pair_of_image[image_index] + chosen]
    return self._view(pair, item, pixels, rng)


@dataclasses.dataclass(frozen=True)
class _MakeImage:
  """(image index, rng) -> {"image": float32 [H, W, 3]} or a bad-example marker; with `source`
  None, (item of a streamed source or its marker, rng) -> the same."""
  source: Any
  image_transform: transforms.ImageTransform
  on_bad_example: str

  def __call__(self, example, rng):
    try:
      item = example if self.source is None else self.source[int(example)]
      if "bad_example" in item:
        return item
      return {"image": self.image_transform(item["image"], item["name"], rng,
                                            item.get("full_size"))}
    except transforms.BadExampleError as error:
      return bad_example(error, self.on_bad_example)


class BadExampleLog:
  """Names the first `WARN_FIRST` bad examples in warnings and counts all of them."""

  def __init__(self, where):
    self.where = where
    self.count = 0

  def add(self, reason):
    self.count += 1
    if self.count <= WARN_FIRST:
      more = ("; further bad examples are only counted (data/skipped)"
              if self.count == WARN_FIRST else "")
      logging.warning("%s: skipping bad example #%d: %s%s", self.where, self.count, reason, more)


class _SkipBadIterator(grain.DatasetIterator):
  """Yields the good examples of its parent, each with `skipped`: int32, the number of bad
  examples dropped just before it. Stateless beyond the parent, so checkpoints stay exact."""

  def __init__(self, parent):
    super().__init__(parent)
    self._log = BadExampleLog("input pipeline")

  def __next__(self):
    skipped = 0
    while True:
      example = next(self._parent)
      if "bad_example" not in example:
        return {**example, "skipped": np.int32(skipped)}
      skipped += 1
      self._log.add(example["bad_example"])
      if skipped >= MAX_BAD_IN_A_ROW:
        raise RuntimeError(f"{skipped} bad examples in a row, the last: "
                           f"{example['bad_example']}; is the data readable at all?")

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _SkipBadExamples(grain.IterDataset):
  """IterDataset of `_SkipBadIterator`."""

  def __iter__(self):
    return _SkipBadIterator(self._parent.__iter__())


def _batched(examples, batch_size, input_config):
  """MapDataset (or streamed IterDataset) of examples (or bad markers) -> IterDataset of
  batches: `prefetch` threads read a MapDataset ahead, bad examples are skipped, then
  `num_workers` worker processes (0: this process)."""
  prefetch = input_config.prefetch
  if isinstance(examples, grain.MapDataset):
    examples = examples.to_iter_dataset(
        grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch * batch_size))
  batches = _SkipBadExamples(examples).batch(batch_size, drop_remainder=True)
  if input_config.num_workers:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=input_config.num_workers, per_worker_buffer_size=max(1, prefetch)))
  return batches


def train_source(config):
  """The training source of `config`; with input.cache_decoded, its images decoded once into
  memory (`sources.DecodedImages`) here, before any worker process starts, at the shorter side
  from which every training transform (the crop, and the second view's) only downscales."""
  source = registry.make_source(config, "train")
  if not config.input.cache_decoded:
    return source
  image_transforms = [transforms.ImageTransform.for_training(config)]
  if config.input.second_view:
    image_transforms.append(transforms.ImageTransform.for_views(config))
  cached = sources.DecodedImages(source, max(t.min_input_side() for t in image_transforms))
  if config.input.num_workers:
    # grain's workers are spawned processes that each unpickle their own copy of the dataset.
    logging.info("each of input.num_workers=%d workers holds a copy of the %.1f MB of images",
                 config.input.num_workers, cached.nbytes / 2**20)
  return cached


def fields_read(config, features):
  """(tokens, mlm, mvm): whether some part of the step reads the captions' `text_ids` /
  `text_mask`, the MLM fields and `mvm_mask`. The tokens are read by a text tower that runs (not
  cached in `features`), by MLM and by COOKIE's second caption pass; the rest by their term."""
  loss = config.loss
  mlm = loss.mlm > 0
  second_caption_pass = loss.cookie_tt > 0 and loss.cookie_intra_mode == "views"
  tokens = "text" not in (features or {}) or mlm or second_caption_pass
  return tokens, mlm, loss.mvm > 0


def _process_seed(seed, process_index):
  """The random_map seed of a stream that each process maps on its own: seeded alike, the k-th
  example of every process would get the same random draws."""
  return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])


def make_train_dataset(config, *, process_index=0, process_count=1, features=None):
  """The endless training stream of this process, a grain IterDataset of batches.

  A batch holds config.input.batch_size // process_count pairs: image float32 [B, H, W, 3] in
  [-1, 1]; text_ids, text_mask, mlm_ids int32 [B, L]; image_id int32 [B]; mlm_positions,
  mlm_targets int32 [B, P]; mlm_weights float32 [B, P]; mvm_mask bool [B, N]; skipped int32 [B]
  (bad examples dropped before each pair) with L = input.max_len, P = ceil(input.mlm_prob * L),
  N = patches per image. A streamed source (`registry.is_streamed`: webdataset tars) gives
  this process's items from its own shards, in blocks shuffled by input.data.shuffle_buffer
  (`webdataset.WebDatasetShards`), each with one of its captions drawn at random. A field that
  no part of the step reads (`fields_read`: the tokens of a
  cached text tower, MLM's fields without MLM, `mvm_mask` without MVM) is left out and costs
  nothing. A video source (`is_video`) gives `video` float32 [B, T, H, W, 3] (T =
  model.num_frames, sampled by `transforms.ImageTransform.clip_pixels`) instead of `image`. With
  input.group_batches, every batch holds whole groups of the source (`batch_group_size`
  consecutive items, e.g. synthetic clips that differ only in direction), one caption each, as
  in-batch hard negatives of each other (`group_pair_blocks`). With
  input.second_view, also image_view float32 [B, H, W, 3] in
  [-1, 1]: a second view of the same decoded image, random-resized crop (area fraction in
  input.view_crop_scale) + flip (input.view_flip_prob), drawn with the pair's own rng after
  everything else, so it is as deterministic and resumable as the rest and leaves the other
  fields unchanged. `features` ({"image": float32 [images, Di], "text": [pairs, Dt]}, the tables
  of cots_jax/features.py) adds each pair's rows as `image_features` (in place of `image`) and
  `text_features`. With input.captions_per_image = K > 1 an example is a training image with K
  of its captions (every image once an epoch): text_ids, text_mask [B, K, L], text_features
  [B, K, Dt], no MLM fields. With input.caption_noise > 0, also caption_replaced bool [B]: the
  pair reads another image's caption (`caption_noise_pairs`).
  """
  batch_size = config.input.batch_size
  if not 0 <= process_index < process_count or batch_size % process_count:
    raise ValueError(f"input.batch_size={batch_size} must split evenly over process_count="
                     f"{process_count} (process_index={process_index})")
  tokenizer = tokenizer_lib.load_tokenizer(config.input.tokenizer)
  inp = config.input
  per_image = inp.captions_per_image
  with_tokens, with_mlm, with_mvm = fields_read(config, features)
  fields = dict(
      image_transform=transforms.ImageTransform.for_training(config),
      view_transform=transforms.ImageTransform.for_views(config) if inp.second_view else None,
      num_frames=config.model.num_frames if registry.is_video(config) else 0,
      tokenizer=tokenizer, special_ids=tuple(tokenizer.all_special_ids),
      max_len=inp.max_len, mlm_prob=inp.mlm_prob,
      max_predictions=masking.num_mlm_predictions(inp.mlm_prob, inp.max_len),
      patch_grid=shapes.patch_grid(config),
      num_masked_patches=shapes.num_mvm_masked(config),
      mvm_mode=inp.mvm_mask, mvm_min_block=inp.mvm_min_block,
      on_bad_example=inp.on_bad_example, with_tokens=with_tokens, with_mlm=with_mlm,
      with_mvm=with_mvm, **{
          f"{tower}_features": table for tower, table in (features or {}).items()})
  if registry.is_streamed(config):
    items = registry.training_stream(config, process_index, process_count)
    examples = items.random_map(_MakeStreamedPair(source=None, pairs=None, **fields),
                                seed=_process_seed(config.seed, process_index))
    return _batched(examples, batch_size // process_count, inp)
  source = train_source(config)
  pairs = pair_table(source)
  fields.update(source=source, pairs=pairs)
  if per_image > 1:
    make_pair = _MakeImageWithCaptions(
        **fields, captions_per_image=per_image,
        first_pair_of_image=np.searchsorted(pairs[:, 0], np.arange(len(source))))
    num_examples = len(source)
  else:
    caption_source = (caption_noise_pairs(pairs, inp.caption_noise, config.seed)
                      if inp.caption_noise > 0 else None)
    make_pair, num_examples = _MakePair(**fields, caption_source=caption_source), len(pairs)
  if inp.group_batches:
    rows = grouped.grouped_rows(source, pairs, batch_size // process_count, config.seed,
                         process_index, process_count)
    examples = rows.random_map(make_pair, seed=_process_seed(config.seed, process_index))
  else:
    examples = (grain.MapDataset.range(num_examples)
                .shuffle(seed=config.seed)
                .repeat()
                .random_map(make_pair, seed=config.seed)[process_index::process_count])
  return _batched(examples, batch_size // process_count, inp)


def make_train_iterator(config, *, process_index=0, process_count=1, features=None):
  """Iterator over make_train_dataset(...); get_state() / set_state() checkpoint it."""
  return iter(make_train_dataset(config, process_index=process_index,
                                 process_count=process_count, features=features))


def make_image_iterator(config, batch_size, seed):
  """Endless iterator of {"image": float32 [batch_size, H, W, 3] in [-1, 1], "skipped": int32
  [batch_size]} batches over the training images with the training augmentation, shuffled by
  `seed` anew every epoch (trains the VQ tokenizer); a streamed source's images come from this
  process's training stream."""
  image_transform = transforms.ImageTransform.for_training(config)
  if registry.is_streamed(config):
    make_image = _MakeImage(None, image_transform, config.input.on_bad_example)
    images = registry.training_stream(config, 0, 1)  # every process, as the source's images
    return iter(_batched(images.random_map(make_image, seed=seed), batch_size, config.input))
  source = train_source(config)
  make_image = _MakeImage(source, image_transform, config.input.on_bad_example)
  images = (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
            .random_map(make_image, seed=seed))
  return iter(_batched(images, batch_size, config.input))
