"""Retrieval metrics (design §4.1) and the evaluators that embed a split and score it.

One ranking rule serves every query / gallery pair (`group_retrieval_metrics`): a gallery item is
relevant to a query when both carry the same group label, and a query's rank is 1 + the number
of non-relevant gallery items whose score is >= its best relevant score. Ranks are 1-based and
ties are broken against the query: a candidate whose score equals the best relevant one ranks
ahead of it, so a collapsed model (all scores equal) gets the worst rank. A NaN score counts as
ahead of the relevant one too (a NaN model is never rewarded). Queries with no relevant item are
left out of the numbers (they stay gallery items).

Image-to-text is that rule with the image index as the image's group and `txt2img` as the texts'
groups: an image's rank is that of its best own text among the texts that are not its own.
Text-to-image is the same with the roles swapped. Text matching (text -> other texts of the same
image) and image instance retrieval (one augmented view -> a second view of every image) are the
unimodal evaluators of COOKIE (issue 9).

Every pass works on `chunk x chunk` blocks of the similarity matrix, so the gallery never has to
fit in memory as one matrix; `retrieval_metrics` is the same computation on a single block.
`top_k_chunked` (search, report) finds the best k gallery rows of each query the same way.
"""

import hashlib

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
    mean of the middle two for an even count), `i2t_meanr`, `t2i_meanr` (mean rank).

  Raises:
    ValueError on a shape mismatch, a txt2img entry out of range, or bad ks.
  """
  sim = _as_float(sim)
  if sim.ndim != 2:
    raise ValueError(f"sim must be [n_images, n_texts], got shape {sim.shape}")
  n_images, n_texts = sim.shape
  txt2img = _checked_txt2img(txt2img, n_images, n_texts)
  return _cross_modal_metrics(lambda rows, cols: sim[rows, cols],
                              lambda rows, cols: sim[cols, rows].T, n_images, n_texts, txt2img,
                              _checked_ks(ks), chunk=max(n_images, n_texts))


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
  return _cross_modal_metrics(lambda rows, cols: img_emb[rows] @ txt_emb[cols].T,
                              lambda rows, cols: txt_emb[rows] @ img_emb[cols].T, n_images,
                              n_texts, txt2img, _checked_ks(ks), _checked_chunk(chunk))


def group_retrieval_metrics(query_emb, gallery_emb, query_groups, gallery_groups, ks=(1, 5, 10),
                            chunk=4096, exclude_self=False):
  """Recall@K (percent) and median rank of queries searching a gallery by dot product.

  A gallery item is relevant to a query when their groups are equal and, with `exclude_self`,
  it is not the query itself (query i is gallery item i). A query's rank is 1 + the number of
  non-relevant gallery items other than itself scoring >= its best relevant item (ties and NaN
  against the query, see the module doc). Queries with no relevant item are left out.
  Memory O(chunk^2 + n + m).

  Args:
    query_emb: [n, D] query embeddings.
    gallery_emb: [m, D] gallery embeddings.
    query_groups: [n] int, the group label of each query.
    gallery_groups: [m] int, the group label of each gallery item.
    ks: the K of the recalls.
    chunk: side of the largest similarity block ever held.
    exclude_self: the query set is the gallery (n == m, same order): item i is no candidate of
      query i.

  Returns:
    dict of Python floats: `r{k}` for each k (percent of the ranked queries), `medr` (median
    1-based rank, np.median), `meanr` (mean rank).

  Raises:
    ValueError on shape mismatches, non-integer groups, n != m with exclude_self, bad ks or
    chunk, or when no query has a relevant gallery item.
  """
  query_emb, gallery_emb = _as_float(query_emb), _as_float(gallery_emb)
  if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
    raise ValueError("query_emb and gallery_emb must be [n, D] and [m, D], got shapes "
                     f"{query_emb.shape} and {gallery_emb.shape}")
  n_queries, n_gallery = query_emb.shape[0], gallery_emb.shape[0]
  query_groups = _checked_groups(query_groups, n_queries, "query_groups")
  gallery_groups = _checked_groups(gallery_groups, n_gallery, "gallery_groups")
  if exclude_self and n_queries != n_gallery:
    raise ValueError(f"exclude_self needs the queries to be the gallery, got {n_queries} queries "
                     f"and {n_gallery} gallery items")
  ks, chunk = _checked_ks(ks), _checked_chunk(chunk)
  ranks = _ranks(lambda rows, cols: query_emb[rows] @ gallery_emb[cols].T, query_groups,
                 gallery_groups, chunk, exclude_self)
  if not ranks.size:
    raise ValueError(f"no query has a relevant gallery item ({n_queries} queries, "
                     f"{n_gallery} gallery items)")
  return _recalls(ranks, ks)


def within_group_metrics(query_emb, gallery_emb, query_owner, gallery_owner, owner_group,
                         ks=(1,)):
  """Recall@K and ranks when each query competes only inside its owner's group.

  Every query and gallery item belongs to an owner (a clip: its own index, or the clip a caption
  describes), and every owner to a group (e.g. the clips that differ only in direction). A
  gallery item is relevant to a query when they share the owner; the query's candidates are the
  gallery items whose owner is in the query owner's group. Rank and tie rule as
  `group_retrieval_metrics`, within those candidates only; queries whose group holds no relevant
  item are left out.

  Args:
    query_emb: [n, D]; gallery_emb: [m, D] embeddings.
    query_owner: [n] int, gallery_owner: [m] int owner indices into `owner_group`.
    owner_group: [o] int, the group of each owner.
    ks: the K of the recalls.

  Returns:
    the dict of `group_retrieval_metrics` (`r{k}`, `medr`, `meanr`).

  Raises:
    ValueError on shape mismatches, owners out of range, bad ks, or no query with a relevant
    item.
  """
  query_emb, gallery_emb = _as_float(query_emb), _as_float(gallery_emb)
  if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
    raise ValueError("query_emb and gallery_emb must be [n, D] and [m, D], got shapes "
                     f"{query_emb.shape} and {gallery_emb.shape}")
  owner_group = _checked_groups(owner_group, np.asarray(owner_group).shape[0], "owner_group")
  query_owner = _checked_owners(query_owner, query_emb.shape[0], owner_group.shape[0],
                                "query_owner")
  gallery_owner = _checked_owners(gallery_owner, gallery_emb.shape[0], owner_group.shape[0],
                                  "gallery_owner")
  ks = _checked_ks(ks)
  ranks = np.zeros(query_emb.shape[0], np.int64)
  for group in np.unique(owner_group[query_owner]):
    queries = np.flatnonzero(owner_group[query_owner] == group)
    candidates = np.flatnonzero(owner_group[gallery_owner] == group)
    scores = query_emb[queries] @ gallery_emb[candidates].T
    relevant = query_owner[queries][:, None] == gallery_owner[candidates][None, :]
    with np.errstate(invalid="ignore"):
      best = np.where(relevant, scores, -np.inf).max(axis=1, initial=-np.inf)
      # `not (score < best)`: ties and NaN count as ahead (module doc).
      ahead = np.count_nonzero(~(scores < best[:, None]) & ~relevant, axis=1)
    ranks[queries] = np.where(relevant.any(axis=1), 1 + ahead, 0)
  ranks = ranks[ranks > 0]
  if not ranks.size:
    raise ValueError("no query has a relevant item in its group")
  return _recalls(ranks, ks)


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


def memoized_embed_fn(embed_fn):
  """`embed_fn` that runs once per distinct batch: results are kept by a digest of the batch's
  arrays (names, shapes, dtypes, bytes). The evaluators of one eval read the same split batches
  (captions: retrieval and text matching; clips: retrieval and direction), so each is embedded
  once; different inputs (another view, another encoder's fn) are new batches.

  Args:
    embed_fn: batch dict of arrays -> [b, E] embeddings.

  Returns:
    batch dict -> [b, E] numpy array.
  """
  cache = {}

  def embed(batch):
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(batch):
      array = np.ascontiguousarray(batch[name])
      digest.update(f"{name}:{array.shape}:{array.dtype};".encode())
      digest.update(array.tobytes())
    key = digest.digest()
    if key not in cache:
      cache[key] = np.asarray(embed_fn(batch))
    return cache[key]

  return embed


class _SplitEvaluator:
  """What every evaluator holds: its name (the trainer logs `eval/<name>/<key>`), the split,
  the K of the recalls and the block side of the ranking."""

  def __init__(self, name, split, ks=(1, 5, 10), chunk=4096):
    self.name = name
    self.split = split
    self.ks = _checked_ks(ks)
    self.chunk = _checked_chunk(chunk)

  def _embed(self, embed_fn, batches, expected, what):
    """`embed_dataset(embed_fn, batches)` -> [expected, E]; ValueError naming the evaluator
    and `what` ("images", "texts") when another count comes out."""
    emb = embed_dataset(embed_fn, batches)
    if emb.shape[0] != expected:
      raise ValueError(f"evaluator {self.name!r}: embedded {emb.shape[0]} {what} but the split "
                       f"has {expected}")
    return emb


class RetrievalEvaluator(_SplitEvaluator):
  """Image (or video) <-> text retrieval on one split.

  `split` gives `image_batches()` (dicts with `image` or `video`, `valid`), `text_batches()`
  (dicts with `text_ids`, `text_mask`, `valid`), `num_images` and `txt2img` ([n_texts] int, the
  image index of each text, images counted in the order `image_batches` yields them).
  `directions` names the two directions in the metric keys: ("i2t", "t2i"), or ("v2t", "t2v")
  for video.
  """

  def __init__(self, name, split, ks=(1, 5, 10), chunk=4096, directions=("i2t", "t2i")):
    super().__init__(name, split, ks, chunk)
    self.directions = tuple(directions)

  def run(self, embed_image_fn, embed_text_fn):
    """Embeds the split and returns the `retrieval_metrics` dict, with the keys' `i2t` / `t2i`
    renamed to `directions`.

    Args:
      embed_image_fn: image batch dict -> [b, D] embeddings.
      embed_text_fn: text batch dict -> [b, D] embeddings.

    Raises:
      ValueError when the embedded counts do not match the split's `num_images` / `txt2img`.
    """
    txt2img = np.asarray(self.split.txt2img)
    img_emb = self._embed(embed_image_fn, self.split.image_batches(), self.split.num_images,
                          "images")
    txt_emb = self._embed(embed_text_fn, self.split.text_batches(), txt2img.shape[0], "texts")
    metrics = retrieval_metrics_chunked(img_emb, txt_emb, txt2img, self.ks, self.chunk)
    names = dict(zip(("i2t", "t2i"), self.directions))

    def renamed(key):
      direction, _, rest = key.partition("_")
      return f"{names[direction]}_{rest}" if direction in names else key

    return {renamed(key): value for key, value in metrics.items()}


class WithinGroupEvaluator(RetrievalEvaluator):
  """Image (video) <-> text retrieval where each query competes only with the items of its
  group: e.g. the synthetic clips that differ only in the direction of motion, so R@1 is the
  share of captions whose clip wins over its direction twins (chance 1 / group size).

  `image_groups` is [num_images] int, the group of each item of the split.
  """

  def __init__(self, name, split, image_groups, ks=(1,), directions=("i2t", "t2i")):
    super().__init__(name, split, ks, directions=directions)
    self.image_groups = np.asarray(image_groups)
    if self.image_groups.shape != (split.num_images,):
      raise ValueError(f"evaluator {name!r}: image_groups must be [{split.num_images}], got "
                       f"shape {self.image_groups.shape}")

  def run(self, embed_image_fn, embed_text_fn):
    """Embeds the split; returns `<direction>_r{k}`, `_medr`, `_meanr` of both directions."""
    txt2img = np.asarray(self.split.txt2img)
    img_emb = self._embed(embed_image_fn, self.split.image_batches(), self.split.num_images,
                          "images")
    txt_emb = self._embed(embed_text_fn, self.split.text_batches(), txt2img.shape[0], "texts")
    image_ids = np.arange(self.split.num_images)
    per_direction = {
        self.directions[0]: within_group_metrics(img_emb, txt_emb, image_ids, txt2img,
                                                 self.image_groups, self.ks),
        self.directions[1]: within_group_metrics(txt_emb, img_emb, txt2img, image_ids,
                                                 self.image_groups, self.ks)}
    return {f"{direction}_{key}": value for direction, metrics in per_direction.items()
            for key, value in metrics.items()}


class TextMatchingEvaluator(_SplitEvaluator):
  """Text -> text retrieval: each caption queries all the other captions of the split; a hit is
  a caption of the same image. The captions of an image with no other caption are left out as
  queries (they stay in the gallery).

  `split` gives `text_batches()` and `txt2img` as for `RetrievalEvaluator`. Construction raises
  ValueError when no image of the split has two captions (nothing to find).
  """

  def __init__(self, name, split, ks=(1, 5, 10), chunk=4096):
    super().__init__(name, split, ks, chunk)
    _, captions_per_image = np.unique(np.asarray(split.txt2img), return_counts=True)
    if captions_per_image.max(initial=0) < 2:
      raise ValueError(f"evaluator {name!r}: text matching needs an image with two or more "
                       "captions, the split has none")

  def run(self, embed_text_fn):
    """Embeds the captions and returns `group_retrieval_metrics`' dict (`r{k}`, `medr`).

    Args:
      embed_text_fn: text batch dict -> [b, D] embeddings.

    Raises:
      ValueError when the embedded count does not match the split's `txt2img`.
    """
    txt2img = np.asarray(self.split.txt2img)
    txt_emb = self._embed(embed_text_fn, self.split.text_batches(), txt2img.shape[0], "texts")
    return group_retrieval_metrics(txt_emb, txt_emb, txt2img, txt2img, self.ks, self.chunk,
                                   exclude_self=True)


class ImageInstanceEvaluator(_SplitEvaluator):
  """Image -> image instance retrieval: the augmented view of seed QUERY_SEED of each image
  queries the views of seed GALLERY_SEED of all images; a hit is the view of the same image.

  `split` gives `num_images` and `view_batches(seed)` (dicts with `image`, `valid`: one
  augmented view of every image, in a fixed order, the same for the same seed).
  """
  QUERY_SEED, GALLERY_SEED = 0, 1

  def run(self, embed_image_fn):
    """Embeds both views of every image and returns `group_retrieval_metrics`' dict (`r{k}`,
    `medr`).

    Args:
      embed_image_fn: image batch dict -> [b, D] embeddings.

    Raises:
      ValueError when an embedded count does not match the split's `num_images`.
    """
    num_images = self.split.num_images
    queries, gallery = (
        self._embed(embed_image_fn, self.split.view_batches(seed), num_images, "images")
        for seed in (self.QUERY_SEED, self.GALLERY_SEED))
    image_ids = np.arange(num_images)
    return group_retrieval_metrics(queries, gallery, image_ids, image_ids, self.ks, self.chunk)


def _cross_modal_metrics(i2t_block, t2i_block, n_images, n_texts, txt2img, ks, chunk):
  """The `retrieval_metrics` dict: `_ranks` both ways, images grouped by their own index.

  Args:
    i2t_block: (image slice, text slice) -> [rows, cols] block of the [n_images, n_texts]
      scores.
    t2i_block: (text slice, image slice) -> the same scores, text-major.
    n_images, n_texts: the matrix shape.
    txt2img: [n_texts] int64, valid image indices.
    ks: checked K of the recalls.
    chunk: block side.
  """
  image_groups = np.arange(n_images)
  per_direction = {
      "i2t": _recalls(_ranks(i2t_block, image_groups, txt2img, chunk), ks),
      "t2i": _recalls(_ranks(t2i_block, txt2img, image_groups, chunk), ks)}
  metrics = {f"{direction}_r{k}": per_direction[direction][f"r{k}"]
             for direction in ("i2t", "t2i") for k in ks}
  metrics["rsum"] = float(sum(metrics.values()))
  metrics["r_mean"] = metrics["rsum"] / (2 * len(ks))
  for direction in ("i2t", "t2i"):
    for rank in ("medr", "meanr"):
      metrics[f"{direction}_{rank}"] = per_direction[direction][rank]
  return metrics


def _ranks(score_block, query_groups, gallery_groups, chunk, exclude_self=False):
  """1-based ranks of the queries that have a relevant gallery item (rule: module doc).

  Two passes over `chunk x chunk` blocks: the first reads each query's best relevant score (only
  blocks that hold a relevant pair are computed), the second counts the non-relevant items
  scoring >= it. Both passes compute a block the same way, so the relevant scores compare
  exactly with the candidates' scores.

  Args:
    score_block: (query slice, gallery slice) -> [rows, cols] block of the [n, m] scores.
    query_groups: [n] int64 group labels; gallery_groups: [m] int64.
    chunk: block side.
    exclude_self: gallery item i is neither relevant to nor a competitor of query i.

  Returns:
    int64 [n'] ranks, in query order, of the n' queries with a relevant item.
  """
  n_queries, n_gallery = query_groups.shape[0], gallery_groups.shape[0]
  # Float64 holds every float32 score exactly, and NaN stays NaN. np.maximum propagates NaN (on
  # purpose, silently): a NaN relevant score puts every competitor ahead.
  best = np.full(n_queries, -np.inf)
  has_relevant = np.zeros(n_queries, bool)
  for rows, cols in _blocks(n_queries, n_gallery, chunk):
    relevant, _ = _block_masks(query_groups, gallery_groups, rows, cols, exclude_self)
    if relevant is not None and relevant.any():
      scores = np.where(relevant, score_block(rows, cols), -np.inf)
      with np.errstate(invalid="ignore"):
        best[rows] = np.maximum(best[rows], scores.max(axis=1))
      has_relevant[rows] |= relevant.any(axis=1)

  ahead = np.zeros(n_queries, np.int64)
  for rows, cols in _blocks(n_queries, n_gallery, chunk):
    _, not_competing = _block_masks(query_groups, gallery_groups, rows, cols, exclude_self)
    # `not (score < best)` is `score >= best`, and also counts a NaN on either side as ahead.
    is_ahead = ~(score_block(rows, cols) < best[rows, None])
    if not_competing is not None:
      is_ahead &= ~not_competing
    ahead[rows] += np.count_nonzero(is_ahead, axis=1)
  return 1 + ahead[has_relevant]


def _block_masks(query_groups, gallery_groups, rows, cols, exclude_self):
  """(relevant, not competing) bool [rows, cols] masks of one block: same group (and not the
  query itself with exclude_self); same group or the query itself. (None, None) when the block
  holds no such pair, which is most blocks when the groups come sorted (captions in image
  order), and costs O(chunk log chunk) instead of O(chunk^2) to find."""
  row_groups, col_groups = query_groups[rows], gallery_groups[cols]
  holds_self = exclude_self and rows.start < cols.stop and cols.start < rows.stop
  if not holds_self and not np.isin(row_groups, col_groups).any():
    return None, None
  same_group = row_groups[:, None] == col_groups[None, :]
  if not exclude_self:
    return same_group, same_group
  is_self = np.arange(rows.start, rows.stop)[:, None] == np.arange(cols.start, cols.stop)[None, :]
  return same_group & ~is_self, same_group | is_self


def _blocks(n_rows, n_cols, chunk):
  """Yields (row slice, column slice) of the `chunk x chunk` tiles of [n_rows, n_cols]."""
  for i0 in range(0, n_rows, chunk):
    for j0 in range(0, n_cols, chunk):
      yield slice(i0, min(i0 + chunk, n_rows)), slice(j0, min(j0 + chunk, n_cols))


def _recalls(ranks, ks):
  """int [n'] 1-based ranks -> {"r{k}": percent with rank <= k, "medr": median rank,
  "meanr": mean rank}."""
  metrics = {f"r{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
  metrics["medr"] = float(np.median(ranks))
  metrics["meanr"] = float(np.mean(ranks))
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


def _checked_owners(owners, n, num_owners, name):
  """owners as int64 [n], every entry an index in [0, num_owners)."""
  owners = _checked_groups(owners, n, name)
  bad = np.flatnonzero((owners < 0) | (owners >= num_owners))
  if bad.size:
    raise ValueError(f"{name}[{bad[0]}] = {owners[bad[0]]} is not an owner index in "
                     f"[0, {num_owners})")
  return owners


def _checked_groups(groups, n, name):
  """groups as int64 [n]."""
  groups = np.asarray(groups)
  if groups.ndim != 1 or groups.shape[0] != n:
    raise ValueError(f"{name} must be [{n}], got shape {groups.shape}")
  if not np.issubdtype(groups.dtype, np.integer):
    raise ValueError(f"{name} must hold integer group labels, got dtype {groups.dtype}")
  return groups.astype(np.int64)


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
