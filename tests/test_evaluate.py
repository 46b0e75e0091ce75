"""Eval only (`cots_jax.evaluate`), the trained-run loader it shares with search and report, and
fine-tuning with configs/finetune_retrieval.py."""

import functools
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import finetune_retrieval
from cots_jax import config_validation
from cots_jax import inference
from cots_jax import train
from cots_jax.data import eval_split
from cots_jax.data import pipeline
from cots_jax.evaluators import common as evaluators_common
from cots_jax.evaluators import retrieval
from cots_jax.metrics_writer import read_metrics
from cots_jax.models import cots as cots_model
from support import ABSL_INFO, TINY, run_module, tiny_config, tiny_flags

# The overrides of conftest's `trained_run` on top of support.TINY.
RUN_OVERRIDES = {"loss.mvm": 0.0, "loss.mlm": 0.0, "total_steps": 12, "checkpoint_every": 6,
                 "log_every": 3}


def embed_both(model, params, image, text_ids, text_mask):
  """The model's image [n, E] and text [m, E] embeddings, in one pass each."""
  return (model.apply({"params": params}, image, method=model.image_embedding)[0],
          model.apply({"params": params}, text_ids, text_mask, method=model.text_embedding)[0])


def unbatched_metrics(config, workdir, step, params_key):
  """The §4.1 metrics of one checkpoint with every image and caption embedded in one batch,
  from the state file read by Orbax directly."""
  state = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state"))
  params = state[params_key]
  model = cots_model.CotsModel.from_config(config)
  split = eval_split.make_eval_split(config, batch_size=10_000)
  (images,), (texts,) = split.image_batches(), split.text_batches()
  images, texts = ({key: value[batch["valid"]] for key, value in batch.items()}
                   for batch in (images, texts))
  img, txt = jax.jit(functools.partial(embed_both, model))(params, images["image"],
                                                            texts["text_ids"], texts["text_mask"])
  return retrieval.retrieval_metrics(np.asarray(img) @ np.asarray(txt).T, split.txt2img)


def test_eval_in_uneven_batches_equals_one_unbatched_pass(trained_run):
  """20 images and 100 captions in batches of 7: the padded tail adds nothing and loses nothing."""
  config = tiny_config(**RUN_OVERRIDES, **{"eval.batch_size": 7})
  results, step = inference.evaluate_checkpoint(config, trained_run)
  assert step == 12 and set(results) == {
      f"{name}{suffix}" for suffix, _ in evaluators_common.ENCODER_SUFFIXES
      for name in ("retrieval", "text_matching", "image_instance")}
  for suffix, key in evaluators_common.ENCODER_SUFFIXES:
    name = f"retrieval{suffix}"
    want = unbatched_metrics(config, trained_run, 12, key)
    assert results[name].keys() == want.keys()
    np.testing.assert_allclose([results[name][k] for k in want], list(want.values()), rtol=1e-6,
                               err_msg=name)


def test_an_earlier_step_is_evaluated_when_asked_and_a_missing_one_is_named(trained_run):
  config = tiny_config(**RUN_OVERRIDES)
  results, step = inference.evaluate_checkpoint(config, trained_run, step=6)
  assert step == 6
  want = unbatched_metrics(config, trained_run, 6, "params")
  np.testing.assert_allclose([results["retrieval"][k] for k in want], list(want.values()),
                             rtol=1e-6)
  with pytest.raises(FileNotFoundError, match=r"no complete checkpoint of step 5 .*\[6, 12\]"):
    inference.evaluate_checkpoint(config, trained_run, step=5)


def test_a_config_of_another_model_shape_is_refused_with_the_parameter_names(trained_run):
  config = tiny_config(**RUN_OVERRIDES, **{"model.embed_dim": 24})
  with pytest.raises(ValueError,
                     match=r"does not fit the configured state:\n  mis-shaped: params/"):
    inference.evaluate_checkpoint(config, trained_run)
  with pytest.raises(FileNotFoundError, match="not the workdir of a cots_jax run"):
    inference.TrainedRun.load(os.path.join(trained_run, "checkpoints"))


def test_trained_run_embeds_like_the_model_with_either_encoder(trained_run):
  run = inference.TrainedRun.load(trained_run)
  assert run.step == 12 and run.config.total_steps == 12
  model = cots_model.CotsModel.from_config(run.config)
  state = ocp.StandardCheckpointer().restore(
      os.path.join(trained_run, "checkpoints", "12", "state"))
  captions = ["a red square", "two blue circles on the left", "x"]
  ids, mask = pipeline.tokenizer_lib.tokenize(
      pipeline.tokenizer_lib.load_tokenizer(), captions, run.config.input.max_len)
  image = np.random.default_rng(0).uniform(-1, 1, (3, 24, 24, 3)).astype(np.float32)
  reference = jax.jit(functools.partial(embed_both, model))
  for encoder, key in inference.ENCODERS.items():
    want_image, want_text = reference(state[key], image, ids, mask)
    np.testing.assert_allclose(run.embed_texts(captions, encoder), want_text, atol=1e-5)
    np.testing.assert_allclose(run.embed_images(image, encoder), want_image, atol=1e-5)
  with pytest.raises(ValueError, match="encoder 'ema' is unknown"):
    run.embed_texts(captions, "ema")


