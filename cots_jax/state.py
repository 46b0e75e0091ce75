"""The train state and everything that builds it: optimizer, mesh, init / abstract / sharded state.

`build(config, mesh)` is the one way to set up a run (design §9.1): it validates the config
(after a pre-trained tower's sizes entered it), makes the model, the optimizer and the frozen VQ
tokenizer's variables, and the abstract train state with the shardings of
`config.sharding_rules` on `mesh`. The trainer, every benchmark, inference and the tests build
through it, so they all see the same state; `Built.initial_state()` materialises the state a
fresh run starts from (public weights of `model.*.init`, then the run of `init_from`).

The state is a plain dict (design §3):
  step, params, params_ema, opt, queue, amf, vq, rng, data_skipped
where params_ema holds the trainable leaves only, and it and the queue are left out when no loss
term reads the momentum towers (design §9.2).
"""

import dataclasses
import functools
import json
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import optax

from configs import common
from cots_jax import checkpoint
from cots_jax import config_validation
from cots_jax import locking
from cots_jax import losses
from cots_jax import objectives
from cots_jax import pretrained
from cots_jax import queue as queue_lib
from cots_jax import shapes
from cots_jax import sharding
from cots_jax import vq_trainer
from cots_jax.data import registry
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
    name = jax.tree_util.keystr(path, simple=True, separator="/").lower()
    return leaf.ndim >= 2 and not any(word in name for word in no_decay)

  return jax.tree_util.tree_map_with_path(decays, params)


def _adamw(config, lr_mult=1.0):
  """AdamW on the warm-up + cosine schedule scaled by `lr_mult`, decaying `weight_decay_mask`."""
  base = learning_rate_schedule(config)

  def schedule(step):
    return lr_mult * base(step)

  return optax.adamw(schedule if lr_mult != 1 else base, b1=config.optim.b1, b2=config.optim.b2,
                     weight_decay=config.optim.weight_decay, mask=weight_decay_mask)


def make_optimizer(config):
  """AdamW on the warm-up + cosine schedule, after global-norm clipping when `optim.grad_clip`
  > 0.

  With a locked tower or a tower learning-rate multiplier (`optim.lr_mult_image` /
  `lr_mult_text`), an optax `multi_transform` over the groups of `locking.optimizer_group`:
  locked leaves get `set_to_zero` (no moments stored), each tower its own scaled AdamW. Without
  either, a single AdamW, so the state of runs that predate the groups restores unchanged.
  """
  optim = config.optim
  if locking.any_locked(config) or optim.lr_mult_image != 1 or optim.lr_mult_text != 1:
    def labels(params):
      return traverse_util.unflatten_dict({
          path: locking.optimizer_group(config, path)
          for path in traverse_util.flatten_dict(params)})
    adamw = optax.multi_transform(
        {"locked": optax.set_to_zero(), "image": _adamw(config, optim.lr_mult_image),
         "text": _adamw(config, optim.lr_mult_text), "rest": _adamw(config)}, labels)
  else:
    adamw = _adamw(config)
  if optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
  return adamw


# ---------------------------------------------------------------------------------------- mesh


def make_mesh(config, devices=None):
  """The mesh of `config.mesh` over `devices` (default all), checked against the global batch."""
  mesh = sharding.make_mesh(config.mesh, devices)
  check_batch_fits(config, mesh)
  return mesh


def check_batch_fits(config, mesh):
  """Raises ValueError naming the field when the global batch does not split over `mesh`, which
  every step splits it over."""
  if config.input.batch_size % mesh.size:
    raise ValueError(f"config.input.batch_size={config.input.batch_size} must be a multiple of "
                     f"the {mesh.size} devices of the mesh")


# --------------------------------------------------------------------------------------- state


