"""Checks a config before anything is built or compiled (design §4.4).

Every problem is reported as a `ValueError` with one line that names the field (`config.x.y=...`).
"""

import math
import re

from cots_jax import locking
from cots_jax import losses
from cots_jax import momentum
from cots_jax import queue
from cots_jax import vq_trainer
from cots_jax.data import masking
from cots_jax.data import pipeline
from cots_jax.data import registry
from cots_jax.data import transforms
from cots_jax.evaluators import common as evaluators_common
from cots_jax.models import bert
from cots_jax.models import cots
from cots_jax.models import temporal
from cots_jax.models import vit

# Every choice is defined beside the code that implements it; validation reads it from there.
CHOICES = {
    "trainer": ("cots", "vq"),  # cots_jax/main.py
    "model.dtype": tuple(cots.DTYPES),
    "model.mvlm_fusion": cots.FUSIONS,
    "model.mvlm_global_src": cots.MVLM_GLOBAL_SOURCES,
    "model.pool": cots.POOLINGS,
    "model.wst_pool": cots.POOLINGS,
    "model.temporal_agg": temporal.AGGREGATIONS,
    "loss.cookie_intra_mode": cots.INTRA_MODES,
    "model.text.gelu": bert.GELU_FORMS,
    "model.image.gelu": bert.GELU_FORMS,
    "model.image.posemb": vit.POSEMBS,
    "model.image.stem": vit.STEMS,
    "vq.codebook_update": vq_trainer.CODEBOOK_UPDATES,
    "momentum.schedule": momentum.MOMENTUM_SCHEDULES,
    "kl.direction": losses.KL_DIRECTIONS,
    "input.mvm_mask": masking.MVM_MASKS,
    "input.augment": transforms.AUGMENTATIONS,
    "input.on_bad_example": pipeline.ON_BAD_EXAMPLE,
}
POSITIVE_INTS = (
    "input.captions_per_image", "total_steps", "log_every", "keep_checkpoints", "model.embed_dim",
    "model.image.image_size", "model.image.patch_size", "model.image.width", "model.image.depth",
    "model.image.heads", "model.text.vocab_size", "model.text.width", "model.text.depth",
    "model.text.heads", "model.text.max_positions", "model.wst_layers",
    "model.num_frames", "model.temporal_layers", "vq.codebook_size", "vq.code_dim", "vq.hidden",
    "vq.batch_size", "queue.size", "input.batch_size", "input.max_len",
    "input.data.num_train_images", "input.data.num_eval_images", "eval.batch_size", "eval.chunk",
    "fsdp_min_size",
)
NON_NEGATIVE = (
    "eval_every", "checkpoint_every", "vq.steps", "loss.itc", "loss.mlm", "loss.mvm",
    "loss.kl_align", "loss.cookie_cm", "loss.cookie_vv", "loss.cookie_tt", "model.wst_width",
    "model.wst_heads", "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip",
    "input.num_workers", "input.prefetch", "amf.warmup_steps", "input.data.clip_frames",
)
UNIT_INTERVAL = ("loss.itc_alpha", "momentum.decay", "momentum.final_decay", "amf.beta",
                 "input.mlm_prob", "input.mvm_prob", "input.flip_prob", "input.view_flip_prob",
                 "vq.ema_decay", "model.wst_dropout")
OBJECTIVES = ("itc", "mlm", "mvm", "kl_align", "cookie_cm", "cookie_vv", "cookie_tt")
def _get(config, dotted):
  value = config
  for key in dotted.split("."):
    value = value[key]
  return value


def _fail(dotted, value, why):
  raise ValueError(f"config.{dotted}={value!r} {why}")


