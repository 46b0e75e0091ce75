"""Retrieval metrics (design §4.1) against a sort-based numpy reference, and the evaluator."""

import tracemalloc
import types

import numpy as np
import pytest

from cots_jax.evaluators import retrieval


def reference_ranks(sim, txt2img):
  """1-based ranks by sorting each query's candidates, ties broken against the query.

  Candidates are sorted by descending score, a ground truth after any candidate with an
  equal score; the rank is the position of the first ground truth in that order, counting
  the other ground truths of the query as absent.
  """
  n_images, n_texts = sim.shape
  i2t = []
  for image in range(n_images):
    gts = {t for t in range(n_texts) if txt2img[t] == image}
    if not gts:
      continue
    best = max(sim[image, t] for t in gts)
    candidates = [(s, False) for t, s in enumerate(sim[image]) if t not in gts] + [(best, True)]
    order = sorted(candidates, key=lambda c: (-c[0], c[1]))
    i2t.append(1 + order.index((best, True)))
  t2i = []
  for text in range(n_texts):
    order = sorted(range(n_images), key=lambda i: (-sim[i, text], i == txt2img[text]))
    t2i.append(1 + order.index(txt2img[text]))
  return np.array(i2t), np.array(t2i)


def reference_metrics(sim, txt2img, ks):
  """The §4.1 dict from `reference_ranks`."""
  i2t, t2i = reference_ranks(np.asarray(sim, np.float64), list(txt2img))
  metrics = {}
  for name, ranks in (("i2t", i2t), ("t2i", t2i)):
    for k in ks:
      metrics[f"{name}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
  metrics["rsum"] = sum(metrics.values())
  metrics["r_mean"] = metrics["rsum"] / (2 * len(ks))
  metrics["i2t_medr"] = float(np.median(i2t))
  metrics["i2t_meanr"] = float(np.mean(i2t))
  metrics["t2i_medr"] = float(np.median(t2i))
  metrics["t2i_meanr"] = float(np.mean(t2i))
  return metrics


def assert_metrics_close(got, want):
  assert list(got) == list(want)
  for key, value in want.items():
    assert type(got[key]) is float, key
    assert got[key] == pytest.approx(value, abs=1e-9), key


def test_hand_made_matrix_known_ranks():
  # Texts 0, 1 -> image 0; text 2 -> image 1; text 3 -> image 2.
  sim = np.array([[0.9, 0.1, 0.5, 0.3],
                  [0.2, 0.4, 0.8, 0.6],
                  [0.7, 0.3, 0.1, 0.0]])
  txt2img = np.array([0, 0, 1, 2])
  # i2t: image 0 best GT 0.9 -> 1; image 1 GT 0.8 -> 1; image 2 GT 0.0 -> 4 (3 texts ahead).
  # t2i: text 0 (0.9) -> 1; text 1 (0.1) -> 3; text 2 (0.8) -> 1; text 3 (0.0) -> 3.
  got = retrieval.retrieval_metrics(sim, txt2img, ks=(1, 3))
  want = {"i2t_r1": 200 / 3, "i2t_r3": 200 / 3, "t2i_r1": 50.0, "t2i_r3": 100.0,
          "rsum": 200 / 3 + 200 / 3 + 150.0, "r_mean": (400 / 3 + 150.0) / 4,
          "i2t_medr": 1.0, "i2t_meanr": 2.0, "t2i_medr": 2.0, "t2i_meanr": 2.0}
  assert_metrics_close(got, want)
  assert_metrics_close(got, reference_metrics(sim, txt2img, (1, 3)))


def test_default_ks_keys():
  sim = np.eye(12)
  got = retrieval.retrieval_metrics(sim, np.arange(12))
  assert list(got) == ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                       "rsum", "r_mean", "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr"]
  assert got["rsum"] == 600.0 and got["r_mean"] == 100.0
  assert got["i2t_medr"] == got["t2i_medr"] == 1.0


