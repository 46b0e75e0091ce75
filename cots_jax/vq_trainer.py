"""Training, saving and loading the VQ tokenizer whose codes are the MVM targets (design §8.1).

Trainer state (`init_vq_state`), a plain dict:
  params:    {"encoder", "decoder", "codebook" [K, C]} of `models.vq.VQTokenizer`.
  usage:     [K] EMA of how often each code is picked per step (dead-code detection).
  embed_sum: [K, C] EMA of the sum of encoder outputs assigned to each code ("ema" mode only).

Codebook update (`config.vq.codebook_update`):
  "ema": codebook = embed_sum / usage (Laplace-smoothed), as in VQ-VAE-2; no codebook gradient.
  "st":  the codebook is learned by gradient through the codebook loss ||sg(z_e) - e||^2.
Both use the straight-through estimator for the encoder and the commitment loss
`config.vq.commitment * ||z_e - sg(e)||^2`. Codes whose usage falls below
`config.vq.dead_code_threshold` are re-seeded from random encoder outputs of the batch. Usage
starts at 0, so the first step re-seeds every code that got fewer than
threshold / (1 - ema_decay) vectors (usually all of them): a data-dependent codebook init.

A trained tokenizer lives in a directory (WORKDIR/vq, local or gs://) as Orbax params +
`tokenizer.json` (its shape fields, checked against the config on load). Pre-training keeps
`{"params": ...}` frozen as `state["vq"]`; with `config.vq.init` empty it trains one first
(`obtain_tokenizer`).
"""

import functools
import json
import os

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from cots_jax import checkpoint
from cots_jax import paths
from cots_jax import sharding
from cots_jax.data import eval_split
from cots_jax.data import pipeline
from cots_jax.metrics_writer import MetricWriter
from cots_jax.models import vq

_LAPLACE_EPS = 1e-5  # smoothing of the EMA cluster sizes, so an empty code never divides by 0.
SHAPE_FIELDS = ("codebook_size", "code_dim", "hidden")
CODEBOOK_UPDATES = ("ema", "st")


def ema_codebook_update(usage, embed_sum, z, codes, decay):
  """One EMA step of the cluster statistics and the codebook they define (VQ-VAE-2).

  Args:
    usage: `[K]` EMA cluster sizes.
    embed_sum: `[K, C]` EMA sums of the vectors assigned to each code.
    z: `[N, C]` encoder outputs of this batch.
    codes: `[N]` int, their assigned codes.
    decay: EMA decay in [0, 1).

  Returns:
    (usage `[K]`, embed_sum `[K, C]`, codebook `[K, C]`), with
    usage' = decay*usage + (1-decay)*counts, embed_sum' = decay*embed_sum + (1-decay)*one_hot^T z,
    codebook = embed_sum' / smoothed(usage'), smoothed(u) = (u + eps) / (sum u + K eps) * sum u.
  """
  onehot = jax.nn.one_hot(codes, usage.shape[0], dtype=jnp.float32)  # [N, K]
  usage = decay * usage + (1.0 - decay) * onehot.sum(0)
  embed_sum = decay * embed_sum + (1.0 - decay) * (onehot.T @ z.astype(jnp.float32))
  total = usage.sum()
  smoothed = (usage + _LAPLACE_EPS) / (total + usage.shape[0] * _LAPLACE_EPS) * total
  return usage, embed_sum, embed_sum / smoothed[:, None]


def usage_update(usage, codes, decay):
  """EMA of per-step code counts: `[K]`, codes `[N]` -> `[K]` (the "st" mode's usage)."""
  counts = jnp.bincount(codes, length=usage.shape[0]).astype(jnp.float32)
  return decay * usage + (1.0 - decay) * counts