def validate(config):
  """Raises ValueError naming the first invalid field of `config`; returns None when all is well."""
  for dotted, allowed in CHOICES.items():
    if _get(config, dotted) not in allowed:
      _fail(dotted, _get(config, dotted), f"must be one of {allowed}")
  for dotted in POSITIVE_INTS:
    value = _get(config, dotted)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      _fail(dotted, value, "must be a positive integer")
  for dotted in NON_NEGATIVE:
    value = _get(config, dotted)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
      _fail(dotted, value, "must be a finite number >= 0")
  for dotted in UNIT_INTERVAL:
    if not 0.0 <= _get(config, dotted) <= 1.0:
      _fail(dotted, _get(config, dotted), "must lie in [0, 1]")
  _validate_model(config)
  _validate_locks(config)
  _validate_training(config)
  _validate_input(config)
  _validate_sharding(config)
  evaluators_common.check_config(config)


def _validate_model(config):
  image = config.model.image
  if image.image_size % image.patch_size:
    _fail("model.image.image_size", image.image_size,
          f"must be a multiple of config.model.image.patch_size={image.patch_size}")
  if image.posemb == "sincos2d" and image.width % 4:
    _fail("model.image.width", image.width, "must be divisible by 4 for posemb='sincos2d'")
  if image.posemb != "learn" and image.init:
    _fail("model.image.posemb", image.posemb, "must be 'learn' with model.image.init: hub ViT "
          "checkpoints carry learned position embeddings")
  if image.stem == "conv" and image.init:
    _fail("model.image.stem", image.stem, "must be 'patch' with model.image.init: hub ViT "
          "checkpoints carry a patch embedding, not a conv stem")
  if image.stem == "conv" and not vit.fits_conv_stem(image.patch_size):
    _fail("model.image.patch_size", image.patch_size, "must be a power of 2 (>= 2) for "
          "model.image.stem='conv' (one stride-2 convolution per halving)")
  if not 0.0 <= image.token_drop < 1.0:
    _fail("model.image.token_drop", image.token_drop, "must lie in [0, 1)")
  if image.token_drop > 0 and config.loss.mvm > 0:
    _fail("model.image.token_drop", image.token_drop, "must be 0 with loss.mvm > 0: MVM "
          "predicts the masked patches from the tokens of every patch")
  if not 0 <= image.unmasked_tuning_steps < config.total_steps:
    _fail("model.image.unmasked_tuning_steps", image.unmasked_tuning_steps,
          f"must lie in [0, config.total_steps={config.total_steps})")
  if image.unmasked_tuning_steps and not image.token_drop:
    _fail("model.image.unmasked_tuning_steps", image.unmasked_tuning_steps,
          "needs config.model.image.token_drop > 0: without token drop every step is unmasked")
  for tower in ("image", "text"):
    group = config.model[tower]
    if group.width % group.heads:
      _fail(f"model.{tower}.width", group.width,
            f"must be divisible by config.model.{tower}.heads={group.heads}")
  if config.input.max_len > config.model.text.max_positions:
    _fail("input.max_len", config.input.max_len,
          f"exceeds config.model.text.max_positions={config.model.text.max_positions}")
  if config.input.max_len < 3:
    _fail("input.max_len", config.input.max_len, "must leave room for [CLS], a token and [SEP]")
  if config.model.use_wst:
    width = config.model.wst_width or config.model.text.width
    heads = config.model.wst_heads or config.model.text.heads
    if width % heads:
      _fail("model.wst_width", config.model.wst_width,
            f"(0 = the text width) gives {width}, not divisible by {heads} WST heads")


def _validate_locks(config):
  """Tower locks: a valid value, weights that are not random, lr multipliers > 0, and no term
  whose gradient could reach nothing but its own head (design §9.2)."""
  for tower in locking.TOWERS:
    group = config.model[tower]
    locking.tower_lock(config, tower)
    if group.locked != locking.NONE and not (group.init or config.init_from
                                           or group.lock_random_ok):
      _fail(f"model.{tower}.locked", group.locked, f"freezes randomly initialised weights (neither "
            f"config.model.{tower}.init nor config.init_from gives them); set "
            f"--config.model.{tower}.lock_random_ok=True if that is meant")
    if config.optim[f"lr_mult_{tower}"] <= 0:
      _fail(f"optim.lr_mult_{tower}", config.optim[f"lr_mult_{tower}"], "must be > 0")
  frozen = {tower: locking.fully_locked(config, tower) for tower in locking.TOWERS}
  for term, own, other in (("mlm", "text", "image"), ("mvm", "image", "text")):
    if config.loss[term] > 0 and frozen[own] and (
        frozen[other] or config.model.mvlm_fusion == "none"):
      _fail(f"loss.{term}", config.loss[term], f"can train nothing but its own head: the "
            f"{own} tower is locked and the {other} tower's vector does not enter it (locked, or "
            "model.mvlm_fusion='none'); set it to 0")