def test_tie_with_ground_truth_ranks_ahead():
  sim = np.array([[1.0, 1.0, 0.0],
                  [0.5, 0.2, 0.2]])
  txt2img = np.array([0, 1, 1])
  # Image 0: text 1 ties GT -> rank 2. Image 1: best GT 0.2, text 0 (0.5) ahead -> rank 2.
  # Text 0: image 1 (0.5) < 1.0 -> 1. Text 1: image 0 (1.0) > 0.2 -> 2. Text 2: 0.0 < 0.2 -> 1.
  got = retrieval.retrieval_metrics(sim, txt2img, ks=(1, 2))
  assert got["i2t_r1"] == 0.0 and got["i2t_r2"] == 100.0
  assert got["t2i_r1"] == pytest.approx(200 / 3)
  assert got["i2t_medr"] == 2.0 and got["t2i_medr"] == 1.0
  assert_metrics_close(got, reference_metrics(sim, txt2img, (1, 2)))


def test_collapsed_model_gets_worst_rank():
  n_images, per_image = 20, 2
  txt2img = np.repeat(np.arange(n_images), per_image)
  sim = np.full((n_images, n_images * per_image), 0.3)
  got = retrieval.retrieval_metrics(sim, txt2img, ks=(1, 5, 10))
  for k in (1, 5, 10):
    assert got[f"i2t_r{k}"] == 0.0 and got[f"t2i_r{k}"] == 0.0
  assert got["rsum"] == 0.0
  # Worst ranks: behind every other text (38 of them) / every other image (19).
  assert got["i2t_medr"] == n_images * per_image - per_image + 1
  assert got["t2i_medr"] == n_images
  chunked = retrieval.retrieval_metrics_chunked(
      np.ones((n_images, 4)), np.ones((n_images * per_image, 4)), txt2img, chunk=7)
  assert chunked == got


def test_images_without_text_left_out_of_i2t_but_still_candidates():
  # Image 1 has no text and scores highest for every text.
  sim = np.array([[0.9, 0.1, 0.2],
                  [1.0, 1.0, 1.0],
                  [0.0, 0.8, 0.7]])
  txt2img = np.array([0, 2, 2])
  got = retrieval.retrieval_metrics(sim, txt2img, ks=(1, 2))
  # i2t over images 0 and 2 only, both rank 1 (image 1 would have scored 0%).
  assert got["i2t_r1"] == 100.0 and got["i2t_medr"] == 1.0
  # t2i: image 1 is ahead of every ground truth.
  assert got["t2i_r1"] == 0.0 and got["t2i_r2"] == 100.0 and got["t2i_medr"] == 2.0
  assert_metrics_close(got, reference_metrics(sim, txt2img, (1, 2)))


def test_best_of_several_texts_counts_for_i2t():
  # Image 0 owns texts 0 and 2: text 2 is its top text, text 0 its worst.
  sim = np.array([[0.0, 0.5, 0.9, 0.4],
                  [0.3, 0.6, 0.1, 0.2]])
  txt2img = np.array([0, 1, 0, 1])
  got = retrieval.retrieval_metrics(sim, txt2img, ks=(1,))
  # Image 0 -> 1 (own text 0 is not a competitor); image 1 best GT 0.6 -> 1.
  assert got["i2t_r1"] == 100.0
  assert_metrics_close(got, reference_metrics(sim, txt2img, (1,)))


def test_nan_scores_never_rank_first():
  sim = np.array([[np.nan, 0.0], [0.5, np.nan]])
  got = retrieval.retrieval_metrics(sim, np.array([0, 1]), ks=(1,))
  assert got["i2t_r1"] == 0.0 and got["t2i_r1"] == 0.0
  # A NaN among an image's ground truths makes its best score NaN: worst rank, not the 0.9.
  sim = np.array([[np.nan, 0.9, 0.1], [0.0, 0.0, 0.5]])
  got = retrieval.retrieval_metrics(sim, np.array([0, 0, 1]), ks=(1,))
  assert got["i2t_r1"] == 50.0 and got["i2t_medr"] == 1.5


