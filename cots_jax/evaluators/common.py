"""The evaluators a run names in its config, built in one place, and the embedders they run on.

`config.eval.evaluators` lists `(name, {option: value})` pairs (big_vision's `config.evals`,
kept inside the `eval` group); the names are the keys of EVALUATORS, the options override
`config.eval.ks` / `config.eval.chunk` for that evaluator. The trainer and inference both call
`from_config` and `run_evals`, so a new evaluator is added here and named in a config, nothing
else. Results are keyed `eval/<name><suffix>/<metric>`, the suffix naming the encoder
(ENCODER_SUFFIXES: "" online, "_momentum" momentum).
"""

import dataclasses
import functools
import re
from typing import Callable, NamedTuple, Optional

from absl import logging
import jax
import numpy as np

from cots_jax import locking
from cots_jax import sharding
from cots_jax.data import pipeline
from cots_jax.data import registry
from cots_jax.data import synthetic_video
from cots_jax.data import tokenizer as tokenizer_lib
from cots_jax.evaluators import retrieval
from cots_jax.evaluators import zeroshot


@dataclasses.dataclass(frozen=True)
class EvaluatorKind:
  """One kind of evaluator.

  Attributes:
    make: (config, split, ks, chunk) -> run(embed_image_fn, embed_text_fn) -> {metric: value}.
    unavailable: config -> None, or why the config's data cannot have this evaluator.
    default_ks: its recall cut-offs when its options give none; None = `config.eval.ks`.
  """
  make: Callable
  unavailable: Callable = lambda config: None
  default_ks: Optional[tuple] = None


def _directions(config):
  return ("v2t", "t2v") if registry.is_video(config) else ("i2t", "t2i")


def _retrieval(config, split, ks, chunk):
  """Image (video) <-> text retrieval (design §4.1)."""
  evaluator = retrieval.RetrievalEvaluator("retrieval", split, ks, chunk, _directions(config))
  return evaluator.run


def _image_instance(config, split, ks, chunk):
  """COOKIE's image instance retrieval: one augmented view of each image finds its other view."""
  del config
  evaluator = retrieval.ImageInstanceEvaluator("image_instance", split, ks, chunk)
  return lambda embed_image_fn, _: evaluator.run(embed_image_fn)


def _text_matching(config, split, ks, chunk):
  """COOKIE's text matching: each caption finds the other captions of its image."""
  del config
  evaluator = retrieval.TextMatchingEvaluator("text_matching", split, ks, chunk)
  return lambda _, embed_text_fn: evaluator.run(embed_text_fn)


def _direction(config, split, ks, chunk):
  """Retrieval among the synthetic clips that differ from the query's own only in direction."""
  del chunk
  groups = synthetic_video.appearance_groups(registry.make_source(config, "eval"))
  evaluator = retrieval.WithinGroupEvaluator("direction", split, groups, ks, _directions(config))
  return evaluator.run


def _zeroshot(config, split, ks, chunk):
  """Zero-shot classification of synthetic single-object images by shape and by colour."""
  del split, chunk
  evaluator = zeroshot.SyntheticZeroShotEvaluator(
      "zeroshot", tokenizer_lib.load_tokenizer(config.input.tokenizer), config.input.max_len,
      config.eval.batch_size, config.model.image.image_size, ks, config.seed)
  return evaluator.run


def _needs_images(config):
  return "needs images, not video" if registry.is_video(config) else None


def _needs_synthetic_video(config):
  if config.input.data.name != "synthetic_video":
    return "ranks clips against their direction twins: it needs input.data.name='synthetic_video'"
  return None


def _needs_synthetic_images(config):
  if config.input.data.name != "synthetic":
    return ("classifies synthetic single-object images by shape and colour: it needs "
            "input.data.name='synthetic'")
  return None


EVALUATORS = {
    "retrieval": EvaluatorKind(_retrieval),
    "image_instance": EvaluatorKind(_image_instance, _needs_images),
    "text_matching": EvaluatorKind(_text_matching),
    "direction": EvaluatorKind(_direction, _needs_synthetic_video, default_ks=(1,)),
    "zeroshot": EvaluatorKind(_zeroshot, _needs_synthetic_images, default_ks=(1, 5)),
}
OPTIONS = ("ks", "chunk")


