"""What full retrieval costs: the two-stream model against a single-stream cross-encoder of its
size, and a retrieve-then-rerank hybrid (COTS: two-stream retrieval is ~10,800x faster than a
single-stream model of its accuracy class).

  python -m cots_jax.benchmarks.retrieval_cost --config=configs/pretrain.py --out=cost.json
  python -m cots_jax.benchmarks.retrieval_cost --config=configs/pretrain.py:model=base \
      --embed_batch=2 --pair_batch=2 --repeats=3 --out=cost_base.json   # ViT-B/16 on a CPU

For the COCO 5K (5,000 images x 25,010 captions) and Flickr 1K (1,000 x 5,000) protocols:
  two_stream     every image and every caption embedded once by the config's towers
                 (`visual_embedding`, `text_embedding`), then the similarity and the top-k of
                 both directions, in blocks of `--chunk` queries x the whole gallery;
  cross_encoder  models/cross_encoder.py, as wide and deep as the image tower: patch and word
                 embeddings once per image and per caption, the blocks on every image-caption pair;
  hybrid         two_stream, then the cross-encoder on the top-k candidates of each query in both
                 directions (captions x k + images x k pairs).
Each per-item cost is measured: the median of `--repeats` timed calls on one batch, after an
untimed call that compiles, divided by the batch; pairs are sampled at random from embedded
images and captions. The totals extrapolate them to each protocol. The similarity and top-k are
timed at the protocol's size (or on `--ranking_queries` queries per direction, scaled: query
blocks are independent). The analytic matmul FLOPs (cots_jax.flops) of the same computations give
the ratios at equal hardware efficiency. Weights are random and inputs synthetic (neither changes
the cost); inputs are on the device before timing, so host transfers are not counted on either
side; captions are `input.max_len` tokens long (both models pay for padding). Sorting the
cross-encoder's scores is not counted (nothing next to its blocks). One device.

JSON keys: device, platform, num_devices, jax_version, config, config_overrides, caption_length,
num_patches, pair_tokens, embed_dim, top_k, chunk, repeats, measured (two_stream: {image,
caption}, cross_encoder: {image, caption, pair}, each {seconds, batch, batch_seconds}),
analytic_flops (two_stream: {image, caption, pair: the similarity}, cross_encoder: {image,
caption, pair}), protocols ({name: {images, captions, ranking (i2t, t2i seconds and
queries_timed), seconds and flops (two_stream, cross_encoder, hybrid: totals), measured_ratio
and flop_ratio (cross_encoder, hybrid: over two_stream), reranked_pairs}}), paper_speedup.
"""

import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from cots_jax import benchmarks
from cots_jax import flops
from cots_jax import shapes
from cots_jax import state as state_lib
from cots_jax.data import registry
from cots_jax.models import cross_encoder

# (images, captions) of the test splits the paper reports.
PROTOCOLS = {"coco_5k": (5000, 25010), "flickr_1k": (1000, 5000)}
PAPER_SPEEDUP = 10_800  # COTS (Lu et al., CVPR 2022) against a single-stream model
MODELS = ("two_stream", "cross_encoder", "hybrid")


def seconds_per_call(call, repeats):
  """Times `call(i)` for i = 1..repeats, each until its outputs are ready, after an untimed
  `call(0)` (compilation and first touches).

  Returns:
    (median seconds, [seconds of each timed call]).
  """
  jax.block_until_ready(call(0))
  times = []
  for i in range(1, repeats + 1):
    start = time.perf_counter()
    jax.block_until_ready(call(i))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), times


def _per_item(call, batch, repeats):
  """{seconds: median seconds of `call` / batch, batch, batch_seconds: each timed call}."""
  median, times = seconds_per_call(call, repeats)
  return {"seconds": median / batch, "batch": batch, "batch_seconds": times}


