"""Cached features of fully locked towers (design §9.3): which towers are cached, and their tables
for the training pairs and the eval split.

A fully locked tower (`model.<tower>.locked="all"`) gives an example the same pooled output at
every step, so its outputs are computed once for every training and eval example
(`feature_tables`, with a progress bar), stored by cots_jax/feature_cache.py under a fingerprint
of the weights, the preprocessing and the examples, and fed to the step instead of running the
tower: the training batches carry `text_features` [B, Dt] / `image_features` [B, Di]
(data/pipeline.py) and the eval split's batches the same rows for its captions / images, so evals
see exactly the features training saw. A locked tower whose outputs are not fixed per example
runs live, and the log says why (`why_live`).
"""

import dataclasses
import json
import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from cots_jax import feature_cache
from cots_jax import locking
from cots_jax.data import pipeline
from cots_jax.data import registry
from cots_jax.data import tokenizer as tokenizer_lib
from cots_jax.data import transforms


def why_live(config, tower):
  """Why the fully locked `tower` runs at every step instead of from a cache, or None when its
  outputs are fixed per example."""
  model, loss, inp = config.model, config.loss, config.input
  if model.use_wst:
    return "the WST reads its tokens, not its pooled output"
  if model[tower].dropout > 0:
    return f"model.{tower}.dropout={model[tower].dropout} makes every pass differ"
  if tower == "image" and model.image.token_drop > 0:
    return f"model.image.token_drop={model.image.token_drop} makes every pass differ"
  if tower == "text":
    if loss.mlm > 0:
      return "MLM reads its tokens on masked captions"
    return None
  if registry.is_video(config):
    return "video clips sample their frames at random"
  if loss.mvm > 0:
    return "MVM reads its tokens on masked images"
  if inp.augment != "none" or inp.second_view:
    return (f"its training input is augmented (input.augment={inp.augment!r}, "
            f"input.second_view={inp.second_view})")
  return None


def cached_towers(config):
  """The fully locked towers whose features are cached; logs why each other one runs live."""
  cached = []
  for tower in locking.TOWERS:
    if not locking.fully_locked(config, tower):
      continue
    reason = why_live(config, tower)
    if reason is None:
      cached.append(tower)
    else:
      logging.info("model.%s is locked but runs at every step: %s", tower, reason)
  return tuple(cached)


@dataclasses.dataclass(frozen=True)
class FeatureTables:
  """The cached towers' pooled outputs.

  Attributes:
    train: {tower: float32 [rows, D]}: "text" one row per training pair (`pipeline.pair_table`
      order), "image" one row per training image of the source, NaN where it did not decode.
    eval: {tower: float32 [rows, D]}: one row per caption / image of the eval split, in its
      order.
  """
  train: dict
  eval: dict


def cache_directory(config, workdir):
  """`config.feature_cache_dir`, or WORKDIR/feature_cache."""
  return config.feature_cache_dir or os.path.join(os.fspath(workdir), "feature_cache")


