"""The unimodal evaluators of COOKIE (issue 9): text matching and image instance retrieval, on
fake splits against a brute-force numpy reference, and on a tiny synthetic eval split."""

import types

import numpy as np
import pytest

from configs import common
from cots_jax.data import eval_split
from cots_jax.evaluators import common as evaluators_common
from cots_jax.evaluators import retrieval


def reference_ranks(sim, query_groups, gallery_groups, exclude_self):
  """Rank of each query that has a relevant item: 1 + the gallery items of another group (not
  the query itself with exclude_self) scoring >= the best relevant score."""
  ranks = []
  for q, group in enumerate(query_groups):
    others = [g for g in range(len(gallery_groups)) if not (exclude_self and g == q)]
    relevant = [sim[q, g] for g in others if gallery_groups[g] == group]
    if relevant:
      ranks.append(1 + sum(sim[q, g] >= max(relevant) for g in others
                           if gallery_groups[g] != group))
  return np.array(ranks)


def reference_metrics(sim, query_groups, gallery_groups, ks, exclude_self=False):
  ranks = reference_ranks(sim, query_groups, gallery_groups, exclude_self)
  return {**{f"r{k}": 100.0 * np.mean(ranks <= k) for k in ks}, "medr": float(np.median(ranks)),
          "meanr": float(np.mean(ranks))}


def batches_of_indices(n, batch_size, key):
  """Batches whose `key` [b, 1] holds the row index (-1 on padding rows marked invalid)."""
  for start in range(0, n, batch_size):
    indices = np.arange(start, start + batch_size)
    yield {key: np.where(indices < n, indices, -1)[:, None], "valid": indices < n}


def text_split(txt2img, batch_size=4):
  """A split whose text batches carry the caption index in `text_ids`."""
  txt2img = np.asarray(txt2img)
  return types.SimpleNamespace(
      txt2img=txt2img,
      text_batches=lambda: batches_of_indices(len(txt2img), batch_size, "text_ids"))


def view_split(num_images, batch_size=3):
  """A split whose view batches carry (seed, image index) in `image`, recording the seeds."""
  split = types.SimpleNamespace(num_images=num_images, seeds=[])

  def view_batches(seed):
    split.seeds.append(seed)
    for batch in batches_of_indices(num_images, batch_size, "image"):
      yield {"image": np.concatenate([np.full_like(batch["image"], seed), batch["image"]], axis=1),
             "valid": batch["valid"]}

  split.view_batches = view_batches
  return split


def lookup(table):
  """embed_fn: the row of `table` named by column 0 of the batch's ids (zeros for padding)."""
  padded = np.vstack([table, np.zeros((1, table.shape[1]))])
  return lambda batch: padded[batch["text_ids"][:, 0]]


# ----------------------------------------------------------------------------- text matching


def test_text_matching_one_hot_image_embeddings_score_100():
  txt2img = np.array([0, 0, 1, 1, 1, 2, 3, 3])  # image 2 has one caption: no query
  evaluator = retrieval.TextMatchingEvaluator("text_matching", text_split(txt2img), ks=(1, 5))
  got = evaluator.run(lookup(np.eye(4)[txt2img]))
  assert got == {"r1": 100.0, "r5": 100.0, "medr": 1.0, "meanr": 1.0}


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_text_matching_matches_reference(chunk):
  rng = np.random.default_rng(0)
  txt2img = rng.integers(0, 6, 21)
  table = np.round(rng.normal(size=(21, 3)))  # ties too
  got = retrieval.TextMatchingEvaluator("tm", text_split(txt2img, 5), chunk=chunk).run(
      lookup(table))
  want = reference_metrics(table @ table.T, txt2img, txt2img, (1, 5, 10), exclude_self=True)
  assert list(got) == list(want)
  assert got == pytest.approx(want)


def test_text_matching_errors():
  with pytest.raises(ValueError, match="'tm'.*two or more captions"):
    retrieval.TextMatchingEvaluator("tm", text_split([0, 1, 2]))
  with pytest.raises(ValueError, match="ks must be"):
    retrieval.TextMatchingEvaluator("tm", text_split([0, 0]), ks=())
  split = text_split([0, 0, 1])
  split.text_batches = text_split([0, 0]).text_batches
  with pytest.raises(ValueError, match=r"'tm'.*embedded 2 texts.*has 3"):
    retrieval.TextMatchingEvaluator("tm", split).run(lookup(np.eye(3)))


