"""grain input pipelines: training pairs, VQ-tokenizer images, the eval split (design §6, §4.3).

Training stream, per process:

  (image, caption) pairs of the source -> global shuffle, reseeded every epoch -> repeat forever
  -> read + decode + augment the image, tokenise and mask the caption (grain `random_map`, seeded
  by config.seed and the position in the global stream, i.e. by example and epoch) -> every
  process_count-th example, from process_index -> threads read ahead -> bad examples skipped and
  counted -> batch of batch_size // process_count -> worker processes.

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
from cots_jax.data import masking
from cots_jax.data import sources
from cots_jax.data import synthetic
from cots_jax.data import synthetic_video
from cots_jax.data import tokenizer as tokenizer_lib
from cots_jax.data import transforms
from cots_jax.data import video

# Bad examples named in warnings (per iterator or eval split); later ones are only counted.
WARN_FIRST = 5
# A stream that yields nothing but bad examples for this long stops instead of spinning forever.
MAX_BAD_IN_A_ROW = 1000


# Sources whose items hold a clip (`video`) instead of an image (cots_jax/data/video.py).
VIDEO_SOURCES = ("synthetic_video", "msrvtt", "frames_folder")


def is_video(config):
  """True when config.input.data names a video source: batches then carry `video`
  [B, T, H, W, 3] with T = config.model.num_frames instead of `image`."""
  return config.input.data.name in VIDEO_SOURCES


def visual_input(batch):
  """The batch's `video` when it has one, else its `image`."""
  return batch["video"] if "video" in batch else batch["image"]


def make_source(config, split_kind):
  """The source of `split_kind` ("train" | "eval") named by `config.input.data.name`."""
  data = config.input.data
  train = split_kind == "train"
  count = data.num_train_images if train else data.num_eval_images
  if data.name == "synthetic":
    return synthetic.SyntheticCaptions(count, split_kind, config.seed,
                                       config.model.image.image_size)
  if data.name == "synthetic_video":
    return synthetic_video.SyntheticVideos(count, split_kind, config.seed,
                                           config.model.image.image_size,
                                           data.clip_frames or config.model.num_frames)
  if data.name == "msrvtt":
      return video.MsrVttSource(data.annotations, data.videos_dir, split_kind, data.test_list,
                              data.video_extension)
  if data.name == "frames_folder":
    return video.FramesFolderSource(data.annotations, data.videos_dir, split_kind,
                                    data.test_list)
  return sources.make_source(data, split_kind)


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


