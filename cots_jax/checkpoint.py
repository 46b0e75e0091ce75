"""Checkpoints that survive anything: Orbax state + grain iterator, resume, preemption, guards.

On disk, WORKDIR/checkpoints/<step>/ holds one step as two Orbax items:
  state/  the whole train state (design §3: params, params_ema, opt, queue, amf, vq, rng, step,
          data_skipped) as OCDBT / tensorstore array files plus JSON metadata;
  data/   the grain iterator state, one JSON file per process.
No pickle is written or read. Saves are async: `save_checkpoint` blocks the loop only for the
device-to-host copy and writes in the background into `<step>.orbax-checkpoint-tmp*`, which Orbax
renames to `<step>` once every file is written (plus `commit_success.txt` on object stores). A
save that dies half-way (SIGKILL, full disk) leaves only such a tmp directory, which
`latest_step()` and restore ignore, so the last complete checkpoint stays the latest.

WORKDIR, `config.init_from` and `config.vq.init` may be local paths or gs:// URLs (a TPU pod's
workers share one bucket; cots_jax/paths.py): every file goes through etils.epath, which Orbax
uses too. gs:// is the only object store Orbax's array writer (tensorstore) supports.

Resume: a run started in a workdir with checkpoints restores the latest complete one into the
current mesh's shardings (any device count) and continues with exactly the batches, queues, AMF
statistics and random keys an uninterrupted run would have had. The restarted run appends to
metrics.jsonl, so the steps that the stopped run logged after its last checkpoint appear twice
with the same values; readers keep the last record of each step (the run that went on).
"""

import contextlib
import json
import shutil
import signal
import uuid

from absl import logging
from etils import epath
import grain
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

from cots_jax import paths
from cots_jax import vq_trainer
from cots_jax.data import registry
from cots_jax.models import cots

# Fields under config.model that leave the parameter shapes alone; every other model field
# (also ones added later) counts as a change of shape.
MODEL_FIELDS_KEEPING_SHAPES = (
    "dtype", "remat", "pool", "mvlm_global_src", "mvlm_global_stopgrad", "image.dropout",
    "image.init", "image.layer_norm_eps", "image.gelu", "text.dropout", "text.init",
    "text.layer_norm_eps", "text.gelu", "wst_pool", "wst_dropout", "temporal_agg", "num_frames",
    "temporal_layers")
# Fields outside config.model that shape the train state.
STATE_SHAPE_FIELDS = (*(f"vq.{field}" for field in vq_trainer.SHAPE_FIELDS), "queue.size",
                      "temp.learnable")
# Shape fields added after workdirs existed, with the value that a config saved before them
# implied (what the code of that time built), so that such a workdir still resumes.
LEGACY_VALUES = {"model.image.posemb": "learn"}
# A shape fact that no single field holds: COOKIE's cross_model terms add the towers' own
# projections (`models.cots.needs_encoder_projections`).
ENCODER_PROJECTIONS = "loss.cookie_intra_mode=cross_model projections"
# Another: only a temporal transformer on video data has parameters, whose shapes its frame count
# and depth fix; mean pooling has none, and image runs build no temporal module at all.
TEMPORAL_TRANSFORMER = "model.temporal_agg=transformer (num_frames, temporal_layers)"


# ------------------------------------------------------------------------------------- workdir


def _dotted_leaves(tree, prefix=""):
  """{"a.b.c": value} for every non-dict value of a nested dict."""
  leaves = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      leaves.update(_dotted_leaves(value, f"{prefix}{key}."))
    else:
      leaves[f"{prefix}{key}"] = value
  return leaves


def state_shape_fields(config_dict):
  """The config fields (dotted names) that fix the shapes of the train state, with values.

  Args:
    config_dict: the config as plain JSON data (`json.loads(config.to_json_best_effort())`).
  """
  values = _dotted_leaves(config_dict)
  keep = {f"model.{name}" for name in MODEL_FIELDS_KEEPING_SHAPES}
  names = ([n for n in values if n.startswith("model.") and n not in keep]
           + [n for n in LEGACY_VALUES if n not in values] + list(STATE_SHAPE_FIELDS))
  fields = {name: values.get(name, LEGACY_VALUES.get(name)) for name in names}
  fields[ENCODER_PROJECTIONS] = _has_encoder_projections(config_dict)
  fields[TEMPORAL_TRANSFORMER] = _temporal_transformer_shape(config_dict)
  return fields


