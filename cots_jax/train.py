"""The COTS trainer: one linear file in banner sections (design §2).

  optimizer | state | update step | evals | train_and_evaluate
  (logging & workdir, mesh, data, VQ tokenizer, model & state, update step, checkpoint,
  evals, loop)

The only place where the model, the losses, the queue, EMA, the optimizer and sharding meet.
One jitted `update(state, batch) -> (state, metrics)` with donated state does a whole step
(design §3); metrics are read on the host only every `log_every` steps. Checkpoints, resume,
init_from, preemption and the workdir guard rails live in cots_jax/checkpoint.py.
"""

import functools
import json
import math
import re
import time

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax
from orbax.checkpoint import multihost as ocp_multihost
import tqdm

from cots_jax import checkpoint
from cots_jax import config_validation
from cots_jax import losses
from cots_jax import momentum as momentum_lib
from cots_jax import pretrained
from cots_jax import queue as queue_lib
from cots_jax import sharding
from cots_jax import vq_trainer
from cots_jax.data import masking
from cots_jax.data import pipeline
from cots_jax.data import synthetic_video
from cots_jax.evaluators import retrieval
from cots_jax.metrics_writer import MetricWriter
from cots_jax.models import cots as cots_model

# ----------------------------------------------------------------------------------- optimizer