def group_pair_blocks(pairs, group_size):
  """`pair_table` rows -> int64 [P / group_size, group_size] blocks for `input.group_batches`:
  the source's items form groups of `group_size` consecutive indices, and block b of a group
  holds the b-th pair (row index) of each of its items, so a block is one caption of every
  item of the group.

  Raises:
    ValueError when the items do not split into whole groups, or the items of a group have
    different caption counts.
  """
  counts = np.bincount(pairs[:, 0])
  if len(counts) % group_size:
    raise ValueError(f"input.group_batches: {len(counts)} source items do not split into groups "
                     f"of {group_size}")
  per_group = counts.reshape(-1, group_size)
  uneven = np.flatnonzero((per_group != per_group[:, :1]).any(axis=1))
  if uneven.size:
    raise ValueError(f"input.group_batches: the items of group {uneven[0]} have different "
                     f"caption counts {per_group[uneven[0]].tolist()}")
  first_rows = (np.cumsum(counts) - counts).reshape(-1, group_size)
  return np.concatenate([rows[None, :] + np.arange(n)[:, None]
                         for rows, n in zip(first_rows, per_group[:, 0])]).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class _BlockRow:
  """Example k -> the pair-table row in slot k % G of block `order[k // G]`."""
  blocks: np.ndarray  # [num_blocks, G]
  order: Any  # MapDataset of block indices, reshuffled every epoch

  def __call__(self, example):
    group_size = self.blocks.shape[1]
    return int(self.blocks[self.order[example // group_size], example % group_size])


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """Encoded bytes or a decoded array -> float32 [size, size, 3] in [-1, 1].

  augment "crop_flip": random-resized crop (area fraction in `crop_scale`) + horizontal flip with
  probability `flip_prob` (training on photos); "none": resize the shorter side + centre crop
  (eval, and the synthetic data whose captions name positions). An image already of the target
  size is not resampled.
  """
  size: int
  augment: str = "none"
  crop_scale: tuple[float, float] = (0.5, 1.0)
  flip_prob: float = 0.5

  @classmethod
  def for_training(cls, config):
    inp = config.input
    return cls(config.model.image.image_size, inp.augment, tuple(inp.crop_scale), inp.flip_prob)

  @classmethod
  def for_views(cls, config):
    """The second-view augmentation (input.view_crop_scale, input.view_flip_prob): the train
    pairs' `image_view` and the eval split's `view_batches`."""
    inp = config.input
    return cls(config.model.image.image_size, "crop_flip", tuple(inp.view_crop_scale),
               inp.view_flip_prob)

  def pixels(self, image, name, rng=None):
    """-> uint8 [size, size, 3]; raises BadExampleError(name, reason) when `image` does not
    decode. `rng` (np.random.Generator) is needed by "crop_flip" only."""
    pixels = transforms.decode_image(image, name)
    if self.augment == "crop_flip":
      return transforms.random_resized_crop(pixels, rng, self.size, scale=self.crop_scale,
                                            flip_prob=self.flip_prob)
    if pixels.shape[:2] != (self.size, self.size):
      return transforms.resize_center_crop(pixels, self.size)
    return pixels

  def __call__(self, image, name, rng=None):
    """-> float32 [size, size, 3] in [-1, 1]; see `pixels`."""
    return transforms.to_unit_range(self.pixels(image, name, rng))

  def clip_pixels(self, clip, name, num_frames, rng=None):
    """`num_frames` frames of a clip (video.py's clip contract) -> uint8 [T, size, size, 3].

    The frames are sampled by `video.sample_frame_indices` (a random frame of each segment with
    `rng`, the segment centres without) and all get the same augmentation (one crop and flip
    draw for the whole clip). Raises BadExampleError(name, reason) for an unreadable clip.
    """
    frames = clip.read(video.sample_frame_indices(clip.num_frames, num_frames, rng))
    seed = None if rng is None else int(rng.integers(2**63))
    return np.stack([self.pixels(frame, name, None if seed is None else np.random.default_rng(seed))
                     for frame in frames])


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


def _bad(error, on_bad_example):
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
  image_transform: ImageTransform
  view_transform: ImageTransform | None
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

  def __call__(self, example, rng):
    image_index, caption_index = self.pairs[int(example)]
    try:
      item = self.source[int(image_index)]
      caption = _pick_caption(item, caption_index, rng)
      if self.num_frames:
        visual = {"video": transforms.to_unit_range(self.image_transform.clip_pixels(
            item["video"], item["name"], self.num_frames, rng))}
      else:
        pixels = transforms.decode_image(item["image"], item["name"])
        visual = {"image": self.image_transform(pixels, item["name"], rng)}
    except transforms.BadExampleError as error:
      return _bad(error, self.on_bad_example)
    ids, mask = tokenizer_lib.tokenize(self.tokenizer, [caption], self.max_len)
    mlm = masking.mlm_mask(ids[0], rng, self.mlm_prob, self.max_predictions,
                           len(self.tokenizer), self.special_ids, self.tokenizer.mask_token_id)
    mvm = masking.mvm_mask(rng, *self.patch_grid, self.num_masked_patches, self.mvm_mode,
                           self.mvm_min_block)
    pair = {**visual, "text_ids": ids[0], "text_mask": mask[0],
            "image_id": np.int32(item["image_id"]), **mlm, "mvm_mask": mvm}
    if self.view_transform is not None:
      # Drawn last, so turning the view on leaves every other field of the pair as it was.
      pair["image_view"] = self.view_transform(pixels, item["name"], rng)
    return pair


@dataclasses.dataclass(frozen=True)
class _MakeImage:
  """(image index, rng) -> {"image": float32 [H, W, 3]} or a bad-example marker."""
  source: Any
  image_transform: ImageTransform
  on_bad_example: str

  def __call__(self, index, rng):
    try:
      item = self.source[int(index)]
      return {"image": self.image_transform(item["image"], item["name"], rng)}
    except transforms.BadExampleError as error:
      return _bad(error, self.on_bad_example)


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
  """MapDataset of examples (or bad markers) -> IterDataset of batches: `prefetch` threads read
  ahead, bad examples are skipped, then `num_workers` worker processes (0: this process)."""
  prefetch = input_config.prefetch
  examples = examples.to_iter_dataset(
      grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch * batch_size))
  batches = _SkipBadExamples(examples).batch(batch_size, drop_remainder=True)
  if input_config.num_workers:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=input_config.num_workers, per_worker_buffer_size=max(1, prefetch)))
  return batches