def _validate_cookie(config):
  """COOKIE's terms against the model and the input they need (method §2.3)."""
  loss = config.loss
  if loss.cookie_text_temp <= 0:
    _fail("loss.cookie_text_temp", loss.cookie_text_temp, "must be > 0")
  if loss.cookie_use_queue and loss.cookie_cm > 0 and loss.itc > 0:
    _fail("loss.cookie_use_queue", True, "makes loss.cookie_cm the queued ITC term, which "
          "loss.itc already is: set one of loss.itc and loss.cookie_cm to 0")
  if loss.cookie_use_queue and loss.cookie_cm > 0 and not config.queue.in_batch_negatives:
    _fail("loss.cookie_use_queue", True, "needs config.queue.in_batch_negatives=True "
          "(InfoNCE's negatives are the other pairs of the batch, then the queue)")
  intra = loss.cookie_vv > 0 or loss.cookie_tt > 0
  if intra and loss.cookie_intra_mode == "cross_model" and not config.model.use_wst:
    _fail("loss.cookie_intra_mode", "cross_model", "compares the WST-level embeddings with the "
          "towers' own: it needs config.model.use_wst=True")
  if loss.cookie_intra_mode != "views":
    return
  if loss.cookie_vv > 0 and not config.input.second_view:
    _fail("loss.cookie_vv", loss.cookie_vv, "in 'views' mode needs two views of each image: "
          "set config.input.second_view=True")
  dropout = max(config.model.text.dropout, config.model.wst_dropout if config.model.use_wst else 0)
  if loss.cookie_tt > 0 and dropout <= 0:
    _fail("loss.cookie_tt", loss.cookie_tt, "in 'views' mode contrasts two dropout passes of each "
          "caption: set config.model.text.dropout (or model.wst_dropout with the WST) > 0")


def _validate_training(config):
  queue.check_queue_size(config.queue.size, config.input.batch_size)
  if not 0 < config.temp.min <= config.temp.init <= config.temp.max:
    _fail("temp.init", config.temp.init,
          f"must lie in [config.temp.min={config.temp.min}, "
          f"config.temp.max={config.temp.max}], min > 0")
  if config.optim.lr <= 0 or config.optim.end_lr < 0:
    _fail("optim.lr", config.optim.lr, "must be > 0 (and config.optim.end_lr >= 0)")
  if config.optim.warmup_steps >= config.total_steps:
    _fail("optim.warmup_steps", config.optim.warmup_steps,
          f"must be smaller than config.total_steps={config.total_steps}")
  if config.require_init_from and not config.init_from:
    _fail("init_from", config.init_from, "must name the workdir of a pre-trained run: this "
          "config fine-tunes one (--config.init_from=RUN)")
  if sum(config.loss[k] for k in OBJECTIVES) <= 0:
    _fail("loss", dict(config.loss), "turns every objective off; give at least one a weight > 0")
  _validate_cookie(config)


