"""A trained run loaded for inference: what eval-only, search and the report share.

`evaluate_checkpoint` is the work of `python -m cots_jax.evaluate` (the entry only parses flags).

`TrainedRun.load(WORKDIR)` builds the run of its config (`state.build`), restores the online and
momentum parameters of one checkpoint (nothing else of the train state: no optimizer, queue or
VQ tokenizer) and embeds images and captions with them. Embedding splits each batch over every
device of the mesh (`evaluators.common.make_embed_fns`), so the same code runs on one CPU or on
every host of a pod slice.
"""

import dataclasses
import json
from typing import Any

import ml_collections
import numpy as np

from cots_jax import checkpoint
from cots_jax import locking
from cots_jax import paths
from cots_jax import state as state_lib
from cots_jax.data import eval_split
from cots_jax.data import tokenizer as tokenizer_lib
from cots_jax.data import transforms
from cots_jax.evaluators import common as evaluators_common

# The parameter tree of each encoder a user can pick.
ENCODERS = {"online": "params", "momentum": "params_ema"}


def load_run_config(workdir):
  """The ConfigDict a run saved as WORKDIR/config.json; fields that the file predates take the
  defaults of configs/common.py (a field added later defaults to the behaviour before it).

  Raises:
    FileNotFoundError when WORKDIR has no config.json (it is no cots_jax run).
  """
  path = paths.absolute(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not the workdir of a "
                            "cots_jax run")
  return state_lib.config_from_json(json.loads(path.read_text()))


@dataclasses.dataclass
class TrainedRun:
  """The model of a run with the parameters of one of its checkpoints.

  Attributes:
    config: the run's ConfigDict.
    step: the checkpoint's step.
    params: {"params": online tree, "params_ema": momentum tree (the run has one)}, sharded on
      `mesh`.
    mesh: the devices the embedders split batches over.
    embed_fns: the `EmbedFns` of `evaluators.common.make_embed_fns`.
  """
  config: ml_collections.ConfigDict
  step: int
  params: dict
  mesh: Any
  embed_fns: evaluators_common.EmbedFns
  _tokenizer: Any = None

  @classmethod
  def load(cls, workdir, config=None, step=None):
    """Loads checkpoint `step` (None = the latest complete one) of WORKDIR.

    Args:
      workdir: the run's workdir (local or gs://).
      config: the config whose model to build; None reads WORKDIR/config.json and uses a data
        mesh over all devices (the run's own mesh may need more devices than this process sees).
      step: the checkpoint step.

    Raises:
      FileNotFoundError when WORKDIR has no config.json (config None) or no such checkpoint;
      ValueError listing the parameters that do not fit the config's model.
    """
    if config is None:
      config = load_run_config(workdir)
      config.mesh = (("data", -1),)
    built = state_lib.build(config, state_lib.make_mesh(config))
    params, step = checkpoint.restore_params(workdir, built.abstract_params, step, what="workdir")
    return cls(built.config, step, locking.encoder_trees(params), built.mesh,
               evaluators_common.make_embed_fns(built.model, built.mesh))

  def encoder_params(self, encoder="online"):
    """The parameter tree of `encoder` in ENCODERS ("online" or "momentum")."""
    if encoder not in ENCODERS:
      raise ValueError(f"encoder {encoder!r} is unknown; use one of {sorted(ENCODERS)}")
    if ENCODERS[encoder] not in self.params:
      raise ValueError(f"encoder {encoder!r}: this run has no momentum encoder (no loss term of "
                       "its config read one); use the online encoder")
    return self.params[ENCODERS[encoder]]

  def image_transform(self):
    """Any decoded image or encoded file -> the eval pixels of this model (resize + centre crop)."""
    return transforms.ImageTransform(self.config.model.image.image_size)

  def embed_images(self, images, encoder="online"):
    """float32 [n, H, W, 3] in [-1, 1] (from `image_transform`) -> unit embeddings [n, E],
    in batches of config.eval.batch_size."""
    params = self.encoder_params(encoder)
    return _in_batches(lambda rows: self.embed_fns.images(params, images[rows]), len(images),
                       self.config.eval.batch_size)

  def embed_texts(self, captions, encoder="online"):
    """list of n str -> unit embeddings [n, E] (the run's tokenizer and input.max_len)."""
    if self._tokenizer is None:
      self._tokenizer = tokenizer_lib.load_tokenizer(self.config.input.tokenizer)
    ids, mask = tokenizer_lib.tokenize(self._tokenizer, captions, self.config.input.max_len)
    params = self.encoder_params(encoder)
    return _in_batches(lambda rows: self.embed_fns.texts(params, ids[rows], mask[rows]),
                       len(captions), self.config.eval.batch_size)


def evaluate_checkpoint(config, workdir, step=None):
  """The metrics of the config's evaluators (`config.eval.evaluators`) of checkpoint `step`
  (None = latest) of WORKDIR on config's eval split.

  Returns:
    ({"retrieval": {metric: value}, "retrieval_momentum": {...}, "image_instance": ..., ...},
    the checkpoint's step).
  """
  run = TrainedRun.load(workdir, config, step)
  evaluators = evaluators_common.from_config(run.config, eval_split.make_eval_split(run.config))
  flat = evaluators_common.run_evals(evaluators, run.embed_fns, run.params)
  results = {}
  for key, value in flat.items():
    _, name, metric = key.split("/")
    results.setdefault(name, {})[metric] = value
  return results, run.step


def results_table(results, ks):
  """Text tables: one per kind of evaluator, one row per evaluator: image-text (i2t / t2i),
  video-text (v2t / t2v) with R@k both ways, rsum and median ranks, then unimodal ones with R@k
  and the median rank."""
  tables = []
  for first, second in (("i2t", "t2i"), ("v2t", "t2v")):
    rows = {name: m for name, m in results.items() if f"{first}_r{ks[0]}" in m}
    if rows:
      tables.append(_table(rows, [f"{first}_r{k}" for k in ks] + [f"{second}_r{k}" for k in ks]
                           + ["rsum", f"{first}_medr", f"{second}_medr"]))
  unimodal = {name: m for name, m in results.items() if f"r{ks[0]}" in m}
  if unimodal:
    tables.append(_table(unimodal, [f"r{k}" for k in ks] + ["medr"]))
  return "\n\n".join(tables)


def _table(results, columns):
  """A text table of `results` ({row name: {column: value}}) with the given columns."""
  width = max(len(name) for name in results)
  lines = [" ".join([" " * width] + [f"{c:>9}" for c in columns])]
  for name, metrics in results.items():
    lines.append(" ".join([f"{name:<{width}}"] + [f"{metrics[c]:9.2f}" for c in columns]))
  return "\n".join(lines)


def _in_batches(embed_rows, num_rows, batch_size):
  """Concatenates embed_rows(slice) over `num_rows` rows in slices of `batch_size` -> [n, E]."""
  if num_rows == 0:
    raise ValueError("nothing to embed")
  return np.concatenate([embed_rows(slice(start, start + batch_size))
                         for start in range(0, num_rows, batch_size)])