def _has_encoder_projections(config_dict):
  """`needs_encoder_projections` of a config as JSON data; False for a config saved before
  COOKIE's fields existed."""
  try:
    return cots.needs_encoder_projections(ml_collections.ConfigDict(config_dict))
  except AttributeError:
    return False


def _temporal_transformer_shape(config_dict):
  """[num_frames, temporal_layers] when the config trains a temporal transformer on video data,
  else None (also for a config saved before the video fields existed)."""
  model = config_dict["model"]
  if (model.get("temporal_agg") != "transformer"
      or not registry.is_video(ml_collections.ConfigDict(config_dict))):
    return None
  return [model["num_frames"], model["temporal_layers"]]


def changed_shape_fields(saved, config_dict):
  """Lines `config.<field>: saved <a>, now <b>` for every shape field that differs."""
  before, now = state_shape_fields(saved), state_shape_fields(config_dict)
  return [f"config.{name}: saved {before.get(name)!r}, now {value!r}"
          for name, value in now.items() if before.get(name) != value]


def prepare_workdir(workdir, config, write_config=True):
  """Makes WORKDIR, proves it writable, checks its saved config.json, then writes the new one.

  WORKDIR is a local path or a gs:// URL (cots_jax/paths.py). Writability is proven by writing
  and deleting a small file of a unique name (every process of a pod probes the same bucket).
  The new config.json is written next to it and renamed over it, so a reader sees the old or the
  new file, never half of one.

  Raises:
    OSError when WORKDIR cannot be made or written (at start, before any work).
    ValueError listing, one line per field, the shape fields (`state_shape_fields`) in which the
      config.json already in WORKDIR differs from `config`, unless `config.allow_config_change`.
  """
  directory = epath.Path(workdir)
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-probe-{uuid.uuid4().hex}"
    probe.write_text("probe")
    probe.unlink()
  except Exception as error:  # Object stores also raise auth and HTTP errors that are no OSError.
    raise OSError(f"workdir {workdir!r} is not writable: {error}") from error
  config_dict = json.loads(config.to_json_best_effort())
  path = directory / "config.json"
  if path.exists():
    changes = changed_shape_fields(json.loads(path.read_text()), config_dict)
    if changes and not config.allow_config_change:
      raise ValueError(
          f"{path} was saved with another model shape; its checkpoints would not fit:\n  "
          + "\n  ".join(changes)
          + "\nUse a new workdir, or set --config.allow_config_change=true to start anyway.")
    if changes:
      logging.warning("config.allow_config_change: the shape of the state changed:\n  %s",
                      "\n  ".join(changes))
  if write_config:
    staged = directory / "config.json.tmp"
    staged.write_text(config.to_json_best_effort(indent=2))
    staged.replace(path)


def state_bytes(abstract_state):
  """Bytes of the train state (arrays or ShapeDtypeStructs), uncompressed."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state))


def check_free_space(directory, required_bytes):
  """Raises OSError at start when the local `directory` has less free space than one checkpoint
  needs. A bucket (gs://) has no such limit that a client could ask for: not checked, logged."""
  if not paths.is_local(directory):
    logging.info("%s is not on a local disk: not checking its free space", directory)
    return
  free = shutil.disk_usage(directory).free
  if free < required_bytes:
    raise OSError(f"{directory} has {free / 1e6:.1f} MB free, a checkpoint of this state needs "
                  f"up to {required_bytes / 1e6:.1f} MB; free some space or use another workdir")


# ------------------------------------------------------------------------------- save, restore


def checkpoint_manager(workdir, config):
  """Orbax manager of WORKDIR/checkpoints (items `state` and `data`), async, keeping the last
  `config.keep_checkpoints`."""
  return ocp.CheckpointManager(
      paths.absolute(workdir) / "checkpoints",
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()},
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           enable_async_checkpointing=True, create=True))


