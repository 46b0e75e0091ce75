"""The update step: one jitted `update(state, batch) -> (state, metrics)` (design §3).

The only place where the model, the losses, the queue, EMA, the optimizer and sharding meet
(design §9.1; `cots_jax/state.py` creates them). A step reads as: move the momentum towers,
encode the batch with both (`encodings`: embeddings, contrastive logits, AMF weights), add up the
objective's terms of non-zero weight (cots_jax/objectives.py), take the gradient, update, and
enqueue the momentum keys. Its metrics stay on the device until the trainer reads them every
`log_every` steps.
"""

import dataclasses

from absl import logging
import jax
import jax.numpy as jnp
import optax

from cots_jax import config_validation
from cots_jax import locking
from cots_jax import losses
from cots_jax import momentum as momentum_lib
from cots_jax import objectives
from cots_jax import queue as queue_lib
from cots_jax import sharding
from cots_jax import state as state_lib
from cots_jax.models import cots as cots_model

# The step's keys, split from its own key in this order.
STEP_RNGS = ("clean", "mlm", "mvm", "intra")


def clamp_temperature(config, params):
  """`params` with a learnable `temp` clipped to [temp.min, temp.max] after the update (ALBEF),
  so the parameter itself never drifts past a bound where its gradient would vanish."""
  if not config.temp.learnable:
    return params
  return dict(params, temp=losses.clamp_temperature(params["temp"], config.temp.min,
                                                     config.temp.max))


def temperature(config, params):
  """The contrastive temperature: the clamped learned `temp` or the fixed `temp.init`."""
  if config.temp.learnable:
    return losses.clamp_temperature(params["temp"], config.temp.min, config.temp.max)
  return jnp.float32(config.temp.init)


def encodings(passes, params, params_ema, state, batch, rng):
  """The clean online (dropout from `rng`) and momentum passes, the logits of the online
  queries against the momentum keys and the queues, and the AMF weights from the momentum pair
  similarity (design §8.2). Without a momentum encoder (`params_ema` None) the online pass
  alone, every pair weight 1.

  Returns:
    (objectives.Encodings, the AMF statistics after this batch).
  """
  config = passes.config
  temp = temperature(config, params)
  v, t, image_global, text_global = passes.encode(params, batch, rng)
  if params_ema is None:
    return objectives.Encodings(
        v=v, t=t, image_global=image_global, text_global=text_global, temp=temp,
        pair_weights=jnp.ones(v.shape[:1], jnp.float32)), state["amf"]
  v_m, t_m, image_global_m, text_global_m = jax.tree.map(
      jax.lax.stop_gradient, passes.encode(params_ema, batch))
  scores = jnp.sum(v_m * t_m, axis=-1)
  amf_stats = losses.amf_update(state["amf"], scores, config.amf.beta)
  amf_active = jnp.logical_and(config.amf.enabled,
                               state["step"] >= config_validation.amf_warmup_steps(config))
  pair_weights = losses.amf_weights(amf_stats, scores, config.amf.lambda_, amf_active)
  queue, in_batch = state["queue"], config.queue.in_batch_negatives
  return objectives.Encodings(
      v=v, t=t, image_global=image_global, text_global=text_global, v_m=v_m, t_m=t_m,
      image_global_m=image_global_m, text_global_m=text_global_m, temp=temp,
      logits_i2t=losses.contrastive_logits(v, t_m, queue["txt"], queue["valid"], temp, in_batch),
      logits_t2i=losses.contrastive_logits(t, v_m, queue["img"], queue["valid"], temp, in_batch),
      pair_weights=pair_weights), amf_stats


def make_loss_fn(config, model):
  """`loss_fn(params, params_ema, state, batch, rng) -> (loss, aux)`: the weighted sum of the
  active terms (objectives.active_terms), each reduced with the pairs' AMF weights; aux holds
  the terms, the AMF statistics and weights, the momentum keys and the temperature.

  `params_ema` holds the momentum values of the trainable leaves (None without a momentum
  encoder); locked leaves are read under stop_gradient, online and momentum alike."""
  passes = objectives.Passes(config, model)
  terms = objectives.active_terms(config)

  def loss_fn(params, params_ema, state, batch, rng):
    params = locking.stop_locked(config, params)
    if params_ema is not None:
      params_ema = locking.momentum_tree(params, params_ema)
    rngs = dict(zip(STEP_RNGS, jax.random.split(rng, len(STEP_RNGS))))
    enc, amf_stats = encodings(passes, params, params_ema, state, batch, rngs["clean"])
    context = objectives.Context(config, passes, params, batch, enc, state.get("queue"),
                                 state["vq"], rngs)
    values = {name: objectives.reduce(term(context), enc.pair_weights)
              for name, term in terms.items()}
    loss = sum(config.loss[name] * value for name, value in values.items())
    return loss, dict(terms=values, amf_stats=amf_stats, pair_w=enc.pair_weights,
                      keys=(enc.v_m, enc.t_m), temp=enc.temp)

  return loss_fn


