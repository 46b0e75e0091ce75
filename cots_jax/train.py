"""The COTS trainer: `train_and_evaluate(config, workdir)`, one linear function in banner
sections (design §2), then the loop.

  logging & workdir | mesh | eval data | model & state (abstract) | checkpoint (resume, or a new
  state with the frozen VQ tokenizer) | training stream (with cached features) | update step |
  evals | compile | loop

The state is built by cots_jax/state.py (`build`), the step is cots_jax/step.py's, the evaluators
are those the config names (cots_jax/evaluators/common.py); checkpoints, resume, init_from,
preemption and the workdir guard rails live in cots_jax/checkpoint.py. Metrics are read on the
host only every `log_every` steps. Only cots_jax/main.py imports this module.
"""

import itertools
import json
import math
import time

from absl import logging
from etils import epath
import jax
from orbax.checkpoint import multihost as ocp_multihost
import tqdm

from cots_jax import checkpoint
from cots_jax import features
from cots_jax import paths
from cots_jax import sharding
from cots_jax import state as state_lib
from cots_jax import step as step_lib
from cots_jax import vq_trainer
from cots_jax.data import eval_split
from cots_jax.data import pipeline
from cots_jax.evaluators import common as evaluators_common
from cots_jax.metrics_writer import MetricWriter


# The training pairs whose caption input.caption_noise replaced (pipeline.caption_noise_record).
CAPTION_NOISE_FILE = "caption_noise.json"


def saved_final_eval(workdir):
  """The final eval metrics a finished run wrote to WORKDIR/final_eval.json ({} if none)."""
  path = epath.Path(workdir) / paths.FINAL_EVAL_FILE
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
  # --- logging & workdir (fails here if it is unwritable); a pre-trained tower's sizes and
  # tokenizer enter the config first, so config.json (written once the state fits) has them
  config = state_lib.prepare_config(config)
  is_chief = jax.process_index() == 0
  saved_config = checkpoint.prepare_workdir(workdir)
  writer = MetricWriter(workdir, enabled=is_chief)

  # --- mesh
  mesh = state_lib.make_mesh(config)

  # --- data: the eval split (the training stream follows the state, which a locked tower's
  # cached features come from)
  split = eval_split.make_eval_split(config)

  # --- model & state, abstract (nothing is allocated; the VQ tokenizer of the configured shape)
  built = state_lib.build(config, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(built.abstract["params"]))
  logging.info("model: %.2fM parameters (online towers + heads)", num_params / 1e6)

  # --- checkpoint: resume from the latest complete one (its state holds the VQ tokenizer), else
  # the initial state (public weights of model.*.init, then the run of init_from when set) with
  # the frozen VQ tokenizer, trained first in this workdir when config.vq.init is empty
  manager = checkpoint.checkpoint_manager(workdir, config)
  checkpoint.check_free_space(str(manager.directory), checkpoint.state_bytes(built.abstract))
  resuming = manager.latest_step() is not None
  if resuming:
    state = checkpoint.restore_checkpoint(
        manager, built.abstract, explain=state_lib.shape_change_explainer(saved_config, config,
                                                                          mesh))
  else:
    vq_variables = vq_trainer.obtain_tokenizer(config, workdir, writer)
    state = built.with_vq(vq_variables).initial_state()

  # --- training stream, with the cached features of fully locked towers (computed once)
  train_iter = _training_stream(config, built.model, state["params"], split, workdir)
  if resuming:
    checkpoint.restore_data_position(manager, train_iter)
  if is_chief:
    checkpoint.write_config(workdir, config)
  start_step = int(jax.device_get(state["step"]))
  if start_step >= config.total_steps:
    # A finished run started again (e.g. a whole job re-queued): nothing is compiled or run.
    checkpoint.finish(manager)
    writer.close()
    logging.info("%s already holds the final step %d; nothing to train", workdir, start_step)
    return saved_final_eval(workdir)

  # --- update step (and the unmasked tail's, when configured)
  phases = step_lib.update_phases(built)

  # --- evals
  evaluators = evaluators_common.from_config(config, split)
  embed_fns = evaluators_common.make_embed_fns(built.model, mesh)
  if "params_ema" not in state:
    logging.info("no loss term reads the momentum towers: they and the queues are not kept, and "
                 "evals report the online encoder only")

  # --- compile the step before the loop, then wait for every process: CPU (gloo) collectives
  # give up when the processes reach the first one more than 30 s apart.
  first_batch = sharding.global_batch(next(train_iter), mesh)
  compile_start = time.perf_counter()
  phases = [(first, update.lower(state, first_batch).compile()) for first, update in phases]
  logging.info("update step compiled in %.1f s", time.perf_counter() - compile_start)
  ocp_multihost.sync_global_processes("cots_update_step_compiled")

  # --- loop
  writer.write(start_step, {"data/eval_skipped": split.num_skipped})
  batches = itertools.chain(
      [first_batch], (sharding.global_batch(next(train_iter), mesh) for _ in itertools.count()))
  results, preempted = _loop(
      config, state, phases, batches, start_step, manager, train_iter, writer, preemption,
      evaluate=lambda state: evaluators_common.run_evals(evaluators, embed_fns, state))
  writer.close()
  if preempted:
    return {}
  if is_chief and results:
    (epath.Path(workdir) / paths.FINAL_EVAL_FILE).write_text(json.dumps(results, indent=2))
  return results