# ------------------------------------------------------------------- image instance retrieval


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_image_instance_queries_seed_0_views_against_seed_1_views(chunk):
  rng = np.random.default_rng(1)
  n = 10
  tables = np.round(rng.normal(size=(2, n + 1, 3)) * 2)  # view table per seed; row n: padding
  split = view_split(n)
  got = retrieval.ImageInstanceEvaluator("ii", split, ks=(1, 2, 5), chunk=chunk).run(
      lambda batch: tables[batch["image"][:, 0], batch["image"][:, 1]])
  assert split.seeds == [0, 1]
  sim = tables[0, :n] @ tables[1, :n].T
  assert got == pytest.approx(reference_metrics(sim, range(n), range(n), (1, 2, 5)))
  assert got != pytest.approx(reference_metrics(sim.T, range(n), range(n), (1, 2, 5)))


def test_image_instance_count_mismatch_raises():
  split = view_split(5)
  split.num_images = 6
  with pytest.raises(ValueError, match=r"'ii'.*embedded 5 images.*has 6"):
    retrieval.ImageInstanceEvaluator("ii", split).run(lambda batch: np.ones((3, 2)))


def test_image_instance_on_a_synthetic_eval_split():
  """Views of the whole area without flip are the images themselves: unit pixel vectors find
  their own image first. With smaller crops the metrics are the reference's on the views of
  seeds 0 and 1, and no longer perfect."""
  config = common.base_config("tiny")
  config.input.data.num_eval_images = 12
  config.input.view_crop_scale = (1.0, 1.0)

  def unit_pixels(batch):
    flat = batch["image"].reshape(len(batch["image"]), -1) + 1.0
    return flat / np.linalg.norm(flat, axis=1, keepdims=True)

  split = eval_split.make_eval_split(config, batch_size=5)
  got = retrieval.ImageInstanceEvaluator("ii", split).run(unit_pixels)
  assert got == {"r1": 100.0, "r5": 100.0, "r10": 100.0, "medr": 1.0, "meanr": 1.0}

  config.input.view_crop_scale = (0.3, 0.5)
  split = eval_split.make_eval_split(config, batch_size=5)
  views = [retrieval.embed_dataset(unit_pixels, split.view_batches(seed)) for seed in (0, 1)]
  got = retrieval.ImageInstanceEvaluator("ii", split).run(unit_pixels)
  assert got == pytest.approx(reference_metrics(views[0] @ views[1].T, range(12), range(12),
                                                (1, 5, 10)))
  assert got["r1"] < 100.0


# ------------------------------------------------------------------- one embedding per batch


def test_memoized_embed_fn_runs_once_per_distinct_batch():
  calls = []

  def embed(batch):
    calls.append(batch["x"].copy())
    return batch["x"] * 2.0

  memo = retrieval.memoized_embed_fn(embed)
  a = {"x": np.arange(4.0).reshape(2, 2), "valid": np.ones(2, bool)}
  np.testing.assert_array_equal(memo(a), a["x"] * 2)
  np.testing.assert_array_equal(memo({k: v.copy() for k, v in a.items()}), a["x"] * 2)
  assert len(calls) == 1
  memo({**a, "valid": np.array([True, False])})  # another array, another batch
  memo({"x": a["x"].astype(np.float32), "valid": a["valid"]})  # another dtype, another batch
  assert len(calls) == 3


def test_run_evals_embeds_each_batch_once_per_encoder_and_scores_as_unshared():
  """Retrieval and text matching read the same caption batches; with both encoders the texts
  are embedded twice in all (once each), and the metrics are those of the evaluators run alone."""
  config = common.base_config("tiny")
  config.input.data.num_eval_images = 6
  split = eval_split.make_eval_split(config, batch_size=4)
  counts = {"images": 0, "texts": 0}

  def embed_images(params, images):
    counts["images"] += 1
    return params["w"] * images.reshape(len(images), -1)[:, :8]

  def embed_texts(params, ids, mask):
    counts["texts"] += 1
    return params["w"] * np.pad(ids * mask, ((0, 0), (0, 8)))[:, :8].astype(np.float32)

  def unused(params, features):
    raise AssertionError("no cached features here")

  evaluators = evaluators_common.from_config(config, split)
  results = evaluators_common.run_evals(
      evaluators, evaluators_common.EmbedFns(embed_images, embed_texts, unused, unused),
      {"params": {"w": 1.0}, "params_ema": {"w": 2.0}})
  image_batches, text_batches = len(list(split.image_batches())), len(list(split.text_batches()))
  view_batches = 2 * len(list(split.view_batches(0)))
  assert counts == {"images": 2 * (image_batches + view_batches), "texts": 2 * text_batches}
  alone = retrieval.TextMatchingEvaluator("tm", split).run(
      lambda b: embed_texts({"w": 1.0}, b["text_ids"], b["text_mask"]))
  assert {k: results[f"eval/text_matching/{k}"] for k in alone} == alone
