"""grain input pipelines: training pairs, VQ-tokenizer images, the eval split (design §6, §4.3).

Training stream, per process:

  example indices (image * 5 + caption) -> global shuffle, reseeded every epoch -> repeat forever
  -> draw the pair and its masks (grain `random_map`, seeded by config.seed and the position in the
  global stream, i.e. by example and epoch) -> every process_count-th example, from process_index
  -> batch of batch_size // process_count -> threads / worker processes read ahead.

Each process computes only its own examples, the stream does not depend on the number of workers
or threads, and the iterator's get_state() / set_state() resume it exactly. The data knows nothing
of models: MVM targets are computed in the step (design §8.1); here only `mvm_mask` is drawn.
"""

import dataclasses
import functools
from typing import Any

import grain
import numpy as np

from cots_jax.data import masking
from cots_jax.data import synthetic
from cots_jax.data import tokenizer as tokenizer_lib


def _source(config, split):
  """The SyntheticCaptions of `split` ("train" | "eval") named by `config.input.data`."""
  data = config.input.data
  if data.name != "synthetic":
    raise ValueError(f"input.data.name={data.name!r} is not supported; known: 'synthetic'")
  num_images = data.num_train_images if split == "train" else data.num_eval_images
  return synthetic.SyntheticCaptions(num_images, split, config.seed,
                                     config.model.image.image_size)


def _patch_grid(config):
  """(grid_h, grid_w) of ViT patches; the image side must be a multiple of the patch size."""
  image_size, patch_size = config.model.image.image_size, config.model.image.patch_size
  if image_size % patch_size:
    raise ValueError(f"model.image.image_size={image_size} is not a multiple of "
                     f"model.image.patch_size={patch_size}")
  return image_size // patch_size, image_size // patch_size