def random_like(abstract, rng):
  """Device arrays of the shapes and dtypes of the ShapeDtypeStruct tree `abstract`, normal with
  standard deviation 0.02, drawn by the numpy Generator `rng`. Drawing on the host compiles
  nothing (a jitted `init` of the whole model takes seconds to compile on a CPU), and what a
  forward pass costs does not depend on the values."""
  return jax.tree.map(
      lambda leaf: jnp.asarray((0.02 * rng.standard_normal(leaf.shape, np.float32)).astype(
          leaf.dtype)), abstract)


def synthetic_inputs(config, batch, rng):
  """`batch` random images `[batch, H, W, 3]` and captions of `input.max_len` ids from the text
  vocabulary `[batch, L]`, every token real (mask of ones), as device arrays drawn by the numpy
  Generator `rng`."""
  side, length = config.model.image.image_size, config.input.max_len
  images = rng.standard_normal((batch, side, side, 3), np.float32)
  text_ids = rng.integers(0, config.model.text.vocab_size, (batch, length), np.int32)
  return jnp.asarray(images), jnp.asarray(text_ids), jnp.ones((batch, length), jnp.int32)


def measure_two_stream(model, params, inputs, repeats):
  """{image, caption}: `_per_item` of the two-stream embedding (tower, projection, L2 norm) of
  the images and of the captions of `inputs` (from `synthetic_inputs`)."""
  images, text_ids, text_mask = inputs

  @jax.jit
  def embed_images(params, images):
    return model.apply({"params": params}, images, method=model.visual_embedding)[0]

  @jax.jit
  def embed_texts(params, text_ids, text_mask):
    return model.apply({"params": params}, text_ids, text_mask, method=model.text_embedding)[0]

  batch = images.shape[0]
  return {"image": _per_item(lambda _: embed_images(params, images), batch, repeats),
          "caption": _per_item(lambda _: embed_texts(params, text_ids, text_mask), batch,
                               repeats)}


def measure_cross_encoder(encoder, params, inputs, pair_batch, repeats, rng):
  """{image, caption, pair}: `_per_item` of the cross-encoder's embedding of the images and the
  captions of `inputs`, and of scoring batches of `pair_batch` pairs drawn at random by the numpy
  Generator `rng` (a new batch each call) from those embeddings."""
  images, text_ids, text_mask = inputs

  @jax.jit
  def embed_images(params, images):
    return encoder.apply({"params": params}, images, method=encoder.embed_image)

  @jax.jit
  def embed_texts(params, text_ids):
    return encoder.apply({"params": params}, text_ids, method=encoder.embed_text)

  @jax.jit
  def score_pairs(params, image_tokens, text_tokens, text_mask, image_index, caption_index):
    return encoder.apply({"params": params}, image_tokens[image_index],
                         text_tokens[caption_index], text_mask[caption_index],
                         method=encoder.score)

  batch = images.shape[0]
  image_tokens, text_tokens = embed_images(params, images), embed_texts(params, text_ids)
  image_index, caption_index = jnp.asarray(rng.integers(0, batch, (2, repeats + 1, pair_batch)))
  return {"image": _per_item(lambda _: embed_images(params, images), batch, repeats),
          "caption": _per_item(lambda _: embed_texts(params, text_ids), batch, repeats),
          "pair": _per_item(lambda i: score_pairs(params, image_tokens, text_tokens, text_mask,
                                                  image_index[i], caption_index[i]),
                            pair_batch, repeats)}


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def chunked_top_k(queries, gallery, k, chunk):
  """The k gallery rows of highest dot product with each query, best first (equal scores: the
  lower index first, as `retrieval.top_k_chunked`), on the device.

  Args:
    queries: [n, E]; gallery: [m, E], m >= k.
    k: candidates per query; chunk: the most query rows scored at once (blocks [<= chunk, m],
      one after the other, so memory is O(chunk * m)).

  Returns:
    (scores [n, k] float, indices [n, k] int32).
  """
  n = queries.shape[0]
  num_blocks = -(-n // chunk)
  rows = -(-n // num_blocks)  # evens out the blocks, so padding stays under one row a block
  blocks = jnp.pad(queries, ((0, num_blocks * rows - n), (0, 0))).reshape(num_blocks, rows, -1)
  scores, indices = jax.lax.map(lambda block: jax.lax.top_k(block @ gallery.T, k), blocks)
  return scores.reshape(-1, k)[:n], indices.reshape(-1, k)[:n]


def measure_ranking(num_images, num_captions, embed_dim, top_k, chunk, max_queries, repeats,
                    rng):
  """Seconds of the similarity and top-k of both directions over random unit embeddings.

  Args:
    num_images, num_captions: the protocol's gallery sizes.
    embed_dim: E; top_k: candidates per query (capped at the gallery); chunk: `chunked_top_k`.
    max_queries: time at most this many queries per direction and scale by n / timed (0: all).
    repeats: timed calls; rng: a numpy Generator.

  Returns:
    {i2t, t2i: seconds for all the direction's queries, queries_timed: {i2t, t2i}}.
  """
  unit = lambda x: jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))
  images = unit(rng.standard_normal((num_images, embed_dim), np.float32))
  captions = unit(rng.standard_normal((num_captions, embed_dim), np.float32))
  results = {"queries_timed": {}}
  for direction, queries, gallery in (("i2t", images, captions), ("t2i", captions, images)):
    timed = queries[:max_queries] if max_queries else queries
    k = min(top_k, gallery.shape[0])
    median, _ = seconds_per_call(lambda _: chunked_top_k(timed, gallery, k, chunk), repeats)
    results[direction] = median * queries.shape[0] / timed.shape[0]
    results["queries_timed"][direction] = timed.shape[0]
  return results