def amf_catch_metrics(pair_weights, replaced):
  """How AMF treats the batch's injected pairs (input.caption_noise), summed in the step so the
  trainer reads three scalars at `log_every` instead of per-pair weights.

  Args:
    pair_weights: [B] AMF weights in {0, 1}.
    replaced: bool [B], the pairs whose caption is another image's.

  Returns:
    {"train/noisy_fraction": the batch's share of injected pairs, "train/amf_kept_noisy" /
    "train/amf_kept_clean": the share of injected / clean pairs kept (weight > 0); 1 when the
    batch holds none}.
  """
  noisy = replaced.astype(jnp.float32)
  kept = (pair_weights > 0).astype(jnp.float32)
  kept_share = lambda mask: jnp.where(  # noqa: E731
      jnp.sum(mask) > 0, jnp.sum(kept * mask) / jnp.maximum(jnp.sum(mask), 1.0), 1.0)
  return {"train/noisy_fraction": jnp.mean(noisy),
          "train/amf_kept_noisy": kept_share(noisy),
          "train/amf_kept_clean": kept_share(1.0 - noisy)}


def make_update_fn(config, model, optimizer):
  """Returns `update(state, batch) -> (state, metrics)`, the whole COTS / COOKIE step (design §3).

  Order inside a step (method §1.3, §2.3, §4): EMA update of the momentum towers, clean online
  and momentum passes, ITC / KL logits against the queues, AMF weights, the terms of non-zero
  weight (COOKIE's InfoNCE terms, masked passes for MLM / MVM with targets from the frozen VQ on
  the same image), gradient + AdamW, enqueue of the momentum keys.
  """
  loss_fn = make_loss_fn(config, model)
  schedule = state_lib.learning_rate_schedule(config)

  def update(state, batch):
    rng, step_rng = jax.random.split(state["rng"])
    decay = momentum_lib.momentum_decay(
        state["step"], config.momentum.decay, config.momentum.schedule,
        config.momentum.final_decay, config.total_steps)
    params_ema = None
    if "params_ema" in state:
      # The momentum towers move before the key forward (method §4.4, BriVL / ALBEF).
      params_ema = momentum_lib.ema_update(
          state["params_ema"], locking.like(state["params"], state["params_ema"]), decay)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], params_ema, state, batch, step_rng)
    updates, opt = optimizer.update(grads, state["opt"], state["params"])
    params = clamp_temperature(config, optax.apply_updates(state["params"], updates))
    data_skipped = state["data_skipped"] + jnp.sum(batch["skipped"])
    new_state = dict(state, step=state["step"] + 1, params=params, opt=opt,
                     amf=aux["amf_stats"], rng=rng, data_skipped=data_skipped)
    if params_ema is not None:
      v_m, t_m = aux["keys"]
      enqueue_valid = (jnp.ones_like(aux["pair_w"], bool) if config.amf.enqueue_filtered
                       else aux["pair_w"] > 0)
      new_state.update(params_ema=params_ema, queue=queue_lib.enqueue(
          state["queue"], v_m, t_m, batch["image_id"], enqueue_valid))
    metrics = {f"train/{name}": value for name, value in aux["terms"].items()}
    metrics.update({
        "train/loss": loss,
        "train/amf_kept": jnp.mean(aux["pair_w"]),
        "train/temp": aux["temp"],
        "train/lr": schedule(state["step"]),
        "train/grad_norm": optax.tree.norm(grads),
        "data/skipped": data_skipped,
    })
    if params_ema is not None:
      metrics["train/momentum"] = decay
    if "caption_replaced" in batch:
      metrics.update(amf_catch_metrics(aux["pair_w"], batch["caption_replaced"]))
    return new_state, metrics

  return update


def jit_update(built):
  """`make_update_fn` of a `state.Built`, jitted with the state donated and its shardings kept."""
  return jax.jit(make_update_fn(built.config, built.model, built.optimizer), donate_argnums=0,
                 out_shardings=(built.shardings, sharding.replicated(built.mesh)))


def update_phases(built):
  """The run's jitted updates as `[(first step, update)]` in step order: `jit_update(built)`
  from step 1 and, with model.image.unmasked_tuning_steps = n > 0, from step total_steps - n + 1
  the update of the same model without token drop (FLIP's unmasked tuning)."""
  config = built.config
  phases = [(1, jit_update(built))]
  tail = config.model.image.unmasked_tuning_steps
  if tail:
    unmasked = config.copy_and_resolve_references()
    unmasked.model.image.token_drop = 0.0
    phases.append((config.total_steps - tail + 1, jit_update(dataclasses.replace(
        built, config=unmasked, model=cots_model.CotsModel.from_config(unmasked)))))
    logging.info("steps %d-%d run without token drop (model.image.unmasked_tuning_steps)",
                 phases[1][0], config.total_steps)
  return phases


def update_of_step(phases, step):
  """The update of `phases` (from `update_phases`) that runs step `step` (counted from 1)."""
  return [update for first, update in phases if first <= step][-1]