@pytest.mark.parametrize("seed", range(3))
def test_random_matrix_matches_reference(seed):
  rng = np.random.default_rng(seed)
  n_images, n_texts = 9, 23
  txt2img = rng.integers(0, n_images, n_texts)  # some images get no text, some several
  sim = rng.integers(0, 4, (n_images, n_texts)).astype(np.float32)  # many ties
  for ks in ((1, 5, 10), (2, 3)):
    assert_metrics_close(retrieval.retrieval_metrics(sim, txt2img, ks),
                         reference_metrics(sim, txt2img, ks))


@pytest.mark.parametrize("chunk", [1, 3, 5, 13, 29, 100])
def test_chunked_equals_full_random_embeddings(chunk):
  rng = np.random.default_rng(1)
  img = rng.normal(size=(13, 8)).astype(np.float32)
  txt = rng.normal(size=(29, 8)).astype(np.float32)
  txt2img = rng.integers(0, 13, 29)
  full = retrieval.retrieval_metrics(img @ txt.T, txt2img, ks=(1, 2, 5))
  assert retrieval.retrieval_metrics_chunked(img, txt, txt2img, ks=(1, 2, 5), chunk=chunk) == full
  assert_metrics_close(full, reference_metrics(img @ txt.T, txt2img, (1, 2, 5)))


@pytest.mark.parametrize("chunk", [1, 4, 7, 40])
def test_chunked_equals_full_with_exact_ties(chunk):
  rng = np.random.default_rng(2)
  img = rng.integers(-1, 2, (17, 3)).astype(np.float32)
  txt = rng.integers(-1, 2, (31, 3)).astype(np.float32)
  txt2img = np.repeat(np.arange(16), 2)[:31]  # image 16 has no text
  sim = img @ txt.T
  assert len(np.unique(sim)) < 10  # the case is about ties
  full = retrieval.retrieval_metrics(sim, txt2img)
  assert retrieval.retrieval_metrics_chunked(img, txt, txt2img, chunk=chunk) == full
  assert_metrics_close(full, reference_metrics(sim, txt2img, (1, 5, 10)))


def test_chunked_memory_stays_at_block_size():
  rng = np.random.default_rng(3)
  n_images, n_texts = 2000, 2500  # the full float32 matrix would be 20 MB
  img = rng.normal(size=(n_images, 4)).astype(np.float32)
  txt = rng.normal(size=(n_texts, 4)).astype(np.float32)
  txt2img = rng.integers(0, n_images, n_texts)
  tracemalloc.start()
  try:
    retrieval.retrieval_metrics_chunked(img, txt, txt2img, chunk=100)
    _, peak_bytes = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak_bytes < 2_000_000


@pytest.mark.parametrize("call, match", [
    (lambda: retrieval.retrieval_metrics(np.zeros(3), [0, 0, 0]), r"sim must be \[n_images"),
    (lambda: retrieval.retrieval_metrics(np.zeros((2, 3)), [0, 1]), r"txt2img must be \[n_texts\]"),
    (lambda: retrieval.retrieval_metrics(np.zeros((2, 3)), [0, 1, 2]), r"txt2img\[2\] = 2"),
    (lambda: retrieval.retrieval_metrics(np.zeros((2, 3)), [0, -1, 1]), r"txt2img\[1\] = -1"),
    (lambda: retrieval.retrieval_metrics(np.zeros((2, 3)), [0.0, 1.0, 1.0]), "integer"),
    (lambda: retrieval.retrieval_metrics(np.zeros((2, 0)), np.zeros(0, int)), "at least one text"),
    (lambda: retrieval.retrieval_metrics(np.zeros((2, 2)), [0, 1], ks=(1, 0)), "ks must be"),
    (lambda: retrieval.retrieval_metrics(np.zeros((2, 2)), [0, 1], ks=(1, 1)), "ks must be"),
    (lambda: retrieval.retrieval_metrics_chunked(np.zeros((2, 4)), np.zeros((3, 5)), [0, 1, 1]),
     "img_emb and txt_emb"),
    (lambda: retrieval.retrieval_metrics_chunked(np.zeros((2, 4)), np.zeros((3, 4)), [0, 1, 1],
                                                 chunk=0), "chunk must be"),
])
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def padded_batches(rows, batch_size, key):
  """Batches of `rows` under `key`, the last one padded with -1 rows marked invalid."""
  batches = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    n_pad = batch_size - len(chunk)
    batches.append({key: np.concatenate([chunk, np.full((n_pad,) + chunk.shape[1:], -1)]),
                    "valid": np.arange(batch_size) < len(chunk)})
  return batches