def learning_rate_schedule(config):
  """Linear warm-up from 0 to `optim.lr`, then cosine decay to `optim.end_lr` at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.optim.lr, warmup_steps=config.optim.warmup_steps,
      decay_steps=config.total_steps, end_value=config.optim.end_lr)


def weight_decay_mask(params):
  """True for the weights that decay: matrices and kernels, not biases, norms, embeddings of
  positions / tokens types / [CLS] / [MASK], nor the temperature (method §4.21)."""
  no_decay = ("position", "pos_embed", "cls", "mask_token", "token_type")

  def decays(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path).lower()
    return leaf.ndim >= 2 and not any(word in name for word in no_decay)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config):
  """AdamW on the warm-up + cosine schedule, after global-norm clipping when `optim.grad_clip` > 0."""
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.optim.b1, b2=config.optim.b2,
                      weight_decay=config.optim.weight_decay, mask=weight_decay_mask)
  if config.optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(config.optim.grad_clip), adamw)
  return adamw


# --------------------------------------------------------------------------------------- state


def init_params(config, model, rng):
  """Fresh online parameters: the towers and heads of `model` (with the temporal aggregation for
  video data), plus `temp` when learnable."""
  image_size = config.model.image.image_size
  num_patches = (image_size // config.model.image.patch_size) ** 2
  frames = (config.model.num_frames,) if pipeline.is_video(config) else ()
  params = model.init(
      rng, jnp.zeros((1, *frames, image_size, image_size, 3), jnp.float32),
      jnp.zeros((1, config.input.max_len), jnp.int32),
      jnp.ones((1, config.input.max_len), jnp.int32),
      jnp.zeros((1, num_patches), bool))["params"]
  if config.temp.learnable:
    params = {**params, "temp": jnp.asarray(config.temp.init, jnp.float32)}
  return params


def abstract_params(config, model, mesh):
  """{"params", "params_ema"} as ShapeDtypeStructs with the train state's shardings on `mesh`
  (what eval-only and inference restore from a checkpoint; nothing is allocated)."""
  params = jax.eval_shape(functools.partial(init_params, config, model), jax.random.PRNGKey(0))
  return _with_shardings({"params": params, "params_ema": params}, config, mesh)


def _with_shardings(abstract, config, mesh):
  """ShapeDtypeStructs of state paths (`abstract`) given the NamedShardings of
  `config.sharding_rules` on `mesh`."""
  shardings = sharding.tree_shardings(abstract, mesh, config.sharding_rules,
                                      config.fsdp_min_size)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def init_state(config, model, optimizer, vq_variables, rng):
  """The whole train state as a plain dict (design §3); jit this with `out_shardings`.

  Args:
    config: the run's ConfigDict.
    model: a `CotsModel`.
    optimizer: the optax transformation of `make_optimizer`.
    vq_variables: the frozen VQ tokenizer's variables (stored under "vq", no optimizer state).
    rng: uint32[2] PRNG key.
  """
  init_rng, queue_rng, state_rng = jax.random.split(rng, 3)
  params = init_params(config, model, init_rng)
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "params_ema": jax.tree.map(jnp.copy, params),
      "opt": optimizer.init(params),
      "queue": queue_lib.init_queue(config.queue.size, config.model.embed_dim, queue_rng),
      "amf": losses.amf_init(),
      "vq": vq_variables,
      "rng": state_rng,
      "data_skipped": jnp.zeros((), jnp.int32),  # bad input examples skipped so far, all hosts
  }


def make_mesh(config, devices=None):
  """The mesh of `config.mesh` over `devices` (default all), checked against the global batch,
  which every step splits over all of its devices."""
  mesh = sharding.make_mesh(config.mesh, devices)
  if config.input.batch_size % mesh.size:
    raise ValueError(f"config.input.batch_size={config.input.batch_size} must be a multiple of "
                     f"the {mesh.size} devices of the mesh")
  return mesh


def abstract_state(config, model, optimizer, vq_variables, mesh):
  """The train state's ShapeDtypeStructs, each carrying its NamedSharding from
  `config.sharding_rules` on `mesh`; nothing is allocated (`vq_variables` may be abstract too)."""
  abstract = jax.eval_shape(functools.partial(init_state, config, model, optimizer),
                            vq_variables, jax.random.PRNGKey(config.seed))
  return _with_shardings(abstract, config, mesh)


def state_shardings_of(abstract):
  """The NamedSharding tree of an `abstract_state`."""
  return jax.tree.map(lambda a: a.sharding, abstract)


def create_state(config, model, optimizer, vq_variables, mesh):
  """Shapes first, then shardings, then a jitted init with `out_shardings`, so no state is ever
  whole on one device (design §3).

  Returns:
    (state, abstract_state): the state and its sharded ShapeDtypeStructs.
  """
  abstract = abstract_state(config, model, optimizer, vq_variables, mesh)
  init_fn = functools.partial(init_state, config, model, optimizer)
  state = jax.jit(init_fn, out_shardings=state_shardings_of(abstract))(
      vq_variables, jax.random.PRNGKey(config.seed))
  return state, abstract


# --------------------------------------------------------------------------------- update step


def _gather(tokens, positions):
  """tokens [B, N, D], positions [B, P] int -> [B, P, D]."""
  return jnp.take_along_axis(tokens, positions[..., None], axis=1)


def masked_patch_positions(mvm_mask, num_masked):
  """The indices of the `num_masked` True entries of each row of `mvm_mask` [B, N] -> [B, M].

  The data gives exactly `num_masked` per row (design §8.3), so the shape is static.
  """
  return jnp.argsort(~mvm_mask, axis=1, stable=True)[:, :num_masked].astype(jnp.int32)


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
  image_cfg = config.model.image
  num_patches = (image_cfg.image_size // image_cfg.patch_size) ** 2
  num_mvm = masking.num_mvm_masked(config.input.mvm_prob, num_patches)
  amf_warmup = config_validation.amf_warmup_steps(config)
  weights = config.loss
  schedule = learning_rate_schedule(config)

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
      logits = apply(params, model.mlm_logits, _gather(hidden, batch["mlm_positions"]),
                     image_global)
      terms["mlm"] = losses.masked_prediction_loss(
          logits, batch["mlm_targets"], batch["mlm_weights"], pair_w)
    if weights.mvm > 0:
      codes = jax.lax.stop_gradient(vq_model.apply(
          state["vq"], batch["image"], method=vq_model.tokenize))
      positions = masked_patch_positions(batch["mvm_mask"], num_mvm)
      tokens = apply(params, model.encode_image, batch["image"], batch["mvm_mask"], rng=rng_mvm)
      logits = apply(params, model.mvm_logits, _gather(tokens[:, 1:], positions), text_global)
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


def jit_update(config, model, optimizer, mesh, state_shardings):
  """`make_update_fn` jitted with the state donated and its shardings kept."""
  return jax.jit(make_update_fn(config, model, optimizer), donate_argnums=0,
                 out_shardings=(state_shardings, sharding.replicated(mesh)))


# --------------------------------------------------------------------------------------- evals


def make_embed_fns(model, mesh):
  """Image and text embedders `(params, host batch) -> numpy [b, E]` for the evaluators.

  Every process passes the same batch of b rows (the eval split is the same on every host). The
  rows are padded to a multiple of the mesh's device count and split over all devices, each
  process filling only its own devices' rows; the jitted function gathers the embeddings, so
  every process gets all b of them while each example is embedded once.

  Returns:
    (embed_images(params, image [b, H, W, 3] or clips [b, T, H, W, 3]), embed_texts(params,
    text_ids, text_mask [b, L])).
  """
  rows, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=whole)
  def image_fn(params, image):
    return model.apply({"params": params}, image, method=model.visual_embedding)[0]

  @functools.partial(jax.jit, out_shardings=whole)
  def text_fn(params, text_ids, text_mask):
    return model.apply({"params": params}, text_ids, text_mask, method=model.text_embedding)[0]

  def spread(x):
    """numpy [b, ...] -> a global array of [b + pad, ...] split by rows over the mesh."""
    x = np.asarray(x)
    pad = -x.shape[0] % mesh.size
    if pad:
      x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return jax.make_array_from_callback(x.shape, rows, lambda index: x[index])

  def embed_images(params, image):
    return np.asarray(image_fn(params, spread(image)))[:len(image)]

  def embed_texts(params, text_ids, text_mask):
    return np.asarray(text_fn(params, spread(text_ids), spread(text_mask)))[:len(text_ids)]

  return embed_images, embed_texts


# The name suffix of each encoder's results: eval/<evaluator><suffix>/<metric>.
ENCODER_SUFFIXES = (("", "params"), ("_momentum", "params_ema"))


def make_evaluators(config, split):
  """Every run's evaluators as {name: run(embed_image_fn, embed_text_fn) -> metric dict}:
  image-text retrieval (design §4.1) and COOKIE's unimodal tasks (method §2.1), image instance
  retrieval (images only) and text matching; text matching is left out, with a warning, when no
  eval image has two captions. For video, "retrieval" is video <-> text with `v2t_*`, `t2v_*`
  keys instead of `i2t_*`, `t2i_*`; on the synthetic clips "direction" ranks each query only
  against the clips (or their captions) that differ from its own only in direction.

  Args:
    config: the run's ConfigDict (`eval.ks`, `eval.chunk`).
    split: the `EvalSplit`.
  """
  common = dict(ks=tuple(config.eval.ks), chunk=config.eval.chunk)
  directions = ("v2t", "t2v") if pipeline.is_video(config) else ("i2t", "t2i")
  cross_modal = retrieval.RetrievalEvaluator("retrieval", split, directions=directions, **common)
  evaluators = {"retrieval": cross_modal.run}
  if not pipeline.is_video(config):
    instance = retrieval.ImageInstanceEvaluator("image_instance", split, **common)
    evaluators["image_instance"] = lambda embed_image_fn, _: instance.run(embed_image_fn)
  if config.input.data.name == "synthetic_video":
    groups = synthetic_video.appearance_groups(pipeline.make_source(config, "eval"))
    direction = retrieval.WithinGroupEvaluator("direction", split, groups, directions=directions)
    evaluators["direction"] = direction.run
  try:
    matching = retrieval.TextMatchingEvaluator("text_matching", split, **common)
    evaluators["text_matching"] = lambda _, embed_text_fn: matching.run(embed_text_fn)
  except ValueError as error:
    logging.warning("%s: text matching is not evaluated", error)
  return evaluators


def run_evals(evaluators, embed_fns, state):
  """The metrics of every evaluator for the online and the momentum encoder, as
  `{"eval/<name><suffix>/<metric>": value}` (suffixes: ENCODER_SUFFIXES).

  Args:
    evaluators: from `make_evaluators`.
    embed_fns: from `make_embed_fns`.
    state: a dict with the "params" and "params_ema" trees (the train state, or a restore).
  """
  embed_images, embed_texts = embed_fns
  results = {}
  for suffix, key in ENCODER_SUFFIXES:
    params = state[key]
    # One encoder's evaluators share the split's batches: each is embedded once.
    image_fn = retrieval.memoized_embed_fn(
        lambda b, p=params: embed_images(p, pipeline.visual_input(b)))
    text_fn = retrieval.memoized_embed_fn(
        lambda b, p=params: embed_texts(p, b["text_ids"], b["text_mask"]))
    for name, run in evaluators.items():
      metrics = run(image_fn, text_fn)
      results.update({f"eval/{name}{suffix}/{metric}": value for metric, value in metrics.items()})
  return results


def _eval_summary(results):
  """One line: R@1/5/10 of every evaluator in `results`, both ways for cross-modal ones."""
  grouped = {}
  for key, value in results.items():
    _, name, metric = key.split("/")
    grouped.setdefault(name, {})[metric] = value
  parts = []
  for name, metrics in grouped.items():
    # Cross-modal keys are i2t_r5, t2v_r1, ...: one "<direction> R@1/5/10 a/b/c" per direction.
    by_prefix = {}
    for key, value in metrics.items():
      match = re.fullmatch(r"(?:(\w+)_)?r(\d+)", key)
      if match:
        by_prefix.setdefault(match[1], []).append((match[2], value))
    recalls = [f"{prefix + ' ' if prefix else ''}R@{'/'.join(k for k, _ in pairs)} "
               + "/".join(f"{value:.1f}" for _, value in pairs)
               for prefix, pairs in by_prefix.items()]
    parts.append(f"{name}: {' '.join(recalls)}")
  return "; ".join(parts)


# -------------------------------------------------------------------------- train_and_evaluate


def saved_final_eval(workdir):
  """The final eval metrics a finished run wrote to WORKDIR/final_eval.json ({} if none)."""
  path = epath.Path(workdir) / "final_eval.json"
  return json.loads(path.read_text()) if path.exists() else {}


def train_and_evaluate(config, workdir):
  """Trains COTS (or COOKIE) as `config` says, writing logs, metrics and checkpoints to `workdir`.

  Resumes from WORKDIR's latest checkpoint when there is one. On SIGTERM it saves a checkpoint
  at the current step and returns {} (cots_jax/checkpoint.py); a SIGTERM that arrives while the
  run is being set up (VQ training, restore, compilation) saves after the first step instead of
  killing the process.

  Returns the metrics of the final evaluation (`{"eval/<name>/<metric>": value}`); for a run
  whose latest checkpoint is already at `total_steps`, those it saved, without compiling.
  """
  with checkpoint.PreemptionWatch() as preemption:
    return _train_and_evaluate(config, workdir, preemption)


def _train_and_evaluate(config, workdir, preemption):
  """`train_and_evaluate`, with SIGTERM turned into `preemption.requested(step)`."""
  # --- logging & workdir (fails here if it is unwritable or holds a run of another shape); a
  # pre-trained tower's sizes and tokenizer enter the config first, so config.json has them
  config = pretrained.resolve_pretrained(config)
  config_validation.validate(config)
  is_chief = jax.process_index() == 0
  checkpoint.prepare_workdir(workdir, config, write_config=is_chief)
  writer = MetricWriter(workdir, enabled=is_chief)

  # --- mesh
  mesh = make_mesh(config)

  # --- data
  train_iter = pipeline.make_train_iterator(
      config, process_index=jax.process_index(), process_count=jax.process_count())
  eval_split = pipeline.make_eval_split(config)

  # --- VQ tokenizer (frozen; trained first in this workdir when config.vq.init is empty)
  vq_variables = sharding.replicate_globally(vq_trainer.obtain_tokenizer(config, workdir, writer))

  # --- model & state
  model = cots_model.CotsModel.from_config(config)
  optimizer = make_optimizer(config)
  abstract = abstract_state(config, model, optimizer, vq_variables, mesh)
  state_shardings = state_shardings_of(abstract)
  num_params = sum(x.size for x in jax.tree.leaves(abstract["params"]))
  logging.info("model: %.2fM parameters (online towers + heads)", num_params / 1e6)

  # --- checkpoint: resume from the latest complete one (no fresh state is built first), else a
  # fresh state, with the public weights of model.*.init and then the run of init_from when set
  manager = checkpoint.checkpoint_manager(workdir, config)
  checkpoint.check_free_space(str(manager.directory), checkpoint.state_bytes(abstract))
  if manager.latest_step() is not None:
    state = checkpoint.restore_checkpoint(manager, abstract, train_iter)
  else:
    state, _ = create_state(config, model, optimizer, vq_variables, mesh)
    state = pretrained.init_pretrained_towers(config, state)
    if config.init_from:
      state = checkpoint.load_towers(config.init_from, state, use_ema=config.init_from_ema)
  start_step = int(jax.device_get(state["step"]))
  if start_step >= config.total_steps:
    # A finished run started again (e.g. a whole job re-queued): nothing is compiled or run.
    checkpoint.finish(manager)
    writer.close()
    logging.info("%s already holds the final step %d; nothing to train", workdir, start_step)
    return saved_final_eval(workdir)

  # --- update step
  update = jit_update(config, model, optimizer, mesh, state_shardings)

  # --- evals
  evaluators = make_evaluators(config, eval_split)
  embed_fns = make_embed_fns(model, mesh)

  # --- compile the step before the loop, then wait for every process: CPU (gloo) collectives
  # give up when the processes reach the first one more than 30 s apart.
  first_batch = sharding.global_batch(next(train_iter), mesh)
  compile_start = time.perf_counter()
  update = update.lower(state, first_batch).compile()
  logging.info("update step compiled in %.1f s", time.perf_counter() - compile_start)
  ocp_multihost.sync_global_processes("cots_update_step_compiled")

  # --- loop
  writer.write(start_step, {"data/eval_skipped": eval_split.num_skipped})
  progress = tqdm.tqdm(total=config.total_steps, initial=start_step, disable=not is_chief,
                       unit="step", dynamic_ncols=True, desc="train")
  last_log_time, last_log_step, eval_seconds = time.perf_counter(), start_step, 0.0
  results, preempted = {}, False
  try:
    for step in range(start_step + 1, config.total_steps + 1):
      batch = (first_batch if step == start_step + 1
               else sharding.global_batch(next(train_iter), mesh))
      state, metrics = update(state, batch)
      progress.update(1)
      if step % config.log_every == 0 or step == config.total_steps:
        metrics = jax.device_get(metrics)
        # The gradient too: AMF gives a pair with non-finite scores weight 0, hiding it from
        # the loss.
        non_finite = [f"{name}={metrics[name]}" for name in ("train/loss", "train/grad_norm")
                      if not math.isfinite(metrics[name])]
        if non_finite:
          raise FloatingPointError(
              f"non-finite {', '.join(non_finite)} at step {step}; stopping without saving "
              f"this state (the last good checkpoint, step {manager.latest_step()}, is kept)")
        elapsed = time.perf_counter() - last_log_time - eval_seconds
        metrics["train/pairs_per_sec"] = ((step - last_log_step) * config.input.batch_size
                                          / elapsed)
        writer.write(step, metrics)
        progress.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                             pairs_s=f"{metrics['train/pairs_per_sec']:.0f}")
        last_log_time, last_log_step, eval_seconds = time.perf_counter(), step, 0.0
      is_last = step == config.total_steps
      preempted = not is_last and preemption.requested(step)
      if not preempted and (is_last or (config.eval_every and step % config.eval_every == 0)):
        eval_start = time.perf_counter()
        results = run_evals(evaluators, embed_fns, state)
        writer.write(step, results)
        logging.info("step %d eval: %s", step, _eval_summary(results))
        progress.write(f"step {step}: {_eval_summary(results)}")
        eval_seconds += time.perf_counter() - eval_start
      if (is_last or preempted
          or (config.checkpoint_every and step % config.checkpoint_every == 0)):
        checkpoint.save_checkpoint(manager, step, state, train_iter)
      if preempted:
        message = (f"{preemption.signal_received or 'preemption notice'}: saved checkpoint "
                   f"{step} in {manager.directory} and stopped; run the same command again to "
                   "resume from it")
        logging.warning(message)
        progress.write(message)
        break
  finally:
    progress.close()
    checkpoint.finish(manager)
  writer.close()
  if preempted:
    return {}
  if is_chief and results:
    (epath.Path(workdir) / "final_eval.json").write_text(json.dumps(results, indent=2))
  return results
