"""Image-text retrieval metrics (design §4.1) and the evaluator that embeds a split and scores it.

Ranks are 1-based and ties are broken against the query: a candidate whose score equals the
ground truth's ranks ahead of it, so a collapsed model (all scores equal) gets the worst rank.
A NaN score counts as ahead of the ground truth too (a NaN model is never rewarded).

Image-to-text: an image's rank is that of its best ground-truth text among the texts that are not
its own; images with no text are left out of the image-to-text numbers (they stay text-to-image
candidates). Text-to-image: a text's rank is that of its image among all images.

Both passes work on `chunk x chunk` blocks of the similarity matrix, so the gallery never has to
fit in memory as one matrix; `retrieval_metrics` is the same computation on a single block.
`top_k_chunked` (search, report) finds the best k gallery rows of each query the same way.
"""

import numpy as np


def retrieval_metrics(sim, txt2img, ks=(1, 5, 10)):
  """Recall@K (percent) and median rank of both retrieval directions.

  Args:
    sim: [n_images, n_texts] similarity, higher = closer.
    txt2img: [n_texts] int, the image index of each text (any number of texts per image).
    ks: the K of the recalls.

  Returns:
    dict of Python floats: `i2t_r{k}`, `t2i_r{k}` for each k (percent), `rsum` (sum of those),
    `r_mean` (their mean), `i2t_medr`, `t2i_medr` (median 1-based rank, np.median: the
    mean of the middle two for an even count).

  Raises:
    ValueError on a shape mismatch, a txt2img entry out of range, or bad ks.
  """
  sim = _as_float(sim)
  if sim.ndim != 2:
    raise ValueError(f"sim must be [n_images, n_texts], got shape {sim.shape}")
  n_images, n_texts = sim.shape
  txt2img = _checked_txt2img(txt2img, n_images, n_texts)
  ks = _checked_ks(ks)
  i2t_ahead, t2i_ahead = _count_ahead(
      lambda rows, cols: sim[rows, cols], n_images, n_texts, txt2img,
      chunk=max(n_images, n_texts))
  return _summarise(i2t_ahead, t2i_ahead, txt2img, ks)


def retrieval_metrics_chunked(img_emb, txt_emb, txt2img, ks=(1, 5, 10), chunk=4096):
  """`retrieval_metrics(img_emb @ txt_emb.T, txt2img, ks)`, in O(chunk^2 + n) memory.

  Args:
    img_emb: [n_images, D] image embeddings.
    txt_emb: [n_texts, D] text embeddings.
    txt2img: [n_texts] int, the image index of each text.
    ks: the K of the recalls.
    chunk: side of the largest similarity block ever held (rows and columns).

  Returns:
    the dict of `retrieval_metrics`.

  Raises:
    ValueError on shape mismatches, a txt2img entry out of range, bad ks or chunk.
  """
  img_emb, txt_emb = _as_float(img_emb), _as_float(txt_emb)
  if img_emb.ndim != 2 or txt_emb.ndim != 2 or img_emb.shape[1] != txt_emb.shape[1]:
    raise ValueError("img_emb and txt_emb must be [n_images, D] and [n_texts, D], got shapes "
                     f"{img_emb.shape} and {txt_emb.shape}")
  n_images, n_texts = img_emb.shape[0], txt_emb.shape[0]
  txt2img = _checked_txt2img(txt2img, n_images, n_texts)
  ks = _checked_ks(ks)
  chunk = _checked_chunk(chunk)
  i2t_ahead, t2i_ahead = _count_ahead(
      lambda rows, cols: img_emb[rows] @ txt_emb[cols].T, n_images, n_texts, txt2img, chunk)
  return _summarise(i2t_ahead, t2i_ahead, txt2img, ks)


