"""The retrieval-cost benchmark: the cross-encoder it compares against, its extrapolation and FLOP
arithmetic (against hand computations), its device top-k, and its command line end to end."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from cots_jax.benchmarks import retrieval_cost
from cots_jax.evaluators import retrieval
from cots_jax.models import cross_encoder
from support import run_module, tiny_config, tiny_flags

PAIRS, LENGTH = 3, 6


@pytest.fixture(scope="module")
def encoder_and_params():
  """A tiny cross-encoder (24 px images in 8 px patches, width 32, one block), its parameters and
  PAIRS pairs of random inputs whose captions end in two padding tokens."""
  encoder = cross_encoder.CrossEncoder(image_size=24, patch_size=8, vocab_size=50,
                                       max_positions=LENGTH, width=32, depth=1, heads=2)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(PAIRS, 24, 24, 3)), jnp.float32)
  text_ids = jnp.asarray(rng.integers(1, 50, (PAIRS, LENGTH)), jnp.int32)
  text_mask = jnp.asarray(np.arange(LENGTH) < LENGTH - 2, jnp.int32)[None].repeat(PAIRS, 0)
  abstract = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), images, text_ids, text_mask)
  return encoder, retrieval_cost.random_like(abstract, rng), (images, text_ids, text_mask)


def test_cross_encoder_scores_each_pair_from_both_inputs(encoder_and_params):
  encoder, params, (images, text_ids, text_mask) = encoder_and_params
  score = jax.jit(encoder.apply)
  scores = score(params, images, text_ids, text_mask)
  assert scores.shape == (PAIRS,) and scores.dtype == jnp.float32
  embed = lambda method, x: jax.eval_shape(functools.partial(encoder.apply, method=method),
                                           params, x).shape
  assert embed(encoder.embed_image, images) == (PAIRS, 1 + 9, 32)
  assert embed(encoder.embed_text, text_ids) == (PAIRS, LENGTH, 32)

  new_caption = score(params, images, text_ids.at[0, 1].set(text_ids[0, 1] % 49 + 1), text_mask)
  new_image = score(params, images.at[1].multiply(-1.0), text_ids, text_mask)
  new_padding = score(params, images, text_ids.at[:, -1].set(7), text_mask)
  assert new_caption[0] != scores[0] and new_image[1] != scores[1]
  # Each pair's score reads only its own image and caption, never the padding.
  np.testing.assert_array_equal(new_caption[1:], scores[1:])
  np.testing.assert_array_equal(np.asarray(new_image)[[0, 2]], np.asarray(scores)[[0, 2]])
  np.testing.assert_allclose(new_padding, scores, rtol=1e-6)


def test_cross_encoder_from_config_is_the_image_tower_size():
  config = tiny_config()
  encoder = cross_encoder.CrossEncoder.from_config(config)
  image = config.model.image
  assert (encoder.width, encoder.depth, encoder.heads, encoder.mlp_ratio, encoder.num_patches) == (
      image.width, image.depth, image.heads, image.mlp_ratio, 9)
  assert encoder.vocab_size == config.model.text.vocab_size


def test_pair_flops_match_xla_within_ten_percent():
  config = tiny_config(**{"model.image.width": 128, "model.image.heads": 4})
  encoder = cross_encoder.CrossEncoder.from_config(config)
  image_tokens = jnp.zeros((1, 10, 128))
  text_tokens, text_mask = jnp.zeros((1, 36, 128)), jnp.ones((1, 36))
  variables = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)),
                             jnp.zeros((1, 36), jnp.int32), text_mask)
  score = lambda v, *x: encoder.apply(v, *x, method=encoder.score)
  compiled = jax.jit(score).lower(variables, image_tokens, text_tokens, text_mask).compile()
  assert retrieval_cost.cross_encoder_flops(config)["pair"] == pytest.approx(
      compiled.cost_analysis()["flops"], rel=0.1)


def test_chunked_top_k_finds_what_the_evals_top_k_finds():
  queries = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
  gallery = np.random.default_rng(1).normal(size=(7, 5)).astype(np.float32)
  gallery[4] = gallery[2]  # a tie: the lower index first in both
  scores, indices = retrieval_cost.chunked_top_k(queries, gallery, k=3, chunk=4)
  expected_scores, expected_indices = retrieval.top_k_chunked(queries, gallery, 3, chunk=4)
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)


def test_seconds_per_call_warms_up_then_takes_the_median():
  calls = []
  median, times = retrieval_cost.seconds_per_call(lambda i: calls.append(i) or jnp.ones(2), 3)
  assert calls == [0, 1, 2, 3] and len(times) == 3 and median == np.median(times) > 0


def _reference_costs(per_item, images, captions, top_k):
  """Full retrieval cost written out query by query: every embedding, then every pair scored by
  the cross-encoder, and for the hybrid each query's candidate list re-ranked."""
  two_stream = (sum(per_item["image"] for _ in range(images))
                + sum(per_item["caption"] for _ in range(captions)) + per_item["ranking"])
  cross_embeddings = images * per_item["ce_image"] + captions * per_item["ce_caption"]
  all_pairs = np.full((images, captions), per_item["pair"]).sum()
  candidates = ([list(range(images))[:top_k] for _ in range(captions)]
                + [list(range(captions))[:top_k] for _ in range(images)])
  reranked = sum(len(c) for c in candidates)
  return {"two_stream": two_stream, "cross_encoder": cross_embeddings + all_pairs,
          "hybrid": two_stream + cross_embeddings + reranked * per_item["pair"],
          "reranked_pairs": reranked}