def _wst_flops(config, tokens, tower_width):
  """COOKIE's WST on one sequence of `tokens` from a tower `tower_width` wide (with the input
  projection when the widths differ)."""
  model = config.model
  width = model.wst_width or model.text.width
  projection = 2 * tokens * tower_width * width if tower_width != width else 0
  return projection + flops.transformer_forward_flops(tokens, width, model.wst_layers,
                                                      model.wst_mlp_ratio)


def two_stream_flops(config):
  """Forward FLOPs of the two-stream model: {image: one image's tower (+ WST) + projection,
  caption: one caption's, pair: the similarity of one image-caption pair in both directions
  (the ranking scores every pair once per direction)}."""
  model = config.model
  image = flops.image_tower_forward_flops(config)
  caption = flops.text_tower_forward_flops(config)
  image_head, text_head = model.image.width, model.text.width
  if model.use_wst:
    image += _wst_flops(config, flops.image_tokens(config), model.image.width)
    caption += _wst_flops(config, config.input.max_len, model.text.width)
    image_head = text_head = model.wst_width or model.text.width
  return {"image": image + 2 * image_head * model.embed_dim,
          "caption": caption + 2 * text_head * model.embed_dim,
          "pair": 2 * 2 * model.embed_dim}


def pair_tokens(config):
  """The cross-encoder's sequence for one pair: the caption's L tokens, the image [CLS] and N
  patches."""
  return config.input.max_len + 1 + shapes.num_patches(config)


def cross_encoder_flops(config):
  """Forward FLOPs of `CrossEncoder.from_config(config)`: {image: the patch projection of one
  image, caption: 0 (embeddings are look-ups), pair: the blocks over `pair_tokens` + the head}."""
  image = config.model.image
  patches = shapes.num_patches(config)
  return {"image": 2 * patches * image.patch_size**2 * 3 * image.width, "caption": 0,
          "pair": flops.transformer_forward_flops(pair_tokens(config), image.width, image.depth,
                                                  image.mlp_ratio) + 2 * image.width}