def test_embed_dataset_keeps_valid_rows_in_order():
  rows = np.arange(11 * 2).reshape(11, 2)
  batches = padded_batches(rows, 4, "x")
  # An all-padding batch in the middle changes nothing.
  batches.insert(1, {"x": np.full((4, 2), -1), "valid": np.zeros(4, bool)})
  calls = []

  def embed_fn(batch):
    calls.append(len(batch["valid"]))
    return batch["x"] * 10.0

  got = retrieval.embed_dataset(embed_fn, iter(batches))
  np.testing.assert_array_equal(got, rows * 10.0)
  assert calls == [4, 4, 4, 4]


def test_embed_dataset_errors():
  with pytest.raises(ValueError, match="no batches"):
    retrieval.embed_dataset(lambda b: b["x"], [])
  with pytest.raises(ValueError, match=r"must return \[b, E\]"):
    retrieval.embed_dataset(lambda b: b["x"][:2],
                            [{"x": np.zeros((3, 2)), "valid": np.ones(3, bool)}])


def one_hot_split(n_images, txt2img, batch_size=4):
  """A split whose images and texts carry their image index; embeddings are one-hot of it."""
  txt2img = np.asarray(txt2img)
  split = types.SimpleNamespace(txt2img=txt2img, num_images=n_images)
  image_ids = np.arange(n_images)[:, None]
  split.image_batches = lambda: (
      {"image": b["image"], "valid": b["valid"]} for b in padded_batches(image_ids, batch_size,
                                                                          "image"))
  split.text_batches = lambda: (
      {"text_ids": b["text_ids"], "text_mask": np.ones_like(b["text_ids"]), "valid": b["valid"]}
      for b in padded_batches(txt2img[:, None], batch_size, "text_ids"))
  return split


def test_evaluator_perfect_embeddings_score_100():
  n_images = 7
  txt2img = np.repeat(np.arange(n_images), 2)
  split = one_hot_split(n_images, txt2img)
  eye = np.vstack([np.eye(n_images), np.zeros((1, n_images))])  # padding index -1 -> zeros

  evaluator = retrieval.RetrievalEvaluator("val", split, ks=(1, 5), chunk=3)
  got = evaluator.run(lambda b: eye[b["image"][:, 0]], lambda b: eye[b["text_ids"][:, 0]])
  assert got == {"i2t_r1": 100.0, "i2t_r5": 100.0, "t2i_r1": 100.0, "t2i_r5": 100.0,
                 "rsum": 400.0, "r_mean": 100.0, "i2t_medr": 1.0, "i2t_meanr": 1.0,
                 "t2i_medr": 1.0, "t2i_meanr": 1.0}
  video = retrieval.RetrievalEvaluator("val", split, ks=(1, 5), chunk=3, directions=("v2t", "t2v"))
  renamed = video.run(lambda b: eye[b["image"][:, 0]], lambda b: eye[b["text_ids"][:, 0]])
  assert list(renamed) == ["v2t_r1", "v2t_r5", "t2v_r1", "t2v_r5", "rsum", "r_mean", "v2t_medr",
                           "v2t_meanr", "t2v_medr", "t2v_meanr"]
  assert list(renamed.values()) == list(got.values())