def check_config(config):
  """Raises ValueError naming `config.eval.evaluators` when an entry is not a known evaluator
  with known options, is listed twice, or does not fit the config's data."""
  entries = list(config.eval.evaluators)
  names = []
  for entry in entries:
    if len(entry) != 2 or not isinstance(entry[1], dict):
      raise ValueError(f"config.eval.evaluators={entries!r}: each entry must be "
                       f"(name, {{option: value}}), got {entry!r}")
    name, options = entry
    if name not in EVALUATORS:
      raise ValueError(f"config.eval.evaluators names {name!r}; known: {sorted(EVALUATORS)}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
      raise ValueError(f"config.eval.evaluators: {name!r} has no option {unknown}; its options "
                       f"are {OPTIONS}")
    why = EVALUATORS[name].unavailable(config)
    if why:
      raise ValueError(f"config.eval.evaluators names {name!r}, which {why}")
    names.append(name)
  if len(set(names)) != len(names):
    raise ValueError(f"config.eval.evaluators={entries!r} lists an evaluator twice")


def from_config(config, split):
  """The evaluators of `config.eval.evaluators` on `split`, as {name: run(embed_image_fn,
  embed_text_fn) -> {metric: value}}.

  Text matching is left out, with a warning, when no eval image has two captions.

  Args:
    config: the run's ConfigDict (`eval.evaluators`, `eval.ks`, `eval.chunk`).
    split: the `eval_split.EvalSplit`.
  """
  check_config(config)
  evaluators = {}
  for name, options in config.eval.evaluators:
    kind = EVALUATORS[name]
    ks = tuple(options.get("ks", kind.default_ks or config.eval.ks))
    try:
      evaluators[name] = kind.make(config, split, ks, options.get("chunk", config.eval.chunk))
    except ValueError as error:
      if name != "text_matching":
        raise
      logging.warning("%s: text matching is not evaluated", error)
  return evaluators


class EmbedFns(NamedTuple):
  """The embedders of `make_embed_fns`: `(params, host arrays) -> numpy [b, E]`.

  Attributes:
    images: (params, image [b, H, W, 3] or clips [b, T, H, W, 3]).
    texts: (params, text_ids, text_mask [b, L]).
    image_features, text_features: (params, a locked tower's cached pooled outputs [b, D]):
      the projection heads alone (cots_jax/features.py).
  """
  images: Callable
  texts: Callable
  image_features: Callable
  text_features: Callable


def make_embed_fns(model, mesh):
  """The `EmbedFns` of `model` on `mesh`, for the evaluators and inference.

  Every process passes the same batch of b rows (the eval split is the same on every host). The
  rows are padded to a multiple of the mesh's device count and split over all devices, each
  process filling only its own devices' rows; the jitted functions gather the embeddings, so
  every process gets all b of them while each example is embedded once.
  """
  rows, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)

  def embedder(method):
    """`(params, *host arrays) -> numpy [b, E]` of the model's `method` (its embedding first)."""
    @functools.partial(jax.jit, out_shardings=whole)
    def embed(params, *arrays):
      out = model.apply({"params": params}, *arrays, method=method)
      return out[0] if isinstance(out, tuple) else out

    def run(params, *arrays):
      return np.asarray(embed(params, *map(spread, arrays)))[:len(arrays[0])]
    return run

  def spread(x):
    """numpy [b, ...] -> a global array of [b + pad, ...] split by rows over the mesh."""
    x = np.asarray(x)
    pad = -x.shape[0] % mesh.size
    if pad:
      x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return jax.make_array_from_callback(x.shape, rows, lambda index: x[index])

  return EmbedFns(images=embedder(model.visual_embedding), texts=embedder(model.text_embedding),
                  image_features=embedder(model.embed_image),
                  text_features=embedder(model.embed_text))


# The name suffix of each encoder's results: eval/<evaluator><suffix>/<metric>.
ENCODER_SUFFIXES = (("", "params"), ("_momentum", "params_ema"))


def _embed_visual(embed_fns, params, batch):
  """Embeddings of an eval batch's images or clips, or of their cached features."""
  if "image_features" in batch:
    return embed_fns.image_features(params, batch["image_features"])
  return embed_fns.images(params, pipeline.visual_input(batch))


def _embed_text(embed_fns, params, batch):
  """Embeddings of an eval batch's captions, or of their cached features."""
  if "text_features" in batch:
    return embed_fns.text_features(params, batch["text_features"])
  return embed_fns.texts(params, batch["text_ids"], batch["text_mask"])


def run_evals(evaluators, embed_fns, params_trees):
  """The metrics of every evaluator for the online and the momentum encoder, as
  `{"eval/<name><suffix>/<metric>": value}` (suffixes: ENCODER_SUFFIXES).

  Args:
    evaluators: from `from_config`.
    embed_fns: from `make_embed_fns`.
    params_trees: a dict with the "params" tree and, when the run has a momentum encoder, the
      "params_ema" tree of its trainable leaves (the train state, or a restore).
  """
  trees = locking.encoder_trees(params_trees)
  results = {}
  for suffix, key in ENCODER_SUFFIXES:
    if key not in trees:
      continue
    params = trees[key]
    # One encoder's evaluators share the split's batches: each is embedded once.
    image_fn = retrieval.memoized_embed_fn(functools.partial(_embed_visual, embed_fns, params))
    text_fn = retrieval.memoized_embed_fn(functools.partial(_embed_text, embed_fns, params))
    for name, run in evaluators.items():
      metrics = run(image_fn, text_fn)
      results.update({f"eval/{name}{suffix}/{metric}": value for metric, value in metrics.items()})
  return results


def summary(results):
  """One line: R@1/5/10 of every evaluator in `results` (of `run_evals`), both ways for
  cross-modal ones, and the top-1/5 accuracies of classifying ones."""
  grouped = {}
  for key, value in results.items():
    _, name, metric = key.split("/")
    grouped.setdefault(name, {})[metric] = value
  labels = {"r": "R@", "top": "top-"}
  parts = []
  for name, metrics in grouped.items():
    # Cross-modal keys are i2t_r5, t2v_r1, ...: one "<direction> R@1/5/10 a/b/c" per direction;
    # classification keys are shape_top1, ...: one "<classes> top-1/5 a/b" per class set.
    by_prefix = {}
    for key, value in metrics.items():
      match = re.fullmatch(r"(?:(\w+?)_)?(r|top)(\d+)", key)
      if match:
        by_prefix.setdefault((match[1], match[2]), []).append((match[3], value))
    scores = [f"{prefix + ' ' if prefix else ''}{labels[kind]}{'/'.join(k for k, _ in pairs)} "
              + "/".join(f"{value:.1f}" for _, value in pairs)
              for (prefix, kind), pairs in by_prefix.items()]
    parts.append(f"{name}: {' '.join(scores)}")
  return "; ".join(parts)