def _validate_input(config):
  data = config.input.data
  registry.check_config(config)
  if registry.is_video(config):
    for field, why in (("loss.mvm", "masked vision modelling of video is not built"),
                       ("loss.cookie_vv", "the image-image term needs images")):
      if _get(config, field) > 0:
        _fail(field, _get(config, field), f"must be 0 with video data ({why})")
    if config.input.cache_decoded:
      _fail("input.cache_decoded", True, "must be False with video data (only images are "
            "cached; a clip's frames are read as sampled)")
  if data.name == "synthetic_video" and config.input.augment == "crop_flip" and (
      config.input.flip_prob > 0):
    _fail("input.flip_prob", config.input.flip_prob, "must be 0 for synthetic_video: a mirrored "
          "clip moves the other way than its captions say")
  if config.input.captions_per_image > 1:
    loss = config.loss
    readers = [name for name in ("itc", "kl_align", "mlm", "cookie_tt") if loss[name] > 0]
    if loss.cookie_cm > 0 and loss.cookie_use_queue:
      readers.append("cookie_use_queue")
    if readers or config.amf.enabled or registry.is_video(config) or config.input.group_batches:
      _fail("input.captions_per_image", config.input.captions_per_image,
            "works with the in-batch terms only (loss.cookie_cm, cookie_vv) on images: set "
            f"{', '.join(f'loss.{name}' for name in readers) or 'the others'} to 0, amf.enabled "
            "and input.group_batches to False")
  noise = config.input.caption_noise
  if not 0 <= noise < 1:
    _fail("input.caption_noise", noise, "must be in [0, 1) (the fraction of training pairs "
          "whose caption is replaced)")
  if noise > 0 and (config.input.captions_per_image > 1 or config.input.group_batches):
    _fail("input.caption_noise", noise, "replaces the caption of single pairs: it needs "
          "input.captions_per_image=1 and input.group_batches=False")
  if registry.is_streamed(config):
    _validate_streamed(config)
  for field in ("crop_scale", "view_crop_scale"):
    low, high = config.input[field]
    if not 0 < low <= high <= 1:
      _fail(f"input.{field}", tuple(config.input[field]),
            "must be (low, high), 0 < low <= high <= 1")


def _validate_streamed(config):
  """A streamed training split (webdataset tars) gives no list of its examples: the features
  that need one are refused, naming the field."""
  name = config.input.data.name
  for field, value in (("input.cache_decoded", config.input.cache_decoded),
                       ("input.caption_noise", config.input.caption_noise),
                       ("input.captions_per_image", config.input.captions_per_image > 1),
                       ("input.group_batches", config.input.group_batches)):
    if value:
      _fail(field, _get(config, field), f"needs a list of the training examples, which "
            f"input.data.name={name!r} streams: convert its shards to ArrayRecord (python -m "
            "cots_jax.data.convert, docs/data.md)")
  if config.input.data.shuffle_buffer < 1:
    _fail("input.data.shuffle_buffer", config.input.data.shuffle_buffer, "must be >= 1")


def amf_warmup_steps(config):
  """`amf.warmup_steps` in steps: values below 1 are a fraction of `total_steps` (design §8.2)."""
  warmup = config.amf.warmup_steps
  return int(round(warmup * config.total_steps)) if warmup < 1 else int(warmup)


def _validate_sharding(config):
  axes = [axis for axis, _ in config.mesh]
  if not axes or len(set(axes)) != len(axes) or any(
      not isinstance(size, int) or (size < 1 and size != -1) for _, size in config.mesh):
    _fail("mesh", config.mesh, "must be [(axis, size), ...] with distinct axes and sizes >= 1 "
          "or -1 (the rest), e.g. [('data', -1), ('fsdp', 8)]")
  for rule in config.sharding_rules:
    if len(rule) != 2:
      _fail("sharding_rules", rule, "must be (regex, spec) pairs")
    pattern, spec = rule
    try:
      re.compile(pattern)
    except re.error as e:
      _fail("sharding_rules", rule, f"has an invalid regex: {e}")
    if spec == "fsdp":
      continue
    entries = [] if isinstance(spec, str) else [e for e in spec if e is not None]
    names = [n for e in entries for n in ((e,) if isinstance(e, str) else e)]
    if isinstance(spec, str) or any(n not in axes for n in names):
      _fail("sharding_rules", rule, f"spec must be 'fsdp' or a tuple of mesh axes {axes} / None")