def test_evaluator_matches_reference_on_random_embeddings():
  rng = np.random.default_rng(4)
  n_images = 10
  txt2img = rng.integers(0, n_images, 25)
  split = one_hot_split(n_images, txt2img, batch_size=6)
  img_table, txt_table = rng.normal(size=(n_images, 5)), rng.normal(size=(25, 5))
  text_index = iter(range(25))

  def embed_text(batch):  # the i-th valid text gets txt_table[i]
    return np.stack([txt_table[next(text_index)] if v else np.zeros(5) for v in batch["valid"]])

  got = retrieval.RetrievalEvaluator("val", split, chunk=4).run(
      lambda b: img_table[b["image"][:, 0]], embed_text)
  assert_metrics_close(got, reference_metrics(img_table @ txt_table.T, txt2img, (1, 5, 10)))


def test_evaluator_count_mismatch_raises():
  txt2img = np.repeat(np.arange(5), 2)
  split = one_hot_split(5, txt2img)
  eye = np.vstack([np.eye(5), np.zeros((1, 5))])
  embed_image = lambda b: eye[b["image"][:, 0]]
  embed_text = lambda b: eye[b["text_ids"][:, 0]]

  short_texts = one_hot_split(5, txt2img[:-1])
  short_texts.txt2img = txt2img
  with pytest.raises(ValueError, match=r"'val'.*9 texts.*has 10"):
    retrieval.RetrievalEvaluator("val", short_texts).run(embed_image, embed_text)

  short_images = one_hot_split(4, txt2img)
  split.image_batches = short_images.image_batches
  with pytest.raises(ValueError, match=r"'val'.*4 images.*has 5"):
    retrieval.RetrievalEvaluator("val", split).run(embed_image, embed_text)


def test_evaluator_rejects_bad_ks_and_chunk_at_construction():
  split = one_hot_split(2, [0, 1])
  with pytest.raises(ValueError, match="ks must be"):
    retrieval.RetrievalEvaluator("val", split, ks=())
  with pytest.raises(ValueError, match="chunk must be"):
    retrieval.RetrievalEvaluator("val", split, chunk=-1)


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_top_k_chunked_equals_full_top_k_with_ties(chunk):
  """Rounded embeddings make many equal scores: the lower gallery index must come first."""
  rng = np.random.default_rng(3)
  queries, gallery = np.round(rng.normal(size=(23, 3))), np.round(rng.normal(size=(31, 3)))
  scores, indices = retrieval.top_k_chunked(queries, gallery, 6, chunk=chunk)
  sim = queries @ gallery.T
  want = np.array([sorted(range(31), key=lambda g: (-sim[q, g], g))[:6] for q in range(23)])
  np.testing.assert_array_equal(indices, want)
  np.testing.assert_array_equal(scores, np.take_along_axis(sim, want, axis=1))
  assert (np.diff(scores, axis=1) <= 0).all()


def test_top_k_chunked_caps_k_at_the_gallery_and_puts_nan_last():
  gallery = np.array([[1.0], [np.nan], [3.0]])
  scores, indices = retrieval.top_k_chunked(np.array([[1.0], [-1.0]]), gallery, 10, chunk=2)
  np.testing.assert_array_equal(indices, [[2, 0, 1], [0, 2, 1]])
  np.testing.assert_array_equal(scores[:, :2], [[3.0, 1.0], [-1.0, -3.0]])
  assert np.isneginf(scores[:, 2]).all()