@contextlib.contextmanager
def _reported_save_errors(manager):
  """Re-raises any failure of a save (also of the async part, which surfaces at the next save or
  wait) as one clear OSError."""
  try:
    yield
  except Exception as error:  # Orbax / tensorstore raise many types; all mean "not saved".
    raise OSError(
        f"saving a checkpoint to {manager.directory} failed: {error}\nNothing half-written "
        "is taken for a checkpoint: an unfinished save stays in a *.orbax-checkpoint-tmp* "
        "directory, which restore ignores.") from error


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def save_checkpoint(manager, step, state, train_iter):
  """Starts the async save of `state` and the iterator position as checkpoint `step`.

  Blocks the loop while the state is copied to the host (and, first, until the previous async
  save is written). Checks before (one host sync) that the online and momentum parameters are
  finite, so no broken state ever becomes a checkpoint.

  Raises:
    FloatingPointError naming the step when a parameter is NaN or inf (nothing is saved).
    OSError when this save or the previous async one failed.
  """
  if not bool(_all_finite({"params": state["params"], "params_ema": state["params_ema"]})):
    raise FloatingPointError(
        f"non-finite parameters at step {step}; not saving them (the last good checkpoint, "
        f"step {manager.latest_step()}, is kept)")
  with _reported_save_errors(manager):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(train_iter)))


def finish(manager):
  """Waits for the async save in flight, then closes the manager (call before exiting)."""
  try:
    with _reported_save_errors(manager):
      manager.wait_until_finished()
  finally:
    manager.close()


def _shapes_by_path(tree):
  """{"a/b/c": shape} for every leaf (arrays, ShapeDtypeStructs or Orbax ArrayMetadata)."""
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_differences(expected, found):
  """Lines naming the leaves missing from `found`, unexpected in it, or of another shape.

  Args:
    expected: the tree wanted (arrays or ShapeDtypeStructs).
    found: the tree on disk (Orbax metadata: leaves with `.shape`).
  """
  want, have = _shapes_by_path(expected), _shapes_by_path(found)
  return ([f"missing: {p} {want[p]}" for p in sorted(want.keys() - have.keys())]
          + [f"unexpected: {p} {have[p]}" for p in sorted(have.keys() - want.keys())]
          + [f"mis-shaped: {p} is {have[p]} in the checkpoint, {want[p]} here"
             for p in sorted(want.keys() & have.keys()) if want[p] != have[p]])


def restore_checkpoint(manager, abstract_state, train_iter):
  """Restores the latest complete checkpoint into `train_iter`; returns the state (or None).

  Args:
    manager: from `checkpoint_manager`.
    abstract_state: ShapeDtypeStructs with the shardings of the current mesh; the arrays are
      resharded to them, whatever mesh wrote the checkpoint.
    train_iter: the grain iterator; set to the position saved with the state.

  Raises:
    ValueError listing the missing / unexpected / mis-shaped leaves when the checkpoint's state
    does not have the structure of `abstract_state`.
  """
  step = manager.latest_step()
  if step is None:
    return None
  differences = tree_differences(abstract_state, manager.item_metadata(step)["state"].tree)
  if differences:
    raise ValueError(f"checkpoint {step} in {manager.directory} does not fit the configured "
                     "train state:\n  " + "\n  ".join(differences))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(train_iter)))
  logging.info("Resumed from step %d of %s", step, manager.directory)
  return restored["state"]


# ---------------------------------------------------------------------------------- init_from


def checkpoints_directory(path):
  """The checkpoints directory of a workdir, or `path` itself when it is one (local or gs://)."""
  directory = paths.absolute(path)
  return directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory


def restore_params(path, target, step=None, what="checkpoint", optional=()):
  """Restores some parameter trees of a run's checkpoint, and nothing else of its state.

  Args:
    path: the run's workdir, or its checkpoints directory (local or gs://).
    target: {name: tree of ShapeDtypeStructs (with shardings)} for names among "params",
      "params_ema": the trees wanted, in the shapes and shardings wanted.
    step: the checkpoint step; None = the latest complete one.
    what: how errors name `path` (e.g. "config.init_from").
    optional: top-level subtrees of the trees (e.g. "temporal") that the checkpoint may lack;
      those it lacks are left out of `restored`.

  Returns:
    (restored {name: tree of arrays}, step).

  Raises:
    FileNotFoundError when there is no complete checkpoint (or none of `step`); ValueError
    listing the missing, unexpected and mis-shaped parameters when the trees do not match.
  """
  directory = checkpoints_directory(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"{what}={str(path)!r}: no complete checkpoint in {directory}")
  manager = ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    steps = manager.all_steps()
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{what}={str(path)!r}: no complete checkpoint in {directory}")
    if step not in steps:
      raise FileNotFoundError(f"{what}={str(path)!r}: no complete checkpoint of step {step} in "
                              f"{directory} (steps there: {sorted(steps)})")
    saved = manager.item_metadata(step)["state"].tree
    target = {name: {key: value for key, value in tree.items()
                     if key not in optional or key in saved.get(name, {})}
              for name, tree in target.items()}
    differences = tree_differences(target, {name: saved.get(name, {}) for name in target})
    if differences:
      raise ValueError(f"{what}={str(path)!r} (step {step}) does not fit this model:\n  "
                       + "\n  ".join(differences))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))["state"]
  finally:
    manager.close()
  logging.info("Loaded %s from step %d of %s", " and ".join(target), step, directory)
  return restored, step


# Parameter subtrees that a fine-tuning run may add to the model it loads: a video run's temporal
# transformer on an image-text run. They start fresh when the loaded run has none.
ADDED_BY_FINE_TUNING = ("temporal",)


def load_towers(path, state, use_ema=False):
  """`state` with params (and params_ema) of another run's latest checkpoint, for fine-tuning.

  The optimizer, queues, AMF statistics, step and rng of `state` stay as they are (fresh), and
  so do the subtrees of ADDED_BY_FINE_TUNING that the run lacks; every other parameter must be
  in the run's checkpoint, in the same shape.

  Args:
    path: that run's workdir, or its checkpoints directory (local or gs://).
    state: the fresh train state (its params give the wanted shapes and shardings).
    use_ema: True loads the run's momentum towers into params_ema; False starts params_ema as a
      copy of the loaded params (the momentum encoder starts equal to the online one).

  Raises:
    as `restore_params`.
  """
  names = ("params", "params_ema") if use_ema else ("params",)
  target = {name: jax.tree.map(ocp.utils.to_shape_dtype_struct, state["params"]) for name in names}
  restored, _ = restore_params(path, target, what="config.init_from",
                               optional=ADDED_BY_FINE_TUNING)
  fresh = sorted(set(state["params"]) - set(restored["params"]))
  if fresh:
    logging.info("config.init_from has no %s: they start from their fresh initialisation",
                 ", ".join(fresh))
  params = {**state["params"], **restored["params"]}
  params_ema = ({**state["params_ema"], **restored["params_ema"]} if use_ema
                else jax.tree.map(jnp.copy, params))
  return dict(state, params=params, params_ema=params_ema)


# --------------------------------------------------------------------------------- preemption


class PreemptionWatch:
  """Turns SIGTERM (what TPU / SLURM preemption sends) into a request to stop at a step boundary.

  Use as a context manager around the loop and ask `requested(step)` once per step: a Python
  flag, no host sync. With several processes JAX's own preemption notifier (started by
  jax.distributed) catches the signal and `requested` is its sync point, True on every process
  at the same step.
  """

  def __init__(self):
    self.signal_received = None
    self._previous_handler = None

  def __enter__(self):
    if jax.process_count() == 1:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc_info):
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)

  def _on_signal(self, signum, frame):
    del frame
    self.signal_received = signal.Signals(signum).name

  def requested(self, step):
    """True when the run should save at `step` and stop."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal_received is not None