def init_params(config, model, rng):
  """Fresh online parameters: the towers and heads of `model` (with the temporal aggregation for
  video data), plus `temp` when learnable."""
  image_size = config.model.image.image_size
  frames = (config.model.num_frames,) if registry.is_video(config) else ()
  params = model.init(
      rng, jnp.zeros((1, *frames, image_size, image_size, 3), jnp.float32),
      jnp.zeros((1, config.input.max_len), jnp.int32),
      jnp.ones((1, config.input.max_len), jnp.int32),
      jnp.zeros((1, shapes.num_patches(config)), bool))["params"]
  if config.temp.learnable:
    params = {**params, "temp": jnp.asarray(config.temp.init, jnp.float32)}
  return params


def init_state(config, model, optimizer, vq_variables, rng):
  """The whole train state as a plain dict (design §3); jit this with `out_shardings`.

  `params_ema` holds the trainable leaves only (locking.py), and it and the queues exist only
  when a loss term reads them (`objectives.reads_momentum`).

  Args:
    config: the run's ConfigDict.
    model: a `CotsModel`.
    optimizer: the optax transformation of `make_optimizer`.
    vq_variables: the frozen VQ tokenizer's variables (stored under "vq", no optimizer state).
    rng: uint32[2] PRNG key.
  """
  init_rng, queue_rng, state_rng = jax.random.split(rng, 3)
  params = init_params(config, model, init_rng)
  state = {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt": optimizer.init(params),
      "amf": losses.amf_init(),
      "vq": vq_variables,
      "rng": state_rng,
      "data_skipped": jnp.zeros((), jnp.int32),  # bad input examples skipped so far, all hosts
  }
  if objectives.reads_momentum(config):
    state["params_ema"] = jax.tree.map(jnp.copy, locking.trainable_leaves(config, params))
    state["queue"] = queue_lib.init_queue(config.queue.size, config.model.embed_dim, queue_rng)
  return state


def with_shardings(abstract, config, mesh):
  """ShapeDtypeStructs of state paths (`abstract`) given the NamedShardings of
  `config.sharding_rules` on `mesh`."""
  shardings = sharding.tree_shardings(abstract, mesh, config.sharding_rules,
                                      config.fsdp_min_size)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def shardings_of(abstract):
  """The NamedSharding tree of a tree of sharded ShapeDtypeStructs."""
  return jax.tree.map(lambda a: a.sharding, abstract)


# --------------------------------------------------------------------------------------- build


def config_from_json(data):
  """The ConfigDict of a saved config.json (`data`, plain JSON); fields that it predates take
  the defaults of configs/common.py (a field added later defaults to the behaviour before it)."""
  config = common.base_config()
  config.update(data)
  return config


def prepare_config(config):
  """`config` with the sizes (and tokenizer) of a pre-trained tower's checkpoint
  (`pretrained.resolve_pretrained`), validated; raises ValueError naming a bad field."""
  config = pretrained.resolve_pretrained(config)
  config_validation.validate(config)
  return config


