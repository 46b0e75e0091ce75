"""The update step: one jitted `update(state, batch) -> (state, metrics)` (design §3).

The only place where the model, the losses, the queue, EMA, the optimizer and sharding meet
(design §9.1; `cots_jax/state.py` creates them). A step does all of one update with the state
donated; its metrics stay on the device until the trainer reads them every `log_every` steps.
"""

import jax
import jax.numpy as jnp
import optax

from cots_jax import config_validation
from cots_jax import losses
from cots_jax import momentum as momentum_lib
from cots_jax import queue as queue_lib
from cots_jax import shapes
from cots_jax import sharding
from cots_jax import state as state_lib
from cots_jax import vq_trainer
from cots_jax.data import pipeline
from cots_jax.models import cots as cots_model


def make_update_fn(config, model, optimizer):
  """Returns `update(state, batch) -> (state, metrics)`, the whole COTS / COOKIE step (design §3).

  Order inside a step (method §1.3, §2.3, §4): EMA update of the momentum towers, clean online
  and momentum forwards, ITC / KL logits against the queues, AMF weights from the momentum pair
  similarity, COOKIE's cross-modal and intra-modal InfoNCE terms (second image view, second
  dropout pass, or the towers' own projections), masked forwards for MLM / MVM (targets from the
  frozen VQ on the same image), gradient + AdamW, enqueue of the momentum keys. A term of weight
  0 is not computed.
  """
  vq_model = vq_trainer.tokenizer_module(config)
  num_mvm = shapes.num_mvm_masked(config)
  amf_warmup = config_validation.amf_warmup_steps(config)
  weights = config.loss
  schedule = state_lib.learning_rate_schedule(config)

  model_cfg = config.model
  dropout = (model_cfg.image.dropout > 0 or model_cfg.text.dropout > 0
             or (model_cfg.use_wst and model_cfg.wst_dropout > 0))

  def apply(params, method, *args, rng=None):
    """A model method; tower passes given an `rng` run in train mode (dropout) when configured."""
    if dropout and rng is not None:
      return model.apply({"params": params}, *args, method=method, rngs={"dropout": rng},
                         train=True)
    return model.apply({"params": params}, *args, method=method)

  def encode(params, batch, rng=None):
    """Clean forward of both towers -> (v [B,E], t [B,E], image global [B,Di], text global [B,Dt])."""
    rng_image, rng_text = jax.random.split(rng) if rng is not None else (None, None)
    v, img_global = apply(params, model.visual_embedding, pipeline.visual_input(batch),
                          rng=rng_image)
    t, txt_global = apply(params, model.text_embedding, batch["text_ids"], batch["text_mask"],
                          rng=rng_text)
    return v, t, img_global, txt_global

  def intra_modal_positives(params, batch, img_global, txt_global, rng):
    """COOKIE's intra-modal positives of the online v, t [B, E] (method §2.3) -> ([B, E], [B, E]):
    "views": the embedding of the second image view and a second dropout pass of each caption;
    "cross_model": the towers' own projections of their global vectors. Only what the weighted
    terms use is computed (the other is None)."""
    if config.loss.cookie_intra_mode == "cross_model":
      return apply(params, model.encoder_embeddings, img_global, txt_global)
    rng_view, rng_text = jax.random.split(rng)
    image_pos = text_pos = None
    if weights.cookie_vv > 0:
      image_pos = apply(params, model.image_embedding, batch["image_view"], rng=rng_view)[0]
    if weights.cookie_tt > 0:
      text_pos = apply(params, model.text_embedding, batch["text_ids"], batch["text_mask"],
                       rng=rng_text)[0]
    return image_pos, text_pos

  def loss_fn(params, params_ema, state, batch, rng):
    temp = (losses.clamp_temperature(params["temp"], config.temp.min, config.temp.max)
            if config.temp.learnable else jnp.float32(config.temp.init))
    rng_clean, rng_mlm, rng_mvm, rng_intra = jax.random.split(rng, 4)
    v, t, img_global, txt_global = encode(params, batch, rng_clean)
    v_m, t_m, img_global_m, txt_global_m = jax.tree.map(jax.lax.stop_gradient,
                                                        encode(params_ema, batch))

    # Adaptive momentum filter: per-pair weights from the momentum pair similarity (design §8.2).
    scores = jnp.sum(v_m * t_m, axis=-1)
    amf_stats = losses.amf_update(state["amf"], scores, config.amf.beta)
    amf_active = jnp.logical_and(config.amf.enabled, state["step"] >= amf_warmup)
    pair_w = losses.amf_weights(amf_stats, scores, config.amf.lambda_, amf_active)

    queue = state["queue"]
    in_batch = config.queue.in_batch_negatives
    logits_i2t = losses.contrastive_logits(v, t_m, queue["txt"], queue["valid"], temp, in_batch)
    logits_t2i = losses.contrastive_logits(t, v_m, queue["img"], queue["valid"], temp, in_batch)
    terms = {}
    queued_cm = weights.cookie_cm > 0 and config.loss.cookie_use_queue
    if weights.itc > 0 or queued_cm:
      targets = losses.itc_targets(batch["image_id"], queue["idx"], queue["valid"], in_batch,
                                   config.queue.multi_positive)
      momentum_logits = {}
      if weights.itc_alpha > 0:
        momentum_logits = dict(
            momentum_logits_i2t=losses.contrastive_logits(
                v_m, t_m, queue["txt"], queue["valid"], temp, in_batch),
            momentum_logits_t2i=losses.contrastive_logits(
                t_m, v_m, queue["img"], queue["valid"], temp, in_batch))
      itc_per_pair = losses.itc_loss(logits_i2t, logits_t2i, targets, alpha=weights.itc_alpha,
                                     **momentum_logits)
      terms["cookie_cm" if queued_cm else "itc"] = losses.weighted_mean(itc_per_pair, pair_w)
    if weights.cookie_cm > 0 and not queued_cm:
      terms["cookie_cm"] = losses.weighted_mean(losses.info_nce(v, t, temp), pair_w)
    if weights.cookie_vv > 0 or weights.cookie_tt > 0:
      image_pos, text_pos = intra_modal_positives(params, batch, img_global, txt_global,
                                                  rng_intra)
      if weights.cookie_vv > 0:
        terms["cookie_vv"] = losses.weighted_mean(losses.info_nce(v, image_pos, temp), pair_w)
      if weights.cookie_tt > 0:
        text_temp = (temp if config.loss.cookie_intra_mode == "cross_model"
                     else weights.cookie_text_temp)
        terms["cookie_tt"] = losses.weighted_mean(losses.info_nce(t, text_pos, text_temp), pair_w)
    if weights.kl_align > 0:
      per_pair = losses.kl_alignment(logits_i2t, logits_t2i, config.kl.direction,
                                     config.kl.stopgrad_target)
      terms["kl_align"] = losses.weighted_mean(per_pair, pair_w)

    use_momentum_global = config.model.mvlm_global_src == "momentum"
    image_global = img_global_m if use_momentum_global else img_global
    text_global = txt_global_m if use_momentum_global else txt_global
    if config.model.mvlm_global_stopgrad:
      image_global, text_global = map(jax.lax.stop_gradient, (image_global, text_global))
    if weights.mlm > 0:
      hidden = apply(params, model.encode_text, batch["mlm_ids"], batch["text_mask"], rng=rng_mlm)
      logits = apply(params, model.mlm_logits, cots_model.gather_positions(hidden, batch["mlm_positions"]),
                     image_global)
      terms["mlm"] = losses.masked_prediction_loss(
          logits, batch["mlm_targets"], batch["mlm_weights"], pair_w)
    if weights.mvm > 0:
      codes = jax.lax.stop_gradient(vq_model.apply(
          state["vq"], batch["image"], method=vq_model.tokenize))
      positions = cots_model.masked_patch_positions(batch["mvm_mask"], num_mvm)
      tokens = apply(params, model.encode_image, batch["image"], batch["mvm_mask"], rng=rng_mvm)
      logits = apply(params, model.mvm_logits, cots_model.gather_positions(tokens[:, 1:], positions), text_global)
      terms["mvm"] = losses.masked_prediction_loss(
          logits, jnp.take_along_axis(codes, positions, axis=1),
          jnp.ones(positions.shape, jnp.float32), pair_w)

    loss = sum(weights[name] * value for name, value in terms.items())
    aux = dict(terms=terms, amf_stats=amf_stats, pair_w=pair_w, keys=(v_m, t_m), temp=temp)
    return loss, aux

  def update(state, batch):
    rng, step_rng = jax.random.split(state["rng"])
    decay = momentum_lib.momentum_decay(
        state["step"], config.momentum.decay, config.momentum.schedule,
        config.momentum.final_decay, config.total_steps)
    # The momentum towers move before the key forward (method §4.4, BriVL / ALBEF).
    params_ema = momentum_lib.ema_update(state["params_ema"], state["params"], decay)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], params_ema, state, batch, step_rng)
    updates, opt = optimizer.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)

    v_m, t_m = aux["keys"]
    enqueue_valid = (jnp.ones_like(aux["pair_w"], bool) if config.amf.enqueue_filtered
                     else aux["pair_w"] > 0)
    queue = queue_lib.enqueue(state["queue"], v_m, t_m, batch["image_id"], enqueue_valid)
    data_skipped = state["data_skipped"] + jnp.sum(batch["skipped"])
    new_state = dict(state, step=state["step"] + 1, params=params, params_ema=params_ema,
                     opt=opt, queue=queue, amf=aux["amf_stats"], rng=rng,
                     data_skipped=data_skipped)
    metrics = {f"train/{name}": value for name, value in aux["terms"].items()}
    metrics.update({
        "train/loss": loss,
        "train/amf_kept": jnp.mean(aux["pair_w"]),
        "train/temp": aux["temp"],
        "train/lr": schedule(state["step"]),
        "train/momentum": decay,
        "train/grad_norm": optax.tree.norm(grads),
        "data/skipped": data_skipped,
    })
    return new_state, metrics

  return update


def jit_update(built):
  """`make_update_fn` of a `state.Built`, jitted with the state donated and its shardings kept."""
  return jax.jit(make_update_fn(built.config, built.model, built.optimizer), donate_argnums=0,
                 out_shardings=(built.shardings, sharding.replicated(built.mesh)))