@pytest.mark.parametrize("call, match", [
    (lambda: retrieval.top_k_chunked(np.ones((2, 3)), np.ones((4, 2)), 1), "must be"),
    (lambda: retrieval.top_k_chunked(np.ones((2, 3)), np.ones((0, 3)), 1), "gallery is empty"),
    (lambda: retrieval.top_k_chunked(np.ones((2, 3)), np.ones((4, 3)), 0), "positive"),
    (lambda: retrieval.top_k_chunked(np.ones((2, 3)), np.ones((4, 3)), 2, chunk=0), "chunk"),
])
def test_top_k_chunked_bad_inputs(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ------------------------------------------------------------------- group_retrieval_metrics


def reference_group_ranks(sim, query_groups, gallery_groups, exclude_self):
  """1-based ranks by sorting each query's candidates (no NaN), ties against the query.

  The relevant items (same group, not the query itself with exclude_self) are replaced by their
  best score, sorted after any competitor of equal score; the query itself is no candidate.
  Queries with no relevant item get no rank.
  """
  ranks = []
  for q, group in enumerate(query_groups):
    others = [g for g in range(len(gallery_groups)) if not (exclude_self and g == q)]
    relevant = [g for g in others if gallery_groups[g] == group]
    if not relevant:
      continue
    best = max(sim[q, g] for g in relevant)
    candidates = [(sim[q, g], False) for g in others if gallery_groups[g] != group]
    order = sorted(candidates + [(best, True)], key=lambda c: (-c[0], c[1]))
    ranks.append(1 + order.index((best, True)))
  return np.array(ranks)


def reference_group_metrics(sim, query_groups, gallery_groups, ks, exclude_self=False):
  ranks = reference_group_ranks(np.asarray(sim, np.float64), list(query_groups),
                                list(gallery_groups), exclude_self)
  metrics = {f"r{k}": 100.0 * sum(r <= k for r in ranks) / len(ranks) for k in ks}
  metrics["medr"] = float(np.median(ranks))
  metrics["meanr"] = float(np.mean(ranks))
  return metrics


def test_group_metrics_hand_made_text_matching():
  # Captions 0, 1, 2 of image A, 3, 4 of image B, 5 alone (no hit to find: left out).
  emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.2, 0.8], [0.0, 1.0], [1.0, 0.0]])
  groups = np.array([7, 7, 7, 3, 3, 9])
  # 0: best own 0.9 (caption 1), caption 5 scores 1.0 -> rank 2.  1: best own 0.9 (caption 0),
  # caption 5 ties it (ahead) -> 2.  2: best own 0.1 (caption 1), captions 3 (0.8) and 4 (1.0)
  # ahead -> 3.  3: own 0.8 (caption 4), caption 2 ties it -> 2.  4: own 0.8 (caption 3),
  # caption 2 scores 1.0 -> 2.
  got = retrieval.group_retrieval_metrics(emb, emb, groups, groups, ks=(1, 2), exclude_self=True)
  assert got == {"r1": 0.0, "r2": 80.0, "medr": 2.0, "meanr": 2.2}
  assert got == pytest.approx(reference_group_metrics(emb @ emb.T, groups, groups, (1, 2), True))
  # Without exclude_self each query is one of its own relevant items, and caption 5 counts too.
  assert retrieval.group_retrieval_metrics(emb, emb, groups, groups, ks=(1, 2)) == pytest.approx(
      reference_group_metrics(emb @ emb.T, groups, groups, (1, 2)))


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_group_metrics_match_reference_with_ties_and_every_chunk(seed, exclude_self):
  rng = np.random.default_rng(seed)
  n = 23
  emb = rng.integers(-1, 2, (n, 3)).astype(np.float32)  # many exact ties
  gallery = rng.integers(-1, 2, (n, 3)).astype(np.float32)
  groups = rng.integers(0, 9, n)  # groups of one, two and more
  gallery_groups = rng.integers(0, 9, n)
  assert (np.bincount(groups) == 1).any()
  for query_emb, gallery_emb, gallery_g in ((emb, emb, groups), (emb, gallery, gallery_groups)):
    want = reference_group_metrics(query_emb @ gallery_emb.T, groups, gallery_g, (1, 5, 10),
                                   exclude_self)
    results = [retrieval.group_retrieval_metrics(query_emb, gallery_emb, groups, gallery_g,
                                                 chunk=chunk, exclude_self=exclude_self)
               for chunk in (1, 3, 1000)]
    assert results[0] == results[1] == results[2]
    assert list(results[0]) == ["r1", "r5", "r10", "medr", "meanr"]
    for key, value in want.items():
      assert type(results[0][key]) is float and results[0][key] == pytest.approx(value), key


