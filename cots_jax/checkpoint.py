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

Every restore (the train state, the VQ tokenizer, init_from, inference) goes through
`restore_tree`, which reads an Orbax item into the shapes and shardings of the current mesh,
whatever number of processes or devices wrote it, after comparing the wanted tree with the
item's own metadata; a mismatch lists every differing leaf.

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
from flax import traverse_util
import grain
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from cots_jax import locking
from cots_jax import paths

# ------------------------------------------------------------------------------------- workdir


def prepare_workdir(workdir):
  """Makes WORKDIR and proves it writable, by writing and deleting a small file of a unique name
  (every process of a pod probes the same bucket). WORKDIR is a local path or a gs:// URL
  (cots_jax/paths.py).

  Returns:
    The config.json that WORKDIR holds (plain JSON data), or None: what a restore that does not
    fit names the differing fields with (`state.shape_change_explainer`).

  Raises:
    OSError when WORKDIR cannot be made or written (at start, before any work).
  """
  directory = epath.Path(workdir)
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-probe-{uuid.uuid4().hex}"
    probe.write_text("probe")
    probe.unlink()
  except Exception as error:  # Object stores also raise auth and HTTP errors that are no OSError.
    raise OSError(f"workdir {workdir!r} is not writable: {error}") from error
  path = directory / "config.json"
  return json.loads(path.read_text()) if path.exists() else None


def write_config(workdir, config):
  """Writes `config` as WORKDIR/config.json, staged beside it and renamed over it, so a reader
  sees the old or the new file, never half of one. The trainer writes it once its state fits
  the config (restored or new), so config.json always describes the checkpoints beside it."""
  directory = epath.Path(workdir)
  staged = directory / "config.json.tmp"
  staged.write_text(config.to_json_best_effort(indent=2))
  staged.replace(directory / "config.json")


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


def save_policy(config):
  """Orbax's decision of the steps to save: every `checkpoint_every` (0 = none between) and the
  last step. Preemption saves are the trainer's (`PreemptionWatch`), also in one process."""
  policies = [ocp.checkpoint_managers.SpecificStepsPolicy(steps=(config.total_steps,))]
  if config.checkpoint_every:
    policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(config.checkpoint_every))
  return ocp.checkpoint_managers.AnySavePolicy(policies)


def checkpoint_manager(workdir, config):
  """Orbax manager of WORKDIR/checkpoints (items `state` and `data`), async, keeping the last
  `config.keep_checkpoints`, deciding by `save_policy` (`manager.should_save(step)`)."""
  return ocp.CheckpointManager(
      paths.absolute(workdir) / "checkpoints",
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()},
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           enable_async_checkpointing=True, create=True,
                                           save_decision_policy=save_policy(config)))


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
  """Starts the async save of `state` and the iterator position as checkpoint `step` (the
  caller decided to save: `manager.should_save(step)`, or a preemption).

  Blocks the loop while the state is copied to the host (and, first, until the previous async
  save is written). Checks before (one host sync) that the online and momentum parameters are
  finite, so no broken state ever becomes a checkpoint.

  Raises:
    FloatingPointError naming the step when a parameter is NaN or inf (nothing is saved).
    OSError when this save or the previous async one failed.
  """
  if not bool(_all_finite({key: state[key] for key in ("params", "params_ema") if key in state})):
    raise FloatingPointError(
        f"non-finite parameters at step {step}; not saving them (the last good checkpoint, "
        f"step {manager.latest_step()}, is kept)")
  with _reported_save_errors(manager):
    manager.save(step, force=True, args=ocp.args.Composite(
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


def tree_differences(expected, found, notes=None):
  """Lines naming the leaves missing from `found`, unexpected in it, or of another shape.

  Args:
    expected: the tree wanted (arrays or ShapeDtypeStructs).
    found: the tree on disk (Orbax metadata: leaves with `.shape`).
    notes: optional {leaf path: text} added to that leaf's line in brackets.
  """
  want, have = _shapes_by_path(expected), _shapes_by_path(found)
  notes = notes or {}

  def noted(path, line):
    return f"{line} [{notes[path]}]" if path in notes else line

  return ([noted(p, f"missing: {p} {want[p]}") for p in sorted(want.keys() - have.keys())]
          + [noted(p, f"unexpected: {p} {have[p]}") for p in sorted(have.keys() - want.keys())]
          + [noted(p, f"mis-shaped: {p} is {have[p]} in the checkpoint, {want[p]} here")
             for p in sorted(want.keys() & have.keys()) if want[p] != have[p]])


def differing_paths(expected, found):
  """The leaf paths ("a/b/c") in which two trees differ: missing, unexpected or of another
  shape."""
  want, have = _shapes_by_path(expected), _shapes_by_path(found)
  return sorted((want.keys() ^ have.keys())
                | {p for p in want.keys() & have.keys() if want[p] != have[p]})


def saved_tree(directory):
  """The tree of the Orbax item at `directory` (local or gs://), each leaf's metadata with
  `.shape` and `.dtype`; nothing is read but the metadata."""
  return ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory)).tree