def revive_dead_codes(vq_state, z, threshold, rng):
  """Re-seeds every code with usage < threshold from a random row of z.

  A revived code k gets codebook[k] = z[j] for a random j, usage[k] = threshold and (in "ema"
  mode) embed_sum[k] = threshold * z[j], so the EMA codebook keeps it at z[j]. Draws are without
  replacement while the batch has at least K vectors.

  Args:
    vq_state: dict with params.codebook `[K, C]`, usage `[K]`, optionally embed_sum `[K, C]`.
    z: `[N, C]` encoder outputs of the current batch.
    threshold: usage below which a code counts as dead.
    rng: PRNG key.

  Returns:
    (new vq_state, dead `[K]` bool: the codes that were re-seeded).
  """
  codebook = vq_state["params"]["codebook"]
  num_codes = codebook.shape[0]
  dead = vq_state["usage"] < threshold
  picks = jax.random.choice(rng, z.shape[0], (num_codes,), replace=z.shape[0] < num_codes)
  seeds = z[picks].astype(jnp.float32)  # [K, C]: a candidate for every code, used where dead.
  new_state = dict(vq_state)
  new_state["params"] = {**vq_state["params"],
                         "codebook": jnp.where(dead[:, None], seeds, codebook)}
  new_state["usage"] = jnp.where(dead, threshold, vq_state["usage"]).astype(jnp.float32)
  if "embed_sum" in vq_state:
    new_state["embed_sum"] = jnp.where(dead[:, None], threshold * seeds, vq_state["embed_sum"])
  return new_state, dead


def init_vq_state(config, rng, image_shape):
  """The tokenizer trainer's state (module docstring) with zero usage.

  Args:
    config: the whole config (`vq` group and `model.image.patch_size`).
    rng: PRNG key for the parameter init.
    image_shape: `(H, W, 3)` of one training image; H and W must be multiples of the patch.

  Returns:
    dict(params, usage [K]) plus embed_sum [K, C] when config.vq.codebook_update == "ema".
  """
  mode = config.vq.codebook_update
  if mode not in CODEBOOK_UPDATES:
    raise ValueError(f"config.vq.codebook_update must be one of {CODEBOOK_UPDATES}, got {mode!r}")
  model = vq.VQTokenizer.from_config(config)
  params = jax.jit(model.init)(rng, jnp.zeros((1, *image_shape), jnp.float32))["params"]
  num_codes, code_dim = params["codebook"].shape
  state = {"params": params, "usage": jnp.zeros((num_codes,), jnp.float32)}
  if mode == "ema":
    state["embed_sum"] = jnp.zeros((num_codes, code_dim), jnp.float32)
  return state


def tokenizer_params(vq_state):
  """The params `VQTokenizer.tokenize` needs (frozen as the COTS state's "vq")."""
  return vq_state["params"]


def _losses(params, images, model, config):
  """Training loss of one batch -> (loss, (model outputs, loss terms))."""
  out = model.apply({"params": params}, images)
  codebook_vectors = params["codebook"][out["codes"]]  # [B, h, w, C], gradient to the codebook.
  terms = {
      "recon_mse": jnp.mean((out["recon"] - images) ** 2),
      "commitment": jnp.mean((out["z_e"] - jax.lax.stop_gradient(codebook_vectors)) ** 2),
  }
  loss = terms["recon_mse"] + config.vq.commitment * terms["commitment"]
  if config.vq.codebook_update == "st":
    terms["codebook_loss"] = jnp.mean(
        (jax.lax.stop_gradient(out["z_e"]) - codebook_vectors) ** 2)
    loss = loss + terms["codebook_loss"]
  return loss, (out, terms)


def vq_train_step(vq_state, opt_state, images, rng, *, config, optimizer):
  """One tokenizer step: losses, optimizer update, codebook update, dead-code revival.

  Args:
    vq_state: see `init_vq_state`.
    opt_state: `optimizer.init(vq_state["params"])`.
    images: `[B, H, W, 3]` float.
    rng: PRNG key for this step (dead-code revival).
    config: the whole config (static under jit, e.g. via functools.partial).
    optimizer: an optax GradientTransformation over the params.

  Returns:
    (vq_state, opt_state, metrics) with scalar metrics loss, recon_mse, commitment
    (+ codebook_loss in "st" mode), perplexity (of this batch's codes) and dead_codes (codes
    below the usage threshold after this step's usage update, i.e. re-seeded now).
  """
  model = vq.VQTokenizer.from_config(config)
  images = images.astype(jnp.float32)
  (loss, (out, terms)), grads = jax.value_and_grad(_losses, has_aux=True)(
      vq_state["params"], images, model, config)
  updates, opt_state = optimizer.update(grads, opt_state, vq_state["params"])
  params = optax.apply_updates(vq_state["params"], updates)

  z = out["z_e"].reshape(-1, out["z_e"].shape[-1])
  codes = out["codes"].reshape(-1)
  decay = config.vq.ema_decay
  new_state = dict(vq_state)
  if config.vq.codebook_update == "ema":
    usage, embed_sum, codebook = ema_codebook_update(
        vq_state["usage"], vq_state["embed_sum"], z, codes, decay)
    new_state.update(usage=usage, embed_sum=embed_sum,
                     params={**params, "codebook": codebook})
  else:
    new_state.update(usage=usage_update(vq_state["usage"], codes, decay), params=params)
  new_state, dead = revive_dead_codes(new_state, z, config.vq.dead_code_threshold, rng)

  metrics = {"loss": loss, **terms,
             "perplexity": vq.codebook_perplexity(out["codes"], config.vq.codebook_size),
             "dead_codes": dead.sum().astype(jnp.int32)}
  return new_state, opt_state, metrics


