"""The evaluators a config names (cots_jax/evaluators/common.py): choice, options, errors."""

import numpy as np
import pytest

from configs import common
from configs import video_retrieval
from cots_jax import config_validation
from cots_jax.data import eval_split
from cots_jax.evaluators import common as evaluators_common
from cots_jax.evaluators import retrieval


def _image_config(evaluators=None):
  config = common.base_config("tiny")
  config.input.data.num_eval_images = 6
  if evaluators is not None:
    config.eval.evaluators = evaluators
  return config


def test_each_config_names_the_evaluators_its_data_can_have():
  assert [name for name, _ in common.base_config("tiny").eval.evaluators] == [
      "retrieval", "image_instance", "text_matching"]
  assert [name for name, _ in video_retrieval.get_config().eval.evaluators] == [
      "retrieval", "direction", "text_matching"]
  assert [name for name, _ in video_retrieval.get_config("data=msrvtt").eval.evaluators] == [
      "retrieval", "text_matching"]


@pytest.mark.parametrize("evaluators, message", [
    ([("recall", {})], r"names 'recall'; known: \['direction', 'image_instance', "),
    ([("retrieval", {"k": (1,)})], r"'retrieval' has no option \['k'\]; its options are"),
    ([("retrieval", {}), ("retrieval", {})], "lists an evaluator twice"),
    (["retrieval"], r"each entry must be \(name, \{option: value\}\)"),
    ([("direction", {})], "it needs input.data.name='synthetic_video'"),
])
def test_config_validation_names_a_bad_evaluator_list(evaluators, message):
  with pytest.raises(ValueError, match=r"^config.eval.evaluators.*" + message):
    config_validation.validate(_image_config(evaluators))


def test_image_instance_is_refused_for_video_data():
  config = video_retrieval.get_config()
  config.eval.evaluators = [("retrieval", {}), ("image_instance", {})]
  with pytest.raises(ValueError, match="names 'image_instance', which needs images, not video"):
    config_validation.validate(config)


def test_the_listed_evaluators_run_in_order_with_their_own_options():
  config = _image_config([("text_matching", {"ks": (1, 2)}), ("retrieval", {"chunk": 3})])
  split = eval_split.make_eval_split(config, batch_size=4)
  evaluators = evaluators_common.from_config(config, split)
  assert list(evaluators) == ["text_matching", "retrieval"]

  def embed_texts(batch):
    return np.pad(batch["text_ids"] * batch["text_mask"], ((0, 0), (0, 8)))[:, :8] * 1.0

  def embed_images(batch):
    return batch["image"].reshape(len(batch["image"]), -1)[:, :8]

  matching = evaluators["text_matching"](embed_images, embed_texts)
  assert set(k for k in matching if k.startswith("r")) == {"r1", "r2"}
  assert matching == retrieval.TextMatchingEvaluator("t", split, ks=(1, 2)).run(embed_texts)
  assert evaluators["retrieval"](embed_images, embed_texts) == retrieval.RetrievalEvaluator(
      "r", split, chunk=4096).run(embed_images, embed_texts)


def test_eval_summary_lists_every_recall_and_accuracy_of_every_evaluator():
  results = {"eval/retrieval/i2t_r1": 1.0, "eval/retrieval/i2t_r5": 2.0,
             "eval/retrieval/t2i_r1": 3.0, "eval/retrieval/t2i_r5": 4.0,
             "eval/retrieval/rsum": 10.0, "eval/retrieval/r_mean": 2.5,
             "eval/retrieval/i2t_medr": 3.0, "eval/text_matching/r1": 7.0,
             "eval/text_matching/meanr": 2.0, "eval/direction/t2v_r1": 50.0,
             "eval/zeroshot/colour_top1": 40.0, "eval/zeroshot/colour_top5": 90.0,
             "eval/zeroshot/colour_mean_per_class_recall": 41.0, "eval/zeroshot/shape_top1": 30.0}
  assert evaluators_common.summary(results) == (
      "retrieval: i2t R@1/5 1.0/2.0 t2i R@1/5 3.0/4.0; text_matching: R@1 7.0; "
      "direction: t2v R@1 50.0; zeroshot: colour top-1/5 40.0/90.0 shape top-1 30.0")