@pytest.mark.parametrize("images, captions, top_k", [(3, 7, 4), (50, 250, 16)])
def test_retrieval_costs_match_a_query_by_query_reference(images, captions, top_k):
  per_item = {"image": 2e-3, "caption": 5e-4, "ranking": 0.25, "ce_image": 1e-5,
              "ce_caption": 3e-6, "pair": 4e-3}
  costs = retrieval_cost.retrieval_costs(
      {key: per_item[key] for key in ("image", "caption", "ranking")},
      {"image": per_item["ce_image"], "caption": per_item["ce_caption"], "pair": per_item["pair"]},
      images, captions, top_k)
  expected = _reference_costs(per_item, images, captions, top_k)
  for key, value in expected.items():
    assert costs[key] == pytest.approx(value, rel=1e-9), key
  assert costs["ratio"]["cross_encoder"] == pytest.approx(
      expected["cross_encoder"] / expected["two_stream"])
  assert costs["ratio"]["hybrid"] == pytest.approx(expected["hybrid"] / expected["two_stream"])


def _hand_config(use_wst):
  """16 px images in 8 px patches (4 patches), towers 8 wide and 1 deep, captions of 3 tokens,
  embeddings of 4."""
  config = common.base_config("tiny")
  config.model.image.image_size, config.model.image.patch_size = 16, 8
  for tower in (config.model.image, config.model.text):
    tower.width, tower.depth, tower.heads, tower.mlp_ratio = 8, 1, 2, 4.0
  config.input.max_len, config.model.embed_dim = 3, 4
  config.model.use_wst, config.model.wst_layers = use_wst, 1
  return config


@pytest.mark.parametrize("use_wst", [False, True])
def test_flop_ratio_matches_a_hand_count(use_wst):
  # A layer over T tokens of width 8: 8 T 8^2 (Q, K, V, out) + 16 T 8^2 (MLP) + 4 T^2 8.
  layer = {3: 1536 + 3072 + 288, 5: 2560 + 5120 + 800, 8: 4096 + 8192 + 2048}
  patch_projection = 2 * 4 * (8 * 8 * 3) * 8
  projection = 2 * 8 * 4
  wst = (layer[5], layer[3]) if use_wst else (0, 0)
  image = patch_projection + layer[5] + wst[0] + projection  # [CLS] + 4 patches
  caption = layer[3] + wst[1] + projection
  pair = layer[8] + 2 * 8  # 3 caption tokens + image [CLS] + 4 patches, then the head
  config = _hand_config(use_wst)
  assert retrieval_cost.two_stream_flops(config) == {"image": image, "caption": caption,
                                                     "pair": 2 * 2 * 4}
  assert retrieval_cost.cross_encoder_flops(config) == {"image": patch_projection, "caption": 0,
                                                        "pair": pair}

  images, captions, k = 5000, 25010, 16
  two_stream = images * image + captions * caption + images * captions * 16
  cross = images * patch_projection + images * captions * pair
  hybrid = two_stream + images * patch_projection + (captions + images) * k * pair
  one_second = {"seconds": 1.0, "batch": 1, "batch_seconds": [1.0]}
  measured = {"two_stream": {"image": one_second, "caption": one_second},
              "cross_encoder": {"image": one_second, "caption": one_second, "pair": one_second}}
  analytic = {"two_stream": retrieval_cost.two_stream_flops(config),
              "cross_encoder": retrieval_cost.cross_encoder_flops(config)}
  result = retrieval_cost.protocol_results(measured, analytic, {"i2t": 1.0, "t2i": 1.0}, images,
                                           captions, k)
  assert result["flops"] == {"two_stream": two_stream, "cross_encoder": cross, "hybrid": hybrid}
  assert result["flop_ratio"]["cross_encoder"] == pytest.approx(cross / two_stream)
  assert result["flop_ratio"]["hybrid"] == pytest.approx(hybrid / two_stream)
  assert result["seconds"]["two_stream"] == images + captions + 2.0


def test_command_line_writes_every_documented_field(tmp_path):
  out = tmp_path / "cost.json"
  result = run_module("cots_jax.benchmarks.retrieval_cost", "--config=configs/pretrain.py:runlocal",
                      *tiny_flags(), "--embed_batch=4", "--pair_batch=4", "--repeats=1",
                      "--top_k=4", "--chunk=32", "--ranking_queries=64", f"--out={out}")
  results = json.loads(out.read_text())
  assert {"device", "platform", "num_devices", "jax_version", "config", "config_overrides",
          "caption_length", "num_patches", "pair_tokens", "embed_dim", "top_k", "chunk",
          "repeats", "measured", "analytic_flops", "protocols", "paper_speedup"} <= set(results)
  assert results["config"] == "configs/pretrain.py:runlocal"
  assert results["config_overrides"]["model.image.width"] == 32
  assert (results["caption_length"], results["num_patches"], results["pair_tokens"]) == (
      36, 9, 46)
  for model, items in (("two_stream", ("image", "caption")),
                       ("cross_encoder", ("image", "caption", "pair"))):
    for item in items:
      entry = results["measured"][model][item]
      assert entry["seconds"] > 0 and len(entry["batch_seconds"]) == 1
  assert set(results["protocols"]) == {"coco_5k", "flickr_1k"}
  for protocol in results["protocols"].values():
    assert protocol["ranking"]["queries_timed"] == {"i2t": 64, "t2i": 64}
    for key in ("seconds", "flops"):
      assert min(protocol[key][m] for m in ("two_stream", "cross_encoder", "hybrid")) > 0
    assert min(*protocol["measured_ratio"].values(), *protocol["flop_ratio"].values()) > 0
  assert "coco_5k" in result.stdout and "10,800" in result.stdout