def train_vq(config, image_iterator, steps, log_fn=None):
  """Trains a tokenizer from scratch with adam(config.vq.lr).

  Args:
    config: the whole config; the init and revival rngs derive from config.seed.
    image_iterator: iterable of `[B, H, W, 3]` float image batches (at least `steps`).
    steps: number of updates.
    log_fn: optional `log_fn(step, metrics)` called with host floats every
      config.vq.log_every steps and after the last one (step counts from 1).

  Returns:
    The trained vq_state.
  """
  if steps < 1:
    raise ValueError(f"train_vq needs steps >= 1, got {steps}")
  optimizer = optax.adam(config.vq.lr)
  step_fn = jax.jit(lambda s, o, x, r: vq_train_step(s, o, x, r, config=config,
                                                      optimizer=optimizer))
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  batches = iter(image_iterator)
  images = next(batches)
  vq_state = init_vq_state(config, init_rng, images.shape[1:])
  opt_state = optimizer.init(vq_state["params"])
  for step in range(1, steps + 1):
    if step > 1:
      images = next(batches)
    vq_state, opt_state, metrics = step_fn(vq_state, opt_state, images,
                                           jax.random.fold_in(step_rng, step))
    if log_fn is not None and (step % config.vq.log_every == 0 or step == steps):
      log_fn(step, {k: float(v) for k, v in jax.device_get(metrics).items()})
  return vq_state


# ------------------------------------------------------------------------ files and pre-training


def tokenizer_module(config):
  """The `VQTokenizer` for `config` (patch size = the ViT's, design §8.1)."""
  return vq.VQTokenizer.from_config(config)


def random_tokenizer(config, rng):
  """Variables of an untrained tokenizer of the configured shape (for benchmarks and tests)."""
  size = config.model.image.image_size
  model = tokenizer_module(config)
  return {"params": jax.jit(model.init)(rng, jnp.zeros((1, size, size, 3)))["params"]}


def _shape_record(config):
  return {"patch_size": config.model.image.patch_size,
          **{field: config.vq[field] for field in SHAPE_FIELDS}}


def save_tokenizer(directory, params, config):
  """Writes `params` (Orbax) and the tokenizer's shape fields (`tokenizer.json`) to `directory`
  (local or gs://)."""
  directory = paths.absolute(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / "params", sharding.replicate_globally(params), force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    (directory / "tokenizer.json").write_text(json.dumps(_shape_record(config), indent=2))


def find_tokenizer_dir(path):
  """`path` itself when it holds a saved tokenizer, else PATH/vq (a workdir), as an absolute
  `epath.Path` (local or gs://); None if neither."""
  path = paths.absolute(path)
  for candidate in (path, path / "vq"):
    if (candidate / "tokenizer.json").exists():
      return candidate
  return None


def load_tokenizer(path, config):
  """Loads the tokenizer saved in `path` (or PATH/vq; local or gs://) as `{"params": ...}`,
  replicated on every device of every process, whatever number of processes saved it.

  Raises:
    FileNotFoundError when there is none; ValueError naming the `config.vq` / patch fields whose
    values differ from the saved ones.
  """
  directory = find_tokenizer_dir(path)
  if directory is None:
    raise FileNotFoundError(f"config.vq.init={path!r}: no tokenizer.json in it or in its vq/")
  saved = json.loads((directory / "tokenizer.json").read_text())
  wanted = _shape_record(config)
  differing = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
  if differing:
    raise ValueError(f"the tokenizer in {directory} does not match the config "
                     f"(field: saved, configured): {differing}")
  everywhere = sharding.replicated_everywhere()
  target = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=everywhere),
      jax.eval_shape(functools.partial(random_tokenizer, config), jax.random.PRNGKey(0))["params"])
  return {"params": checkpoint.restore_tree(directory / "params", target,
                                            f"config.vq.init={str(path)!r} ({directory})")}