def _to_unit_range(image):
  """uint8 [..., 3] -> float32 in [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0


def _read_ahead(dataset, input_config):
  """MapDataset of batches -> IterDataset read ahead by `prefetch` threads and `num_workers`
  worker processes (0 workers: in this process; 0 prefetch: synchronous)."""
  prefetch = input_config.prefetch
  batches = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
  if input_config.num_workers:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=input_config.num_workers, per_worker_buffer_size=max(1, prefetch)))
  return batches


@dataclasses.dataclass(frozen=True)
class _MakePair:
  """(example index, rng) -> one training pair with its masks (design §4.3 names and shapes)."""
  source: synthetic.SyntheticCaptions
  tokenizer: Any
  special_ids: tuple[int, ...]
  max_len: int
  mlm_prob: float
  max_predictions: int
  patch_grid: tuple[int, int]
  num_masked_patches: int
  mvm_mode: str
  mvm_min_block: int

  def __call__(self, example, rng):
    image_index, caption_index = divmod(int(example), synthetic.CAPTIONS_PER_IMAGE)
    item = self.source[image_index]
    ids, mask = tokenizer_lib.tokenize(
        self.tokenizer, [item["captions"][caption_index]], self.max_len)
    mlm = masking.mlm_mask(ids[0], rng, self.mlm_prob, self.max_predictions,
                           len(self.tokenizer), self.special_ids, self.tokenizer.mask_token_id)
    mvm = masking.mvm_mask(rng, *self.patch_grid, self.num_masked_patches, self.mvm_mode,
                           self.mvm_min_block)
    return {"image": _to_unit_range(item["image"]), "text_ids": ids[0], "text_mask": mask[0],
            "image_id": np.int32(image_index), **mlm, "mvm_mask": mvm}


def make_train_dataset(config, *, process_index=0, process_count=1):
  """The endless training stream of this process, a grain IterDataset of batches.

  A batch holds config.input.batch_size // process_count pairs: image float32 [B, H, W, 3] in
  [-1, 1]; text_ids, text_mask, mlm_ids int32 [B, L]; image_id int32 [B]; mlm_positions,
  mlm_targets int32 [B, P]; mlm_weights float32 [B, P]; mvm_mask bool [B, N] with
  L = input.max_len, P = ceil(input.mlm_prob * L), N = patches per image.
  """
  batch_size = config.input.batch_size
  if not 0 <= process_index < process_count or batch_size % process_count:
    raise ValueError(f"input.batch_size={batch_size} must split evenly over process_count="
                     f"{process_count} (process_index={process_index})")
  source = _source(config, "train")
  grid_h, grid_w = _patch_grid(config)
  tokenizer = tokenizer_lib.load_tokenizer(config.input.tokenizer)
  inp = config.input
  make_pair = _MakePair(
      source=source, tokenizer=tokenizer, special_ids=tuple(tokenizer.all_special_ids),
      max_len=inp.max_len, mlm_prob=inp.mlm_prob,
      max_predictions=masking.num_mlm_predictions(inp.mlm_prob, inp.max_len),
      patch_grid=(grid_h, grid_w),
      num_masked_patches=masking.num_mvm_masked(inp.mvm_prob, grid_h * grid_w),
      mvm_mode=inp.mvm_mask, mvm_min_block=inp.mvm_min_block)
  pairs = (grain.MapDataset.range(len(source) * synthetic.CAPTIONS_PER_IMAGE)
           .shuffle(seed=config.seed)
           .repeat()
           .random_map(make_pair, seed=config.seed)[process_index::process_count]
           .batch(batch_size // process_count, drop_remainder=True))
  return _read_ahead(pairs, config.input)


def make_train_iterator(config, *, process_index=0, process_count=1):
  """Iterator over make_train_dataset(...); get_state() / set_state() checkpoint it."""
  return iter(make_train_dataset(config, process_index=process_index,
                                 process_count=process_count))


def _unit_image(source, index):
  """Image `index` of `source`, without drawing its captions: float32 [H, W, 3] in [-1, 1]."""
  return _to_unit_range(synthetic.render_scene(source.scene(int(index)), source.image_size))


def _image_example(source, index):
  return {"image": _unit_image(source, index)}


def make_image_iterator(config, batch_size, seed):
  """Endless iterator of {"image": float32 [batch_size, H, W, 3] in [-1, 1]} batches over the
  training images, shuffled by `seed` anew every epoch (trains the VQ tokenizer)."""
  source = _source(config, "train")
  images = (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
            .map(functools.partial(_image_example, source)).batch(batch_size, drop_remainder=True))
  return iter(_read_ahead(images, config.input))


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

  Attributes:
    num_images, num_texts: gallery sizes (5 texts per image).
    captions: list of num_texts str, in image order.
    txt2img: int32 [num_texts], the image index of each text.
  """

  def __init__(self, source, tokenizer, max_len, batch_size):
    self._source = source
    self._batch_size = batch_size
    self.num_images = len(source)
    self.captions = [c for i in range(self.num_images) for c in source.captions(i)]
    self.num_texts = len(self.captions)
    self.txt2img = np.repeat(np.arange(self.num_images, dtype=np.int32),
                             synthetic.CAPTIONS_PER_IMAGE)
    self._text_ids, self._text_mask = tokenizer_lib.tokenize(tokenizer, self.captions, max_len)

  def _images(self, indices):
    return {"image": np.stack([_unit_image(self._source, i) for i in indices])}

  def image_batches(self):
    """Yields {"image": float32 [b, H, W, 3] in [-1, 1], "valid": bool [b]}."""
    return _padded_batches(self.num_images, self._batch_size, self._images)

  def text_batches(self):
    """Yields {"text_ids": int32 [b, L], "text_mask": int32 [b, L], "valid": bool [b]}."""
    return _padded_batches(
        self.num_texts, self._batch_size,
        lambda i: {"text_ids": self._text_ids[i], "text_mask": self._text_mask[i]})


def make_eval_split(config, batch_size=None):
  """The eval split of config.input.data in batches of `batch_size` (default eval.batch_size)."""
  return EvalSplit(_source(config, "eval"), tokenizer_lib.load_tokenizer(config.input.tokenizer),
                   config.input.max_len, batch_size or config.eval.batch_size)