def _training_stream(config, model, params, split, workdir):
  """This process's training iterator; the cached features of fully locked towers (computed
  with `params` or read from their cache) go into its batches and into the eval split's. With
  input.caption_noise the replaced pairs are listed in WORKDIR/caption_noise.json."""
  if config.input.caption_noise > 0 and jax.process_index() == 0:
    record = pipeline.caption_noise_record(config)
    (epath.Path(workdir) / CAPTION_NOISE_FILE).write_text(json.dumps(
        {"caption_noise": config.input.caption_noise, "seed": config.seed,
         "replaced": record}, indent=1))
  tables = features.feature_tables(config, model, params, split, workdir)
  if tables is not None:
    split.attach_features(tables.eval)
  return pipeline.make_train_iterator(
      config, process_index=jax.process_index(), process_count=jax.process_count(),
      features=tables.train if tables else None)


def _loop(config, state, phases, batches, start_step, manager, train_iter, writer, preemption,
          evaluate):
  """Steps from `start_step` + 1 to `config.total_steps`: update (the compiled update of the
  step's phase, `step.update_phases`), log every `log_every`, eval, checkpoint; stops early,
  after saving, when `preemption` asks.

  Returns:
    (the metrics of the last eval, whether the run was preempted).
  """
  is_chief = jax.process_index() == 0
  progress = tqdm.tqdm(total=config.total_steps, initial=start_step, disable=not is_chief,
                       unit="step", dynamic_ncols=True, desc="train")
  # pairs/s counts the steps' own time: from one logging step's metrics on the host to the
  # next's (the device_get waits for the steps dispatched before it), minus evals and saves.
  last_log_time, last_log_step, excluded_seconds = time.perf_counter(), start_step, 0.0
  results, preempted = {}, False
  try:
    for step in range(start_step + 1, config.total_steps + 1):
      state, metrics = step_lib.update_of_step(phases, step)(state, next(batches))
      progress.update(1)
      if step % config.log_every == 0 or step == config.total_steps:
        host_metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - last_log_time - excluded_seconds
        _log_train_metrics(step, host_metrics, (step - last_log_step) / elapsed,
                           config, manager, writer, progress)
        last_log_time, last_log_step, excluded_seconds = time.perf_counter(), step, 0.0
      is_last = step == config.total_steps
      preempted = not is_last and preemption.requested(step)
      if not preempted and (is_last or (config.eval_every and step % config.eval_every == 0)):
        eval_start = time.perf_counter()
        results = evaluate(state)
        writer.write(step, results)
        logging.info("step %d eval (%.1f s): %s", step, time.perf_counter() - eval_start,
                     evaluators_common.summary(results))
        progress.write(f"step {step}: {evaluators_common.summary(results)}")
        excluded_seconds += time.perf_counter() - eval_start
      if preempted or manager.should_save(step):
        save_start = time.perf_counter()
        checkpoint.save_checkpoint(manager, step, state, train_iter)
        excluded_seconds += time.perf_counter() - save_start
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
  return results, preempted


def _log_train_metrics(step, metrics, steps_per_sec, config, manager, writer, progress):
  """Writes a logging step's host `metrics` with `train/pairs_per_sec`, after checking that the
  loss and the gradient are finite (AMF gives a pair with non-finite scores weight 0, hiding it
  from the loss, not from the gradient).

  Raises:
    FloatingPointError naming the step and the last good checkpoint (nothing is saved).
  """
  non_finite = [f"{name}={metrics[name]}" for name in ("train/loss", "train/grad_norm")
                if not math.isfinite(metrics[name])]
  if non_finite:
    raise FloatingPointError(
        f"non-finite {', '.join(non_finite)} at step {step}; stopping without saving "
        f"this state (the last good checkpoint, step {manager.latest_step()}, is kept)")
  metrics["train/pairs_per_sec"] = steps_per_sec * config.input.batch_size
  writer.write(step, metrics)
  progress.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                       pairs_s=f"{metrics['train/pairs_per_sec']:.0f}")