def make_train_dataset(config, *, process_index=0, process_count=1):
  """The endless training stream of this process, a grain IterDataset of batches.

  A batch holds config.input.batch_size // process_count pairs: image float32 [B, H, W, 3] in
  [-1, 1]; text_ids, text_mask, mlm_ids int32 [B, L]; image_id int32 [B]; mlm_positions,
  mlm_targets int32 [B, P]; mlm_weights float32 [B, P]; mvm_mask bool [B, N]; skipped int32 [B]
  (bad examples dropped before each pair) with L = input.max_len, P = ceil(input.mlm_prob * L),
  N = patches per image. A video source (`is_video`) gives `video` float32 [B, T, H, W, 3] (T =
  model.num_frames, sampled by `ImageTransform.clip_pixels`) instead of `image`. With
  input.group_batches, every batch holds whole groups of the source (`batch_group_size`
  consecutive items, e.g. synthetic clips that differ only in direction), one caption each, as
  in-batch hard negatives of each other (`group_pair_blocks`). With
  input.second_view, also image_view float32 [B, H, W, 3] in
  [-1, 1]: a second view of the same decoded image, random-resized crop (area fraction in
  input.view_crop_scale) + flip (input.view_flip_prob), drawn with the pair's own rng after
  everything else, so it is as deterministic and resumable as the rest and leaves the other
  fields unchanged.
  """
  batch_size = config.input.batch_size
  if not 0 <= process_index < process_count or batch_size % process_count:
    raise ValueError(f"input.batch_size={batch_size} must split evenly over process_count="
                     f"{process_count} (process_index={process_index})")
  source = make_source(config, "train")
  pairs = pair_table(source)
  tokenizer = tokenizer_lib.load_tokenizer(config.input.tokenizer)
  inp = config.input
  make_pair = _MakePair(
      source=source, pairs=pairs, image_transform=ImageTransform.for_training(config),
      view_transform=ImageTransform.for_views(config) if inp.second_view else None,
      num_frames=config.model.num_frames if is_video(config) else 0,
      tokenizer=tokenizer, special_ids=tuple(tokenizer.all_special_ids),
      max_len=inp.max_len, mlm_prob=inp.mlm_prob,
      max_predictions=masking.num_mlm_predictions(inp.mlm_prob, inp.max_len),
      patch_grid=shapes.patch_grid(config),
      num_masked_patches=shapes.num_mvm_masked(config),
      mvm_mode=inp.mvm_mask, mvm_min_block=inp.mvm_min_block,
      on_bad_example=inp.on_bad_example)
  if inp.group_batches:
    rows = _grouped_rows(source, pairs, batch_size // process_count, config.seed,
                         process_index, process_count)
    # Each process maps only its own rows: seeded alike, the k-th pair of every process would
    # get the same random draws.
    process_seed = int(np.random.SeedSequence([config.seed, process_index]).generate_state(1)[0])
    examples = rows.random_map(make_pair, seed=process_seed)
  else:
    examples = (grain.MapDataset.range(len(pairs))
                .shuffle(seed=config.seed)
                .repeat()
                .random_map(make_pair, seed=config.seed)[process_index::process_count])
  return _batched(examples, batch_size // process_count, inp)


def _grouped_rows(source, pairs, process_batch, seed, process_index, process_count):
  """The endless pair-table rows of this process for `input.group_batches`: blocks
  (`group_pair_blocks`) shuffled anew every epoch, dealt to the processes block by block, so
  every batch holds whole groups."""
  group_size = getattr(source, "batch_group_size", None)
  if group_size is None:
    raise ValueError(f"input.group_batches: the {type(source).__name__} source has no groups "
                     "(only synthetic_video has: clips that differ only in direction)")
  if process_batch % group_size:
    raise ValueError(f"input.group_batches: a batch of {process_batch} pairs per process does "
                     f"not hold whole groups of {group_size}")
  blocks = group_pair_blocks(pairs, group_size)
  order = (grain.MapDataset.range(len(blocks)).shuffle(seed=seed).repeat()
           [process_index::process_count])
  return grain.MapDataset.range(len(order)).map(_BlockRow(blocks, order))


def make_train_iterator(config, *, process_index=0, process_count=1):
  """Iterator over make_train_dataset(...); get_state() / set_state() checkpoint it."""
  return iter(make_train_dataset(config, process_index=process_index,
                                 process_count=process_count))


def make_image_iterator(config, batch_size, seed):
  """Endless iterator of {"image": float32 [batch_size, H, W, 3] in [-1, 1], "skipped": int32
  [batch_size]} batches over the training images with the training augmentation, shuffled by
  `seed` anew every epoch (trains the VQ tokenizer)."""
  source = make_source(config, "train")
  make_image = _MakeImage(source, ImageTransform.for_training(config),
                          config.input.on_bad_example)
  images = (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
            .random_map(make_image, seed=seed))
  return iter(_batched(images, batch_size, config.input))


def _padded_batches(num_items, batch_size, get_batch):
  """Yields get_batch(indices) plus "valid" bool [batch_size] over 0..num_items-1; the last
  batch repeats the last item up to batch_size (static shapes) with valid=False."""
  for start in range(0, num_items, batch_size):
    indices = np.arange(start, start + batch_size)
    batch = get_batch(np.minimum(indices, num_items - 1))
    batch["valid"] = indices < num_items
    yield batch


class EvalSplit:
  """The eval images and their captions, for retrieval (design §4.1).

  The images are decoded once, resized + centre-cropped, and kept as uint8 (1000 images at
  224 px: 150 MB). An image that does not decode and a blank caption are left out of the
  gallery (or stop the run when `on_bad_example` is "fail"); `num_skipped` counts them.
  `view_transform` (an ImageTransform) makes the augmented views of `view_batches` from those
  kept images. With `num_frames` > 0 the source holds clips: each keeps its `num_frames` segment-
  centre frames, and the batches carry `video` [b, T, H, W, 3] instead of `image`.

  Attributes:
    num_images, num_texts: gallery sizes.
    captions: list of num_texts str, in image order.
    txt2img: int32 [num_texts], the image index of each text.
    num_skipped: bad images and blank captions left out.
  """

  def __init__(self, source, tokenizer, max_len, batch_size, image_size,
               on_bad_example="skip", *, view_transform, num_frames=0):
    self._batch_size = batch_size
    self._view_transform = view_transform
    self._visual_key = "video" if num_frames else "image"
    transform = ImageTransform(image_size)
    log = BadExampleLog("eval split")
    images, self.captions, txt2img = [], [], []
    for index in range(len(source)):
      try:
        item = source[index]
        images.append(transform.clip_pixels(item["video"], item["name"], num_frames)
                      if num_frames else transform.pixels(item["image"], item["name"]))
      except transforms.BadExampleError as error:
        log.add(_bad(error, on_bad_example)["bad_example"])
        continue
      for number, caption in enumerate(item["captions"]):
        if caption.strip():
          self.captions.append(caption)
          txt2img.append(len(images) - 1)
        else:
          error = transforms.BadExampleError(item["name"], f"caption {number} is empty")
          log.add(_bad(error, on_bad_example)["bad_example"])
    if not images:
      raise ValueError(f"the eval split has no readable image ({log.count} bad)")
    self._images = np.stack(images)
    self.num_images = len(images)
    self.num_texts = len(self.captions)
    self.num_skipped = log.count
    self.txt2img = np.asarray(txt2img, np.int32)
    self._text_ids, self._text_mask = tokenizer_lib.tokenize(tokenizer, self.captions, max_len)

  def image_batches(self):
    """Yields {"image": float32 [b, H, W, 3] in [-1, 1] (clips: "video" [b, T, H, W, 3]),
    "valid": bool [b]}."""
    return _padded_batches(self.num_images, self._batch_size,
                           lambda i: {self._visual_key: transforms.to_unit_range(self._images[i])})

  def view_batches(self, seed):
    """Yields {"image": float32 [b, H, W, 3] in [-1, 1], "valid": bool [b]}: an augmented view
    of every image, in the order of `image_batches`. Image i is drawn with the generator
    np.random.default_rng((seed, i)), so a seed fixes the views and two seeds differ. Images
    only: ValueError for clips."""
    if self._visual_key != "image":
      raise ValueError("view_batches: the eval split holds video clips, not images")

    def views(indices):
      return {"image": np.stack([
          self._view_transform(self._images[i], f"eval image {i}",
                               np.random.default_rng((seed, i)))
          for i in indices.tolist()])}
    return _padded_batches(self.num_images, self._batch_size, views)

  def text_batches(self):
    """Yields {"text_ids": int32 [b, L], "text_mask": int32 [b, L], "valid": bool [b]}."""
    return _padded_batches(
        self.num_texts, self._batch_size,
        lambda i: {"text_ids": self._text_ids[i], "text_mask": self._text_mask[i]})


def make_eval_split(config, batch_size=None):
  """The eval split of config.input.data in batches of `batch_size` (default eval.batch_size),
  its views made by `ImageTransform.for_views(config)`."""
  return EvalSplit(make_source(config, "eval"),
                   tokenizer_lib.load_tokenizer(config.input.tokenizer), config.input.max_len,
                   batch_size or config.eval.batch_size, config.model.image.image_size,
                   config.input.on_bad_example, view_transform=ImageTransform.for_views(config),
                   num_frames=config.model.num_frames if is_video(config) else 0)