def test_group_metrics_all_equal_scores_give_the_worst_rank():
  groups = np.repeat(np.arange(10), 2)
  emb = np.ones((20, 4))
  got = retrieval.group_retrieval_metrics(emb, emb, groups, groups, exclude_self=True, chunk=3)
  # Behind all 18 captions of the other images.
  assert got == {"r1": 0.0, "r5": 0.0, "r10": 0.0, "medr": 19.0, "meanr": 19.0}


def test_group_metrics_leave_out_queries_without_a_relevant_item():
  rng = np.random.default_rng(5)
  emb = rng.normal(size=(8, 4))
  groups = np.array([0, 0, 1, 1, 1, 2, 3, 4])  # queries 5, 6, 7 alone in their group
  got = retrieval.group_retrieval_metrics(emb, emb, groups, groups, ks=(1, 2), exclude_self=True)
  kept = reference_group_ranks(emb @ emb.T, groups, groups, exclude_self=True)
  assert len(kept) == 5
  assert got == pytest.approx({"r1": 100.0 * np.mean(kept <= 1), "r2": 100.0 * np.mean(kept <= 2),
                               "medr": float(np.median(kept)), "meanr": float(np.mean(kept))})


def test_group_metrics_with_image_and_text_groups_are_the_cross_modal_directions():
  rng = np.random.default_rng(6)
  img, txt = rng.normal(size=(9, 5)), rng.normal(size=(20, 5))
  txt2img = rng.integers(0, 9, 20)
  cross = retrieval.retrieval_metrics_chunked(img, txt, txt2img, chunk=4)
  i2t = retrieval.group_retrieval_metrics(img, txt, np.arange(9), txt2img, chunk=4)
  t2i = retrieval.group_retrieval_metrics(txt, img, txt2img, np.arange(9), chunk=4)
  for name, direction in (("i2t", i2t), ("t2i", t2i)):
    assert {key: cross[f"{name}_{key}"] for key in direction} == direction


def test_group_metrics_nan_scores_never_rank_first():
  query = np.array([[1.0, 0.0], [np.nan, 0.0]])
  gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
  # Query 0 (group 0): its relevant item scores 1.0, first. Query 1: every score is NaN.
  got = retrieval.group_retrieval_metrics(query, gallery, [0, 0], [0, 1, 2], ks=(1,))
  assert got == {"r1": 50.0, "medr": 2.0, "meanr": 2.0}


