"""The terms of the COTS and COOKIE objectives (method §1.3, §2.3), one small function each.

A term reads one step's `Context` (the model passes, the parameters, the batch, the clean
`Encodings` of both towers and the random keys) and returns a `PairLoss`: its loss per pair, or
per masked position of each pair. The step (cots_jax/step.py) reduces each with the pairs' AMF
weights (`reduce`) and sums those of non-zero weight (`active_terms`). Pure functions of arrays:
no state is kept here.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from cots_jax import losses
from cots_jax import shapes
from cots_jax import vq_trainer
from cots_jax.data import pipeline
from cots_jax.models import cots as cots_model


@dataclasses.dataclass(frozen=True)
class PairLoss:
  """A term's loss before the AMF-weighted mean over the batch.

  Attributes:
    values: [B] loss of each pair, or [B, P] loss at each of P prediction slots of each pair.
    slot_weights: None for [B] values; [B, P] with 1 at the real masked slots, 0 at padding.
  """
  values: jax.Array
  slot_weights: Optional[jax.Array] = None


def reduce(loss, pair_weights):
  """The scalar term: Σ w·l / max(1, Σ w) over pairs (or over masked slots, each slot weighted
  by its pair's AMF weight), design §8.2-8.3."""
  if loss.slot_weights is None:
    return losses.weighted_mean(loss.values, pair_weights)
  return losses.masked_mean(loss.values, loss.slot_weights, pair_weights)


@dataclasses.dataclass(frozen=True)
class Passes:
  """The model's forward passes as a step runs them: a tower pass given an `rng` runs in train
  mode when the config has dropout or image token drop."""
  config: Any
  model: Any

  @property
  def stochastic(self):
    model = self.config.model
    return (model.image.dropout > 0 or model.text.dropout > 0 or model.image.token_drop > 0
            or (model.use_wst and model.wst_dropout > 0))

  def apply(self, params, method, *args, rng=None):
    """`method` of the model with `params`."""
    if self.stochastic and rng is not None:
      return self.model.apply({"params": params}, *args, method=method, rngs={"dropout": rng},
                              train=True)
    return self.model.apply({"params": params}, *args, method=method)

  def encode(self, params, batch, rng=None):
    """Clean pass of both towers -> (v [B, E], t [B·K, E], image global [B, Di], text global
    [B·K, Dt]), K the captions per image of the batch (1: [B, L] text). A tower whose pooled
    outputs the batch carries (`image_features` [B, Di] / `text_features` [B, (K,) Dt], cached
    outputs of a fully locked tower: cots_jax/features.py) runs its projection head only."""
    rng_image, rng_text = jax.random.split(rng) if rng is not None else (None, None)
    if "image_features" in batch:
      image_global = batch["image_features"]
      v = self.apply(params, self.model.embed_image, image_global)
    else:
      v, image_global = self.apply(params, self.model.visual_embedding,
                                   pipeline.visual_input(batch), rng=rng_image)
    # K captions per image ([B, K, ...], input.captions_per_image) go through as B·K rows.
    rows = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    if "text_features" in batch:
      text_global = rows(batch["text_features"])
      t = self.apply(params, self.model.embed_text, text_global)
    else:
      t, text_global = self.apply(params, self.model.text_embedding, rows(batch["text_ids"]),
                                  rows(batch["text_mask"]), rng=rng_text)
    return v, t, image_global, text_global


@dataclasses.dataclass(frozen=True)
class Encodings:
  """The clean passes of one step, online and momentum (`_m`, no gradient), and what the
  instance-level terms share. Without a momentum encoder (`reads_momentum` False) the momentum
  fields and the logits are None and every pair weight is 1.

  Attributes:
    v, t: [B, E] unit image / text embeddings; v_m, t_m: the momentum ones (the keys).
    image_global, text_global: [B, D] the towers' global vectors; *_m: the momentum ones.
    temp: the contrastive temperature (scalar).
    pair_weights: [B] the AMF weights.
    logits_i2t, logits_t2i: [B, C] online queries against the momentum keys of the batch and
      the queue (C = shapes.contrastive_columns).
  """
  v: jax.Array
  t: jax.Array
  image_global: jax.Array
  text_global: jax.Array
  temp: jax.Array
  pair_weights: jax.Array
  v_m: Optional[jax.Array] = None
  t_m: Optional[jax.Array] = None
  image_global_m: Optional[jax.Array] = None
  text_global_m: Optional[jax.Array] = None
  logits_i2t: Optional[jax.Array] = None
  logits_t2i: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class Context:
  """What a term reads: the config, the passes, the online params, the batch, the encodings,
  the queue, the frozen VQ tokenizer's variables and the step's keys (clean, mlm, mvm, intra)."""
  config: Any
  passes: Passes
  params: Any
  batch: dict
  enc: Encodings
  queue: dict
  vq: Any
  rngs: dict


def _momentum_logits(c):
  """ALBEF's momentum-distillation logits of the momentum queries, or {} when itc_alpha is 0."""
  if c.config.loss.itc_alpha <= 0:
    return {}
  queue, in_batch = c.queue, c.config.queue.in_batch_negatives
  return dict(
      momentum_logits_i2t=losses.contrastive_logits(
          c.enc.v_m, c.enc.t_m, queue["txt"], queue["valid"], c.enc.temp, in_batch),
      momentum_logits_t2i=losses.contrastive_logits(
          c.enc.t_m, c.enc.v_m, queue["img"], queue["valid"], c.enc.temp, in_batch))


def itc(c):
  """Momentum-contrastive ITC both ways against the queues (method §4.11-4.12)."""
  config = c.config
  targets = losses.itc_targets(c.batch["image_id"], c.queue["idx"], c.queue["valid"],
                               config.queue.in_batch_negatives, config.queue.multi_positive)
  return PairLoss(losses.itc_loss(c.enc.logits_i2t, c.enc.logits_t2i, targets,
                                  alpha=config.loss.itc_alpha, **_momentum_logits(c)))


def cookie_cm(c):
  """COOKIE's cross-modal InfoNCE of the online embeddings in the batch, or with
  `cookie_use_queue` the queued ITC (method §2.3)."""
  if c.config.loss.cookie_use_queue:
    return itc(c)
  image_ids = c.batch["image_id"] if c.config.queue.multi_positive else None
  return PairLoss(losses.info_nce(c.enc.v, c.enc.t, c.enc.temp, image_ids))


def _views_rngs(c):
  """(second image view, second caption pass) keys of COOKIE's "views" mode."""
  return jax.random.split(c.rngs["intra"])


def cookie_vv(c):
  """COOKIE's image-image InfoNCE: against the second view's embedding ("views") or the image
  tower's own projection ("cross_model")."""
  if c.config.loss.cookie_intra_mode == "cross_model":
    positives = c.passes.apply(c.params, c.passes.model.encoder_embeddings,
                               c.enc.image_global, c.enc.text_global)[0]
  else:
    positives = c.passes.apply(c.params, c.passes.model.image_embedding, c.batch["image_view"],
                               rng=_views_rngs(c)[0])[0]
  return PairLoss(losses.info_nce(c.enc.v, positives, c.enc.temp))


def cookie_tt(c):
  """COOKIE's text-text InfoNCE: against a second dropout pass of the caption at
  `cookie_text_temp` ("views") or the text tower's own projection ("cross_model")."""
  if c.config.loss.cookie_intra_mode == "cross_model":
    positives = c.passes.apply(c.params, c.passes.model.encoder_embeddings,
                               c.enc.image_global, c.enc.text_global)[1]
    return PairLoss(losses.info_nce(c.enc.t, positives, c.enc.temp))
  positives = c.passes.apply(c.params, c.passes.model.text_embedding, c.batch["text_ids"],
                             c.batch["text_mask"], rng=_views_rngs(c)[1])[0]
  return PairLoss(losses.info_nce(c.enc.t, positives, c.config.loss.cookie_text_temp))


def kl_align(c):
  """Task-level KL between the i2t and t2i distributions over the queues (method §4.15)."""
  return PairLoss(losses.kl_alignment(c.enc.logits_i2t, c.enc.logits_t2i,
                                      c.config.kl.direction, c.config.kl.stopgrad_target))


def _mvlm_globals(c):
  """(image, text) global vectors that condition the MLM / MVM heads (config.model.mvlm_*)."""
  enc, model = c.enc, c.config.model
  globals_ = ((enc.image_global_m, enc.text_global_m) if model.mvlm_global_src == "momentum"
              else (enc.image_global, enc.text_global))
  if model.mvlm_global_stopgrad:
    globals_ = tuple(map(jax.lax.stop_gradient, globals_))
  return globals_


def _token_loss(logits, targets, slot_weights):
  """PairLoss of the cross-entropy at each prediction slot: logits [B, P, V], targets [B, P]."""
  return PairLoss(losses.token_cross_entropy(logits, targets), slot_weights)


def mlm(c):
  """Masked language modelling conditioned on the image's global vector (method §1.3.2)."""
  passes, batch = c.passes, c.batch
  hidden = passes.apply(c.params, passes.model.encode_text, batch["mlm_ids"], batch["text_mask"],
                        rng=c.rngs["mlm"])
  logits = passes.apply(c.params, passes.model.mlm_logits,
                        cots_model.gather_positions(hidden, batch["mlm_positions"]),
                        _mvlm_globals(c)[0])
  return _token_loss(logits, batch["mlm_targets"], batch["mlm_weights"])


def mvm(c):
  """Masked vision modelling: predict the frozen VQ tokenizer's codes of the same (augmented)
  image at the masked patches, conditioned on the text's global vector (design §8.1)."""
  passes, batch, config = c.passes, c.batch, c.config
  vq_model = vq_trainer.tokenizer_module(config)
  codes = jax.lax.stop_gradient(vq_model.apply(c.vq, batch["image"], method=vq_model.tokenize))
  positions = cots_model.masked_patch_positions(batch["mvm_mask"], shapes.num_mvm_masked(config))
  tokens = passes.apply(c.params, passes.model.encode_image, batch["image"], batch["mvm_mask"],
                        rng=c.rngs["mvm"])
  logits = passes.apply(c.params, passes.model.mvm_logits,
                        cots_model.gather_positions(tokens[:, 1:], positions), _mvlm_globals(c)[1])
  return _token_loss(logits, jnp.take_along_axis(codes, positions, axis=1),
                     jnp.ones(positions.shape, jnp.float32))


# Every term in the order the step adds them; `config.loss.<name>` is its weight.
TERMS = {"itc": itc, "cookie_cm": cookie_cm, "cookie_vv": cookie_vv, "cookie_tt": cookie_tt,
         "kl_align": kl_align, "mlm": mlm, "mvm": mvm}


def active_terms(config):
  """{name: term} of the terms whose weight is > 0, in the order of TERMS."""
  return {name: term for name, term in TERMS.items() if config.loss[name] > 0}


def reads_momentum(config):
  """True when some part of the step reads the momentum towers or the queues: ITC and KL
  alignment (their logits are against the momentum keys and queues), COOKIE's cross-modal term
  in its queued form, MLM / MVM conditioned on the momentum pass, or the AMF (it filters by the
  momentum pair similarity). Otherwise (COOKIE's in-batch terms, a LiT recipe) neither the
  momentum towers nor the queues are computed or stored (design §9.2)."""
  loss, model = config.loss, config.model
  return (loss.itc > 0 or loss.kl_align > 0 or (loss.cookie_cm > 0 and loss.cookie_use_queue)
          or ((loss.mlm > 0 or loss.mvm > 0) and model.mvlm_global_src == "momentum")
          or config.amf.enabled)