def restore_tree(directory, target, what, partial=False, optional=(), explain=None):
  """Reads the Orbax item at `directory` into `target`: the one restore of the project.

  Each array is read straight into the shape and the sharding of its ShapeDtypeStruct in
  `target` (the current mesh), whatever number of processes or devices saved it: each process
  reads only the shards its devices hold.

  Args:
    directory: an Orbax PyTree item (a checkpoint's `<step>/state`, a tokenizer's `params`),
      local or gs://.
    target: the wanted tree of ShapeDtypeStructs with shardings.
    what: how errors name the item (e.g. "checkpoint 20 in DIR", "config.init_from='run'").
    partial: True reads only the top-level subtrees of `target` (e.g. "params"), the others
      saved beside them are neither read nor reported.
    optional: keys of the second level of `target` (e.g. "temporal" under "params") that the
      item may lack; those it lacks are left out of what is read and of the result.
    explain: called with the differing leaf paths when the item does not fit; returns
      {path: note} (e.g. the config field that shapes that leaf) for the error's lines.

  Returns:
    The restored tree, the structure of `target`.

  Raises:
    ValueError listing the missing, unexpected and mis-shaped leaves when the item does not
    have the structure of `target` (compared with the item's metadata before anything is read).
  """
  saved = saved_tree(directory)
  if optional:
    target = {name: {key: value for key, value in tree.items()
                     if key not in optional or key in saved.get(name, {})}
              for name, tree in target.items()}
  if partial:
    saved = {key: saved.get(key, {}) for key in target}
  paths = differing_paths(target, saved)
  if paths:
    notes = explain(paths) if explain else {}
    raise ValueError(f"{what} does not fit the configured state:\n  "
                     + "\n  ".join(tree_differences(target, saved, notes)))
  return ocp.PyTreeCheckpointer().restore(
      epath.Path(directory), args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=partial))


def restore_checkpoint(manager, abstract_state, train_iter=None, explain=None):
  """Restores the state of the latest complete checkpoint, and the data position saved with it
  into `train_iter` when given (else later, by `restore_data_position`); None when there is no
  checkpoint.

  Args:
    manager: from `checkpoint_manager`.
    abstract_state: ShapeDtypeStructs with the shardings of the current mesh; the arrays are
      resharded to them, whatever mesh wrote the checkpoint.
    train_iter: the grain iterator, or None.
    explain: as `restore_tree`'s.

  Raises:
    ValueError listing the missing / unexpected / mis-shaped leaves when the checkpoint's state
    does not have the structure of `abstract_state`.
  """
  step = manager.latest_step()
  if step is None:
    return None
  state = restore_tree(manager.directory / str(step) / "state", abstract_state,
                       f"checkpoint {step} in {manager.directory}", explain=explain)
  logging.info("Resumed from step %d of %s", step, manager.directory)
  if train_iter is not None:
    restore_data_position(manager, train_iter)
  return state


def restore_data_position(manager, train_iter):
  """Sets `train_iter` to the data position saved with the latest checkpoint (when this many
  processes saved it; otherwise the stream starts again, with a warning)."""
  step = manager.latest_step()
  saved_by = _data_position_layout(manager.directory / str(step) / "data")
  if saved_by == jax.process_count():
    manager.restore(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(train_iter)))
  else:
    logging.warning(
        "checkpoint %d holds the data position of %s processes, this run has %d: the data "
        "stream starts again from its first example (an exact position across process counts "
        "is not built yet)", step, saved_by, jax.process_count())


def _data_position_layout(directory):
  """How many processes saved the grain iterator positions in `directory` (their files are
  `process_<i>-of-<n>.json`); None when it holds none."""
  counts = {int(path.name.rsplit("-of-", 1)[1].split(".")[0])
            for path in directory.glob("process_*-of-*.json")}
  return counts.pop() if len(counts) == 1 else None


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
  finally:
    manager.close()
  restored = restore_tree(directory / str(step) / "state", target,
                         f"{what}={str(path)!r} (step {step})", partial=True, optional=optional)
  logging.info("Loaded %s from step %d of %s", " and ".join(restored), step, directory)
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
    use_ema: True loads the run's momentum towers into params_ema (a leaf that the run locked,
      and so kept no momentum copy of, comes from its params); False starts params_ema as a copy
      of the loaded params (the momentum encoder starts equal to the online one).

  Raises:
    as `restore_params`; ValueError when `use_ema` and the run has no momentum encoder.
  """
  wanted = jax.tree.map(ocp.utils.to_shape_dtype_struct, state["params"])
  restored, step = restore_params(path, {"params": wanted}, what="config.init_from",
                                  optional=ADDED_BY_FINE_TUNING)
  fresh = sorted(set(state["params"]) - set(restored["params"]))
  if fresh:
    logging.info("config.init_from has no %s: they start from their fresh initialisation",
                 ", ".join(fresh))
  params = {**state["params"], **restored["params"]}
  if "params_ema" not in state:
    return dict(state, params=params)
  if use_ema:
    momentum = locking.momentum_tree(params, _momentum_towers(path, step, wanted))
    params_ema = locking.like(momentum, state["params_ema"])
  else:
    params_ema = jax.tree.map(jnp.copy, locking.like(params, state["params_ema"]))
  return dict(state, params=params, params_ema=params_ema)


def _momentum_towers(path, step, wanted):
  """The params_ema leaves that step `step` of the run at `path` saved (its trainable leaves),
  in the shapes and shardings of `wanted` (the params tree).

  Raises:
    ValueError when that checkpoint has no params_ema (no term of the run read a momentum
    encoder); as `restore_params` when its leaves do not fit `wanted`.
  """
  saved = saved_tree(checkpoints_directory(path) / str(step) / "state").get("params_ema")
  if not saved:
    raise ValueError(f"config.init_from_ema=True: config.init_from={str(path)!r} has no "
                     "momentum encoder (no term of its objective read one); set "
                     "config.init_from_ema=False")
  flat_wanted = traverse_util.flatten_dict(wanted)
  target = traverse_util.unflatten_dict({
      key: flat_wanted[key] for key in traverse_util.flatten_dict(saved) if key in flat_wanted})
  return restore_params(path, {"params_ema": target}, step=step,
                        what="config.init_from")[0]["params_ema"]


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