def _host_tree(tree):
  """A tree of arrays as numpy on this host, gathered when it spans other processes."""
  if all(leaf.is_fully_addressable for leaf in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def _tokenized(config, captions):
  """int32 ids, mask [N, input.max_len] of `captions` with the run's tokenizer."""
  tokenizer = tokenizer_lib.load_tokenizer(config.input.tokenizer)
  return tokenizer_lib.tokenize(tokenizer, captions, config.input.max_len)


def _image_identity(source, index):
  """What names training image `index` of `source` in the fingerprint: its file path with size
  and modification time when the source reads files, else its position."""
  if hasattr(source, "path"):
    path = source.path(index)
    try:
      stat = os.stat(path)
      return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    except OSError:
      return f"{path}|unreadable"
  return f"{type(source).__name__}[{index}]"


class _Builder:
  """Computes and caches the features of one tower with the run's params."""

  def __init__(self, config, model, params, directory):
    self.config, self.directory = config, directory
    self.params = _host_tree(params)
    self.text_fn = jax.jit(lambda p, ids, mask: model.apply(
        {"params": p}, ids, mask, method=model.text_features))
    self.image_fn = jax.jit(lambda p, image: model.apply(
        {"params": p}, image, method=model.image_features))

  def _table(self, tower, split, examples, preprocessing, num, fn, get_batch, order=None):
    """The cached [num, D] table `<data>_<tower>_<split>`, built as `fn(params, *get_batch(rows))`
    over rows 0..num-1 in batches; with `order` (a permutation), get_batch's row i is example
    order[i]."""
    config = self.config
    key = feature_cache.fingerprint(
        weights=self.params[tower], examples=examples,
        preprocessing={"tower": tower, "pool": config.model.pool, "dtype": config.model.dtype,
                       **preprocessing})

    def build():
      table = feature_cache.compute_features(
          lambda batch: fn(self.params, *batch), num, config.eval.batch_size, get_batch,
          f"caching {tower} features ({split})")
      if order is None:
        return table
      in_order = np.empty_like(table)
      in_order[order] = table
      return in_order

    return feature_cache.load_or_build(
        self.directory, f"{config.input.data.name}_{tower}_{split}", fingerprint=key,
        shape=(num, config.model[tower].width), dtype=np.float32, build=build)

  def text(self, split, captions):
    """float32 [len(captions), Dt] of the text tower.

    The captions go through in order of length, each batch cut to its longest caption (rounded
    up to 8 tokens: a few shapes to compile): padding is masked out of attention and pooling, so
    the rows equal those of full-length batches, at a fraction of the cost (most captions are
    far shorter than input.max_len).
    """
    ids, mask = _tokenized(self.config, captions)
    order = np.argsort(mask.sum(axis=1), kind="stable")
    sorted_ids, sorted_mask = ids[order], mask[order]

    def by_length(rows):
      length = min(ids.shape[1], -(-int(sorted_mask[rows].sum(axis=1).max()) // 8) * 8)
      return sorted_ids[rows, :length], sorted_mask[rows, :length]

    return self._table("text", split, [ids.tobytes(), mask.tobytes()], {}, len(captions),
                       self.text_fn, by_length, order)

  def train_images(self, source):
    """float32 [len(source), Di] of the image tower on the eval transform of every training
    image; NaN rows for images that do not decode."""
    config = self.config
    size = config.model.image.image_size
    transform = transforms.ImageTransform(size)
    bad = set()

    def pixels(rows):
      images = []
      for index in rows.tolist():
        try:
          item = source[index]
          images.append(transform.pixels(item["image"], item["name"]))
        except transforms.BadExampleError as error:
          bad.add(index)
          logging.warning("caching image features: %s", error)
          images.append(np.zeros((size, size, 3), np.uint8))
      return (transforms.to_unit_range(np.stack(images)),)

    examples = [_image_identity(source, i) for i in range(len(source))]
    data = json.loads(config.input.data.to_json_best_effort())
    table = self._table("image", "train", examples, {"image_size": size, "data": data},
                        len(source), self.image_fn, pixels)
    if bad:
      table = table.copy()
      table[sorted(bad)] = np.nan
    return table

  def eval_images(self, split):
    """float32 [split.num_images, Di] of the image tower on the eval split's images."""
    images = split.image_pixels(np.arange(split.num_images))
    return self._table("image", "eval", [images.tobytes()],
                       {"image_size": self.config.model.image.image_size}, split.num_images,
                       self.image_fn, lambda rows: (transforms.to_unit_range(images[rows]),))


def feature_tables(config, model, params, split, workdir):
  """The tables of the cached towers (`cached_towers`) with the online `params`, loaded from or
  written to `cache_directory`; None when no tower is cached.

  Args:
    config: the run's prepared config.
    model: the `CotsModel`.
    params: the online parameters (a locked tower's are its initial, pre-trained ones).
    split: the run's `EvalSplit`, or None for the training tables alone (benchmarks).
    workdir: the run's workdir.
  """
  towers = cached_towers(config)
  if not towers:
    return None
  builder = _Builder(config, model, params, cache_directory(config, workdir))
  source = registry.make_source(config, "train")
  train, evals = {}, {}
  if "text" in towers:
    pairs = pipeline.pair_table(source)
    if (pairs[:, 1] < 0).any():
      logging.info("model.text is locked but runs at every step: the source draws each "
                   "example's caption at random")
    else:
      captions = [source.captions(int(i))[int(j)] for i, j in pairs]
      train["text"] = builder.text("train", captions)
      if split is not None:
        evals["text"] = builder.text("eval", split.captions)
  if "image" in towers:
    train["image"] = builder.train_images(source)
    if split is not None:
      evals["image"] = builder.eval_images(split)
  return FeatureTables(train, evals) if train else None