def test_a_run_config_saved_before_a_field_existed_loads_with_that_fields_default(tmp_path):
  saved = json.loads(tiny_config().to_json_best_effort())
  del saved["eval"]["evaluators"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = inference.load_run_config(str(tmp_path))
  assert config.eval.evaluators == tiny_config().eval.evaluators
  assert config.model.image.width == TINY["model.image.width"]
  config_validation.validate(config)


def test_results_table_has_one_row_per_evaluator_and_every_column():
  metrics = {f"{d}_r{k}": float(k) for d in ("i2t", "t2i") for k in (1, 5)}
  metrics.update(rsum=12.0, i2t_medr=3.5, t2i_medr=2.0, r_mean=3.0)
  table = inference.results_table({"retrieval": metrics, "retrieval_momentum": metrics}, (1, 5))
  header, *rows = table.splitlines()
  assert header.split() == ["i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum", "i2t_medr",
                            "t2i_medr"]
  assert [row.split()[0] for row in rows] == ["retrieval", "retrieval_momentum"]
  assert rows[0].split()[1:] == ["1.00", "5.00", "1.00", "5.00", "12.00", "3.50", "2.00"]
  unimodal = {"r1": 10.0, "r5": 50.0, "medr": 4.5}
  table = inference.results_table({"retrieval": metrics, "text_matching": unimodal,
                                   "image_instance": unimodal}, (1, 5))
  cross_modal, unimodal_table = table.split("\n\n")
  video = {key.replace("i2t", "v2t").replace("t2i", "t2v"): v for key, v in metrics.items()}
  video_table = inference.results_table({"retrieval": video}, (1, 5)).splitlines()
  assert video_table[0].split() == ["v2t_r1", "v2t_r5", "t2v_r1", "t2v_r5", "rsum", "v2t_medr",
                                    "t2v_medr"]
  assert [row.split()[0] for row in cross_modal.splitlines()[1:]] == ["retrieval"]
  header, *rows = unimodal_table.splitlines()
  assert header.split() == ["r1", "r5", "medr"]
  assert [row.split() for row in rows] == [["text_matching", "10.00", "50.00", "4.50"],
                                           ["image_instance", "10.00", "50.00", "4.50"]]


def test_evaluate_command_writes_the_final_eval_of_the_run(trained_run, tmp_path):
  """The command line on a copy of the run: eval_results.json holds, nested, the numbers the
  run itself logged at its last step (same checkpoint, same split)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run, workdir)
  result = run_module("cots_jax.evaluate", "--config=configs/pretrain.py:runlocal",
                      f"--workdir={workdir}", *tiny_flags(**RUN_OVERRIDES))
  assert "checkpoint 12 of" in result.stdout and "retrieval_momentum" in result.stdout
  assert not ABSL_INFO.search(result.stderr)  # Orbax's restore lines: in the workdir's log
  assert "Restoring checkpoint from" in open(os.path.join(workdir, "log.txt")).read()
  written = json.loads(open(os.path.join(workdir, "eval_results.json")).read())
  final = json.loads(open(os.path.join(workdir, "final_eval.json")).read())
  assert {f"eval/{name}/{metric}": value for name, metrics in written.items()
          for metric, value in metrics.items()} == final


def test_finetune_config_needs_init_from_and_turns_on_multi_positive_itc():
  for arg in ("", "runlocal", "data=flickr8k", "model=base"):
    config = finetune_retrieval.get_config(arg)
    assert config.queue.multi_positive and config.queue.in_batch_negatives
    assert config.loss.mlm == config.loss.mvm == config.loss.kl_align == 0 < config.loss.itc
    with pytest.raises(ValueError, match=r"config.init_from='' must name the workdir"):
      config_validation.validate(config)
    config.init_from = "runs/pretrained"
    config_validation.validate(config)


def test_fine_tuning_starts_from_the_run_and_trains_only_itc(trained_run, tmp_path):
  config = tiny_config(finetune_retrieval.get_config("runlocal"), **{
      "init_from": trained_run, "total_steps": 4, "log_every": 1, "checkpoint_every": 0})
  workdir = str(tmp_path / "finetune")
  final = train.train_and_evaluate(config, workdir)
  assert "eval/retrieval/t2i_r1" in final
  logged = read_metrics(workdir)
  assert [record["step"] for record in logged if "train/itc" in record] == [1, 2, 3, 4]
  assert not any("train/mlm" in record or "train/mvm" in record for record in logged)
  # Four steps at lr <= 1e-4 move the loaded towers a little; a fresh init would differ by O(1).
  run = inference.TrainedRun.load(trained_run)
  tuned = inference.TrainedRun.load(workdir)
  assert tuned.step == 4
  difference = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                            run.params["params"], tuned.params["params"])
  assert 0 < max(jax.tree.leaves(difference)) < 0.1