def top_k_chunked(queries, gallery, k, chunk=4096):
  """The k gallery rows of highest dot product with each query, without the full score matrix.

  Works on `chunk x chunk` blocks, keeping the best k so far per query, in O(chunk * (chunk + k))
  memory. Equal scores rank the lower gallery index first; NaN scores rank last.

  Args:
    queries: [n, D] query embeddings.
    gallery: [m, D] gallery embeddings.
    k: how many to return per query (at most m are).
    chunk: side of the largest similarity block ever held.

  Returns:
    (scores float [n, min(k, m)], indices int64 [n, min(k, m)]), best first.

  Raises:
    ValueError on shape mismatches, an empty gallery, or k / chunk not a positive int.
  """
  queries, gallery = _as_float(queries), _as_float(gallery)
  if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
    raise ValueError("queries and gallery must be [n, D] and [m, D], got shapes "
                     f"{queries.shape} and {gallery.shape}")
  if gallery.shape[0] == 0:
    raise ValueError("the gallery is empty")
  (k,), chunk = _checked_ks((k,)), _checked_chunk(chunk)
  k = min(k, gallery.shape[0])
  all_scores, all_indices = [], []
  for q0 in range(0, queries.shape[0], chunk):
    rows = queries[q0:q0 + chunk]
    # The kept candidates stay in gallery order, so a stable sort by score alone breaks ties
    # towards the lower index.
    scores = np.empty((rows.shape[0], 0), rows.dtype)
    indices = np.empty((rows.shape[0], 0), np.int64)
    for g0 in range(0, gallery.shape[0], chunk):
      block = rows @ gallery[g0:g0 + chunk].T
      scores = np.concatenate([scores, np.where(np.isnan(block), -np.inf, block)], axis=1)
      indices = np.concatenate(
          [indices, np.broadcast_to(np.arange(g0, g0 + block.shape[1]), block.shape)], axis=1)
      keep = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :k], axis=1)
      scores = np.take_along_axis(scores, keep, axis=1)
      indices = np.take_along_axis(indices, keep, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    all_scores.append(np.take_along_axis(scores, order, axis=1))
    all_indices.append(np.take_along_axis(indices, order, axis=1))
  return np.concatenate(all_scores), np.concatenate(all_indices)


def embed_dataset(embed_fn, batches):
  """Embeds every real example of `batches`, in order.

  Args:
    embed_fn: batch dict -> [b, E] embeddings (numpy or jax), one row per batch row.
    batches: iterable of batch dicts, each with a bool `valid` [b] marking the real rows
      (False = padding).

  Returns:
    [N, E] numpy array, the embeddings of the N valid rows in the order they came.

  Raises:
    ValueError when there is no batch or embed_fn returns a row count other than b.
  """
  kept = []
  for batch in batches:
    valid = np.asarray(batch["valid"], dtype=bool)
    emb = np.asarray(embed_fn(batch))
    if valid.ndim != 1 or emb.ndim != 2 or emb.shape[0] != valid.shape[0]:
      raise ValueError(f"embed_fn must return [b, E] for a batch whose `valid` is [b]; got "
                       f"embeddings {emb.shape} for valid {valid.shape}")
    kept.append(emb[valid])
  if not kept:
    raise ValueError("embed_dataset got no batches")
  return np.concatenate(kept, axis=0)


class RetrievalEvaluator:
  """Image <-> text retrieval on one split; the trainer logs its metrics as `eval/<name>/<key>`.

  `split` gives `image_batches()` (dicts with `image`, `valid`), `text_batches()` (dicts with
  `text_ids`, `text_mask`, `valid`), `num_images` and `txt2img` ([n_texts] int, the image index
  of each text, images counted in the order `image_batches` yields them).
  """

  def __init__(self, name, split, ks=(1, 5, 10), chunk=4096):
    self.name = name
    self.split = split
    self.ks = _checked_ks(ks)
    self.chunk = _checked_chunk(chunk)

  def run(self, embed_image_fn, embed_text_fn):
    """Embeds the split and returns the `retrieval_metrics` dict.

    Args:
      embed_image_fn: image batch dict -> [b, D] embeddings.
      embed_text_fn: text batch dict -> [b, D] embeddings.

    Raises:
      ValueError when the embedded counts do not match the split's `num_images` / `txt2img`.
    """
    img_emb = embed_dataset(embed_image_fn, self.split.image_batches())
    txt_emb = embed_dataset(embed_text_fn, self.split.text_batches())
    txt2img = np.asarray(self.split.txt2img)
    if txt_emb.shape[0] != txt2img.shape[0]:
      raise ValueError(f"evaluator {self.name!r}: embedded {txt_emb.shape[0]} texts but the "
                       f"split's txt2img has {txt2img.shape[0]}")
    if img_emb.shape[0] != self.split.num_images:
      raise ValueError(f"evaluator {self.name!r}: embedded {img_emb.shape[0]} images but the "
                       f"split has {self.split.num_images}")
    return retrieval_metrics_chunked(img_emb, txt_emb, txt2img, self.ks, self.chunk)


def _count_ahead(block_fn, n_images, n_texts, txt2img, chunk):
  """Counts, per query, the non-ground-truth candidates that rank ahead of its ground truth.

  Two passes over `chunk x chunk` blocks: the first reads each text's ground-truth score
  (and from those each image's best one) out of the block products, the second counts the
  candidates with a score >= it. Both passes compute a block the same way, so the ground-truth
  scores compare exactly with the candidates' scores.

  Args:
    block_fn: (row slice, column slice) -> [rows, cols] block of the [n_images, n_texts] scores.
    n_images, n_texts: the matrix shape.
    txt2img: [n_texts] int64, valid image indices.
    chunk: block side.

  Returns:
    i2t_ahead [n_images] and t2i_ahead [n_texts], int64 counts (rank = 1 + count).
  """
  # Float64 holds every float32 score exactly, and NaN stays NaN.
  gt_txt = np.empty(n_texts, np.float64)
  for rows, cols in _blocks(n_images, n_texts, chunk):
    owner_row = txt2img[cols] - rows.start
    local = np.flatnonzero((owner_row >= 0) & (owner_row < rows.stop - rows.start))
    if local.size:  # Only blocks that hold a ground-truth pair are computed in this pass.
      gt_txt[cols.start + local] = block_fn(rows, cols)[owner_row[local], local]
  # np.maximum propagates NaN (on purpose, silently); images with no text keep -inf and are
  # dropped later.
  best_img = np.full(n_images, -np.inf)
  with np.errstate(invalid="ignore"):
    np.maximum.at(best_img, txt2img, gt_txt)

  i2t_ahead = np.zeros(n_images, np.int64)
  t2i_ahead = np.zeros(n_texts, np.int64)
  for rows, cols in _blocks(n_images, n_texts, chunk):
    scores = block_fn(rows, cols)
    is_gt = txt2img[cols][None, :] == np.arange(rows.start, rows.stop)[:, None]
    # `not (score < gt)` is `score >= gt`, and also counts a NaN on either side as ahead.
    i2t_ahead[rows] += np.sum(~((scores < best_img[rows, None]) | is_gt), axis=1)
    t2i_ahead[cols] += np.sum(~((scores < gt_txt[None, cols]) | is_gt), axis=0)
  return i2t_ahead, t2i_ahead


def _blocks(n_images, n_texts, chunk):
  """Yields (row slice, column slice) of the `chunk x chunk` tiles of [n_images, n_texts]."""
  for i0 in range(0, n_images, chunk):
    for j0 in range(0, n_texts, chunk):
      yield slice(i0, min(i0 + chunk, n_images)), slice(j0, min(j0 + chunk, n_texts))


def _summarise(i2t_ahead, t2i_ahead, txt2img, ks):
  """Turns the ahead-counts into the metric dict of `retrieval_metrics`."""
  has_text = np.bincount(txt2img, minlength=i2t_ahead.shape[0]) > 0
  ranks = {"i2t": 1 + i2t_ahead[has_text], "t2i": 1 + t2i_ahead}
  metrics = {f"{direction}_r{k}": float(100.0 * np.mean(ranks[direction] <= k))
             for direction in ("i2t", "t2i") for k in ks}
  metrics["rsum"] = float(sum(metrics.values()))
  metrics["r_mean"] = metrics["rsum"] / (2 * len(ks))
  for direction in ("i2t", "t2i"):
    metrics[f"{direction}_medr"] = float(np.median(ranks[direction]))
  return metrics


def _as_float(x):
  """x as a numpy array of at least float32 precision (bfloat16 and ints are promoted)."""
  x = np.asarray(x)
  return x.astype(np.result_type(x.dtype, np.float32), copy=False)


def _checked_txt2img(txt2img, n_images, n_texts):
  """txt2img as int64 [n_texts], every entry an index in [0, n_images)."""
  txt2img = np.asarray(txt2img)
  if txt2img.ndim != 1 or txt2img.shape[0] != n_texts:
    raise ValueError(f"txt2img must be [n_texts] = [{n_texts}], got shape {txt2img.shape}")
  if n_texts == 0:
    raise ValueError("retrieval needs at least one text")
  if not np.issubdtype(txt2img.dtype, np.integer):
    raise ValueError(f"txt2img must hold integer image indices, got dtype {txt2img.dtype}")
  bad = np.flatnonzero((txt2img < 0) | (txt2img >= n_images))
  if bad.size:
    raise ValueError(f"txt2img[{bad[0]}] = {txt2img[bad[0]]} is not an image index in "
                     f"[0, {n_images})")
  return txt2img.astype(np.int64)


def _checked_ks(ks):
  """ks as a tuple of distinct positive ints."""
  ks = tuple(ks)
  if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                   for k in ks) or len(set(ks)) != len(ks):
    raise ValueError(f"ks must be distinct positive ints, got {ks}")
  return tuple(int(k) for k in ks)


def _checked_chunk(chunk):
  """chunk as a positive int."""
  if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f"chunk must be a positive int, got {chunk!r}")
  return int(chunk)