def retrieval_costs(two_stream, cross, images, captions, top_k):
  """The cost of retrieving both ways over `images` x `captions` (in the unit of the inputs:
  seconds or FLOPs).

  Args:
    two_stream: {image, caption: per item; ranking: the similarity and top-k of both directions
      over the whole gallery}.
    cross: the cross-encoder's {image, caption: per item (its embeddings), pair: per pair}.
    images, captions: the gallery sizes.
    top_k: the hybrid's candidates per query (at most the other side's gallery).

  Returns:
    {two_stream, cross_encoder, hybrid: totals; ratio: {cross_encoder, hybrid: over two_stream};
    reranked_pairs: the pairs the hybrid scores}.
  """
  two_stream_total = (images * two_stream["image"] + captions * two_stream["caption"]
                      + two_stream["ranking"])
  cross_embeddings = images * cross["image"] + captions * cross["caption"]
  reranked = captions * min(top_k, images) + images * min(top_k, captions)
  totals = {"two_stream": two_stream_total,
            "cross_encoder": cross_embeddings + images * captions * cross["pair"],
            "hybrid": two_stream_total + cross_embeddings + reranked * cross["pair"]}
  totals["ratio"] = {name: totals[name] / two_stream_total for name in MODELS[1:]}
  totals["reranked_pairs"] = reranked
  return totals


def protocol_results(measured, analytic, ranking, images, captions, top_k):
  """One protocol's entry of the results (module docstring), from the `measured` per-item
  seconds, the `analytic` per-item FLOPs and the `ranking` of `measure_ranking`."""
  seconds = retrieval_costs(
      {"image": measured["two_stream"]["image"]["seconds"],
       "caption": measured["two_stream"]["caption"]["seconds"],
       "ranking": ranking["i2t"] + ranking["t2i"]},
      {item: measured["cross_encoder"][item]["seconds"] for item in ("image", "caption", "pair")},
      images, captions, top_k)
  flop_counts = retrieval_costs(
      {**analytic["two_stream"], "ranking": images * captions * analytic["two_stream"]["pair"]},
      analytic["cross_encoder"], images, captions, top_k)
  return {"images": images, "captions": captions, "ranking": ranking,
          "seconds": {name: seconds[name] for name in MODELS},
          "flops": {name: flop_counts[name] for name in MODELS},
          "measured_ratio": seconds["ratio"], "flop_ratio": flop_counts["ratio"],
          "reranked_pairs": seconds["reranked_pairs"]}


def benchmark(config, embed_batch, pair_batch, repeats, top_k=16, chunk=0, ranking_queries=0,
              config_name="", config_overrides=None):
  """Measures the config's towers and its cross-encoder and returns the results dict (module
  docstring). `chunk` 0 takes `config.eval.chunk`; `ranking_queries` 0 times every query."""
  if registry.is_video(config):
    raise ValueError("retrieval_cost measures image-text retrieval; the config's data is video")
  built = state_lib.build(config, state_lib.make_mesh(config))
  config = built.config
  chunk = chunk or config.eval.chunk
  rng, key = np.random.default_rng(config.seed), jax.random.PRNGKey(config.seed)
  inputs = synthetic_inputs(config, embed_batch, rng)
  params = random_like(
      jax.eval_shape(functools.partial(state_lib.init_params, config, built.model), key), rng)
  encoder = cross_encoder.CrossEncoder.from_config(config)
  encoder_params = random_like(
      jax.eval_shape(encoder.init, key, *(x[:1] for x in inputs))["params"], rng)
  measured = {
      "two_stream": measure_two_stream(built.model, params, inputs, repeats),
      "cross_encoder": measure_cross_encoder(encoder, encoder_params, inputs, pair_batch,
                                             repeats, rng)}
  analytic = {"two_stream": two_stream_flops(config), "cross_encoder": cross_encoder_flops(config)}
  protocols = {}
  for name, (images, captions) in PROTOCOLS.items():
    ranking = measure_ranking(images, captions, config.model.embed_dim, top_k, chunk,
                              ranking_queries, repeats, rng)
    protocols[name] = protocol_results(measured, analytic, ranking, images, captions, top_k)
  return {
      "device": str(jax.devices()[0].device_kind),
      "platform": jax.devices()[0].platform,
      "num_devices": jax.device_count(),
      "jax_version": jax.__version__,
      "config": config_name,
      "config_overrides": dict(config_overrides or {}),
      "caption_length": config.input.max_len,
      "num_patches": shapes.num_patches(config),
      "pair_tokens": pair_tokens(config),
      "embed_dim": config.model.embed_dim,
      "top_k": top_k,
      "chunk": chunk,
      "repeats": repeats,
      "measured": measured,
      "analytic_flops": analytic,
      "protocols": protocols,
      "paper_speedup": PAPER_SPEEDUP,
  }