@pytest.mark.parametrize("call, match", [
    (lambda: retrieval.group_retrieval_metrics(np.ones((2, 3)), np.ones((4, 2)), [0, 1],
                                               [0, 1, 2, 3]), "query_emb and gallery_emb"),
    (lambda: retrieval.group_retrieval_metrics(np.ones((2, 3)), np.ones((4, 3)), [0, 1, 2],
                                               [0, 1, 2, 3]), r"query_groups must be \[2\]"),
    (lambda: retrieval.group_retrieval_metrics(np.ones((2, 3)), np.ones((4, 3)), [0, 1],
                                               [0.0, 1.0, 2.0, 3.0]), "gallery_groups.*integer"),
    (lambda: retrieval.group_retrieval_metrics(np.ones((2, 3)), np.ones((4, 3)), [0, 1],
                                               [0, 1, 2, 3], exclude_self=True),
     "exclude_self needs"),
    (lambda: retrieval.group_retrieval_metrics(np.ones((2, 3)), np.ones((2, 3)), [0, 1],
                                               [0, 1], exclude_self=True), "no query has"),
    (lambda: retrieval.group_retrieval_metrics(np.ones((2, 3)), np.ones((2, 3)), [0, 1],
                                               [0, 1], ks=(0,)), "ks must be"),
    (lambda: retrieval.group_retrieval_metrics(np.ones((2, 3)), np.ones((2, 3)), [0, 1],
                                               [0, 1], chunk=0), "chunk must be"),
])
def test_group_metrics_bad_inputs(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def reference_within_group_ranks(sim, query_owner, gallery_owner, owner_group):
  """Brute force: each query against the gallery items of its owner's group."""
  ranks = []
  for q, owner in enumerate(query_owner):
    candidates = [g for g, o in enumerate(gallery_owner) if owner_group[o] == owner_group[owner]]
    relevant = [g for g in candidates if gallery_owner[g] == owner]
    if relevant:
      best = max(sim[q, g] for g in relevant)
      ranks.append(1 + sum(not sim[q, g] < best for g in candidates if g not in relevant))
  return np.array(ranks)


def test_within_group_metrics_rank_only_against_the_query_owners_group():
  # Owners (clips) 0, 1 form group 0, owners 2, 3 group 1; texts 0-3 describe owners 0-3.
  clips = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
  texts = np.array([[0.6, 0.8], [0.6, 0.8], [1.0, 0.0], [1.0, 0.0]])
  groups = np.array([0, 0, 1, 1])
  owners = np.arange(4)
  # Text 0 scores clip 0 at 0.6 and its twin clip 1 at 0.96 -> rank 2; text 1: clip 1 best -> 1;
  # text 2: clip 2 0.0 < clip 3 0.6 -> 2; text 3: clip 3 0.6 > 0.0 -> 1. Texts 2 and 3 score
  # clip 0 at 1.0, but clip 0 is not in their group.
  got = retrieval.within_group_metrics(texts, clips, owners, owners, groups, ks=(1,))
  assert got == {"r1": 50.0, "medr": 1.5, "meanr": 1.5}
  rng = np.random.default_rng(7)
  query, gallery = rng.integers(-1, 2, (15, 3)), rng.integers(-1, 2, (10, 3))  # ties
  query_owner, gallery_owner = rng.integers(0, 6, 15), rng.integers(0, 6, 10)
  owner_group = np.array([0, 0, 1, 1, 1, 2])
  want = reference_within_group_ranks(query @ gallery.T, query_owner, gallery_owner, owner_group)
  got = retrieval.within_group_metrics(query, gallery, query_owner, gallery_owner, owner_group,
                                       ks=(1, 2))
  assert got == pytest.approx({"r1": 100.0 * np.mean(want <= 1), "r2": 100.0 * np.mean(want <= 2),
                               "medr": float(np.median(want)), "meanr": float(np.mean(want))})
  with pytest.raises(ValueError, match=r"query_owner\[0\] = 9 is not an owner index in \[0, 6\)"):
    retrieval.within_group_metrics(query, gallery, np.full(15, 9), gallery_owner, owner_group)


def test_within_group_evaluator_reports_both_directions():
  txt2img = np.repeat(np.arange(4), 2)
  split = one_hot_split(4, txt2img)
  eye = np.vstack([np.eye(4), np.zeros((1, 4))])
  evaluator = retrieval.WithinGroupEvaluator("direction", split, [0, 0, 1, 1],
                                             directions=("v2t", "t2v"))
  got = evaluator.run(lambda b: eye[b["image"][:, 0]], lambda b: eye[b["text_ids"][:, 0]])
  assert got == {"v2t_r1": 100.0, "v2t_medr": 1.0, "v2t_meanr": 1.0,
                 "t2v_r1": 100.0, "t2v_medr": 1.0, "t2v_meanr": 1.0}
  with pytest.raises(ValueError, match=r"image_groups must be \[4\], got shape \(3,\)"):
    retrieval.WithinGroupEvaluator("direction", split, [0, 0, 1])