@dataclasses.dataclass(frozen=True)
class Built:
  """What a run is made of, before any array of the state exists.

  Attributes:
    config: the prepared config (`prepare_config`).
    mesh: the device mesh.
    model: the `CotsModel`.
    optimizer: the optax transformation of `make_optimizer`.
    vq_variables: the frozen VQ tokenizer's variables, concrete or ShapeDtypeStructs.
    abstract: the train state's ShapeDtypeStructs, each with its NamedSharding on `mesh`.
  """
  config: Any
  mesh: Any
  model: Any
  optimizer: Any
  vq_variables: Any
  abstract: dict

  @property
  def shardings(self):
    """The NamedSharding tree of the train state."""
    return shardings_of(self.abstract)

  @property
  def abstract_params(self):
    """{"params", "params_ema"} of `abstract` (params alone without a momentum encoder): what
    inference restores from a checkpoint."""
    return {key: self.abstract[key] for key in ("params", "params_ema") if key in self.abstract}

  def with_vq(self, vq_variables):
    """This `Built` with the frozen tokenizer `vq_variables` (host-local or global arrays of
    the configured shape; `fresh_state` replicates them on every device of every process)."""
    return dataclasses.replace(self, vq_variables=vq_variables)

  def fresh_state(self):
    """The initialised train state, made by a jitted init with `out_shardings`, so no state is
    ever whole on one device (design §3). An abstract `vq_variables` becomes an untrained
    tokenizer of its shape."""
    vq_variables = self.vq_variables
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(vq_variables)):
      vq_variables = vq_trainer.random_tokenizer(self.config, jax.random.PRNGKey(1))
    vq_variables = sharding.replicate_globally(vq_variables)
    init_fn = functools.partial(init_state, self.config, self.model, self.optimizer)
    return jax.jit(init_fn, out_shardings=self.shardings)(
        vq_variables, jax.random.PRNGKey(self.config.seed))

  def initial_state(self):
    """The state a new run starts from: `fresh_state` with the public weights of
    `model.{image,text}.init`, then the towers of `init_from`'s run when set."""
    state = pretrained.init_pretrained_towers(self.config, self.fresh_state())
    if self.config.init_from:
      state = checkpoint.load_towers(self.config.init_from, state,
                                     use_ema=self.config.init_from_ema)
    return state


def build(config, mesh, vq_variables=None):
  """Sets up the run of `config` on `mesh` (module docstring).

  Args:
    config: the run's ConfigDict; prepared here (`prepare_config`), so a pre-trained tower's
      sizes and tokenizer enter it.
    mesh: from `make_mesh`; the global batch must split over its devices.
    vq_variables: the frozen VQ tokenizer's variables (`vq_trainer.obtain_tokenizer` in a run);
      None = an untrained tokenizer of the configured shape, kept abstract until `fresh_state`
      (benchmarks, compile proofs: the same FLOPs and shapes as a trained one).

  Returns:
    A `Built`.

  Raises:
    ValueError naming the field when the config is invalid or its batch does not fit the mesh.
  """
  config = prepare_config(config)
  check_batch_fits(config, mesh)
  model = cots_model.CotsModel.from_config(config)
  optimizer = make_optimizer(config)
  if vq_variables is None:
    vq_variables = jax.eval_shape(functools.partial(vq_trainer.random_tokenizer, config),
                                  jax.random.PRNGKey(1))
  abstract = jax.eval_shape(functools.partial(init_state, config, model, optimizer),
                            vq_variables, jax.random.PRNGKey(config.seed))
  return Built(config, mesh, model, optimizer, vq_variables,
               with_shardings(abstract, config, mesh))


def shape_change_explainer(saved_json, config, mesh):
  """For `checkpoint.restore_tree(explain=...)`: which config field changed a leaf's shape.

  A field is blamed for a differing leaf when the field's value in the saved config.json
  (`saved_json`), set alone in `config`, gives the leaf back its saved shape: found by building
  the abstract state (no arrays) once per field that differs. Fields whose saved value does not
  build alone are passed over.

  Returns:
    explain(paths) -> {leaf path: "config.<field>: saved <a>, now <b>"} for the paths it can
    blame; {} when there is no saved config.
  """
  def explain(paths):
    if saved_json is None:
      return {}
    now = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
    saved = traverse_util.flatten_dict(
        json.loads(config_from_json(saved_json).to_json_best_effort()), sep=".")
    current = build(config, mesh).abstract
    notes = {}
    for field in sorted(name for name in now if saved.get(name) != now[name]):
      trial = config.copy_and_resolve_references()
      try:
        trial.update_from_flattened_dict({field: saved.get(field)})
        reverted = build(trial, mesh).abstract
      except (ValueError, TypeError, KeyError, AttributeError):
        continue  # e.g. a value that is invalid without the other saved fields
      for path in set(checkpoint.differing_paths(current, reverted)) & set(paths):
        notes.setdefault(path, f"config.{field}: saved {saved.get(field)!r}, now {now[field]!r}")
    return notes

  return explain