def summary(results):
  """Lines for people: the measured per-item costs, then each protocol's totals and ratios."""
  r, measured = results, results["measured"]

  def per_item(model, item):
    entry = measured[model][item]
    return f"{entry['seconds']:.3g} s/{item} (batch {entry['batch']})"

  lines = [
      f"{r['device']} (jax {r['jax_version']}), {r['config']}: captions {r['caption_length']} "
      f"tokens, {r['num_patches']} patches, {r['pair_tokens']} tokens a pair, top-k "
      f"{r['top_k']}, median of {r['repeats']} timed calls",
      f"two-stream: {per_item('two_stream', 'image')}, {per_item('two_stream', 'caption')}",
      f"cross-encoder: {per_item('cross_encoder', 'pair')}, {per_item('cross_encoder', 'image')}"
      f", {per_item('cross_encoder', 'caption')}",
      f"{'protocol':<10} {'images x captions':>18} {'two-stream s':>13} {'cross-enc. s':>13} "
      f"{'hybrid s':>11} {'CE/TS':>9} {'CE/TS FLOPs':>12} {'hyb/TS':>7} {'hyb/TS FLOPs':>13}"]
  for name, p in r["protocols"].items():
    seconds, measured_ratio, flop_ratio = p["seconds"], p["measured_ratio"], p["flop_ratio"]
    lines.append(
        f"{name:<10} {p['images']:>8} x {p['captions']:<7} {seconds['two_stream']:>13.4g} "
        f"{seconds['cross_encoder']:>13.4g} {seconds['hybrid']:>11.4g} "
        f"{measured_ratio['cross_encoder']:>9.0f} {flop_ratio['cross_encoder']:>12.0f} "
        f"{measured_ratio['hybrid']:>7.2f} {flop_ratio['hybrid']:>13.2f}")
  lines.append(f"paper: two-stream {r['paper_speedup']:,}x faster than single-stream")
  return "\n".join(lines)


def define_flags():
  """The command-line flags. Defined only when this module runs as a program: absl flags are
  process-wide, and other benchmarks that tests import beside this one define --config too."""
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
  flags.DEFINE_string("out", None, "Where to write the JSON results.")
  flags.DEFINE_integer("embed_batch", 64, "Images, and captions, per timed embedding call.",
                       lower_bound=1)
  flags.DEFINE_integer("pair_batch", 128, "Image-caption pairs per timed cross-encoder call.",
                       lower_bound=1)
  flags.DEFINE_integer("repeats", 5, "Timed calls of each measurement (after a warm-up call).",
                       lower_bound=1)
  flags.DEFINE_integer("top_k", 16, "Candidates per query that the hybrid re-ranks.",
                       lower_bound=1)
  flags.DEFINE_integer("chunk", 0, "Query rows per similarity block (0: config.eval.chunk).",
                       lower_bound=0)
  flags.DEFINE_integer("ranking_queries", 0, "Queries per direction for which the similarity "
                       "and top-k are timed, then scaled to all (0: all of them).", lower_bound=0)
  flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  args = flags.FLAGS
  config_flag = args["config"]
  results = benchmark(args.config, args.embed_batch, args.pair_batch, args.repeats, args.top_k,
                      args.chunk, args.ranking_queries, config_flag.config_filename,
                      config_flags.get_override_values(config_flag))
  print(summary(results))
  benchmarks.write_results(results, args.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