def tokenizer_quality(config, params, images):
  """Design §8.12 on `images` [N, H, W, 3]: code perplexity and reconstruction against the
  per-image mean colour.

  Returns:
    dict(perplexity, codebook_fraction (perplexity / K), recon_mse, mean_colour_mse).
  """
  model = tokenizer_module(config)
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(images))
  mean_colour = images.mean(axis=(1, 2), keepdims=True)
  perplexity = float(vq.codebook_perplexity(out["codes"], config.vq.codebook_size))
  return {
      "perplexity": perplexity,
      "codebook_fraction": perplexity / config.vq.codebook_size,
      "recon_mse": float(jnp.mean((out["recon"] - images) ** 2)),
      "mean_colour_mse": float(np.mean((images - mean_colour) ** 2)),
  }


def eval_images(config):
  """All images of the eval split, `[N, H, W, 3]` float32."""
  batches = eval_split.make_eval_split(config).image_batches()
  return np.concatenate([b["image"][b["valid"]] for b in batches])


def train_and_save(config, workdir):
  """Trains a tokenizer for `config.vq.steps` steps, saves it to WORKDIR/vq, logs its quality.

  Training metrics go to WORKDIR/vq/metrics.jsonl as `vq/<name>`; the quality on the eval
  images is logged and returned. Returns variables `{"params": ...}`.
  """
  directory = epath.Path(workdir) / "vq"
  directory.mkdir(parents=True, exist_ok=True)
  writer = MetricWriter(directory, enabled=jax.process_index() == 0)
  images = pipeline.make_image_iterator(config, config.vq.batch_size, config.seed)
  state = train_vq(config, (batch["image"] for batch in images), config.vq.steps,
                   log_fn=lambda step, m: writer.write(step, {f"vq/{k}": v for k, v in m.items()}))
  params = tokenizer_params(state)
  save_tokenizer(directory, params, config)
  quality = tokenizer_quality(config, params, eval_images(config))
  writer.write(config.vq.steps, {f"vq/eval_{k}": v for k, v in quality.items()})
  writer.close()
  logging.info("VQ tokenizer saved to %s; eval perplexity %.1f of %d codes, recon MSE %.4f "
               "(per-image mean colour %.4f)", directory, quality["perplexity"],
               config.vq.codebook_size, quality["recon_mse"], quality["mean_colour_mse"])
  return {"params": params}, quality


def obtain_tokenizer(config, workdir, writer):
  """The frozen tokenizer of a pre-training run: `config.vq.init`, else one already trained in
  WORKDIR/vq (a resumed run), else a new one trained here first. Logs its eval quality as
  `vq/eval_*` at step 0 of `writer`. With `config.loss.mvm == 0` nothing reads the codes, so an
  untrained tokenizer of the configured shape stands in (the state keeps one tree for every loss
  mix) and nothing is trained or logged."""
  if config.loss.mvm == 0:
    message = "config.loss.mvm is 0: MVM is off, so no VQ tokenizer is trained or loaded"
    logging.info(message)
    print(message, flush=True)
    return random_tokenizer(config, jax.random.PRNGKey(config.seed))
  if config.vq.init or find_tokenizer_dir(workdir) is not None:
    source = config.vq.init or workdir
    logging.info("Using the VQ tokenizer of %s", source)
    variables = load_tokenizer(source, config)
    quality = tokenizer_quality(config, variables["params"], eval_images(config))
  else:
    message = (f"config.vq.init is empty: training a VQ tokenizer for {config.vq.steps} steps "
               f"in {os.path.join(workdir, 'vq')} first")
    logging.info(message)
    print(message, flush=True)
    variables, quality = train_and_save(config, workdir)
  writer.write(0, {f"vq/eval_{k}": v for k, v in quality.items()})
  return variables
