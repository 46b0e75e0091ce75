"""Losses and AMF against independent float64 numpy references (method.md §4, 11-17, 32-34)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cots_jax import losses

B, K, D = 3, 5, 4
TEMP = 0.07


def _unit_rows(rng, rows, dim=D):
  x = rng.normal(size=(rows, dim))
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  shifted = x - x.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _np_logits(q, k, queue, valid, temp, in_batch):
  """Row i: [q_i·k_i] or [q_i·k_j for all j], then q_i·queue, / temp; invalid slots NEG_INF."""
  rows = []
  for i in range(q.shape[0]):
    keys = [q[i] @ k[j] for j in range(k.shape[0])] if in_batch else [q[i] @ k[i]]
    queued = [q[i] @ queue[s] / temp if valid[s] else losses.NEG_INF for s in range(len(valid))]
    rows.append([x / temp for x in keys] + queued)
  return np.array(rows)


def _np_kl(logits_a, logits_b):
  """KL(softmax(a) || softmax(b)) per row, skipping zero-probability entries."""
  log_a, log_b = _np_log_softmax(logits_a), _np_log_softmax(logits_b)
  p = np.exp(log_a)
  return np.where(p > 0, p * (log_a - log_b), 0.0).sum(-1)


@pytest.fixture
def embeddings():
  rng = np.random.default_rng(0)
  return {"q": _unit_rows(rng, B), "k": _unit_rows(rng, B), "queue": _unit_rows(rng, K),
          "valid": np.array([True, False, True, True, False])}


@pytest.mark.parametrize("in_batch", [False, True])
def test_contrastive_logits_match_numpy_and_mask_invalid_slots(embeddings, in_batch):
  e = embeddings
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  got = losses.contrastive_logits(f32(e["q"]), f32(e["k"]), f32(e["queue"]),
                                  jnp.asarray(e["valid"]), TEMP, in_batch)
  want = _np_logits(e["q"], e["k"], e["queue"], e["valid"], TEMP, in_batch)
  assert got.shape == (B, (B if in_batch else 1) + K)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  num_keys = B if in_batch else 1
  assert np.all(np.asarray(got)[:, num_keys:][:, ~e["valid"]] == losses.NEG_INF)


def test_contrastive_logits_use_float32_math_for_bfloat16_inputs(embeddings):
  e = embeddings
  as_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  got = losses.contrastive_logits(as_bf16(e["q"]), as_bf16(e["k"]), as_bf16(e["queue"]),
                                  jnp.asarray(e["valid"]), TEMP, False)
  rounded = {n: np.asarray(as_bf16(e[n]), np.float64) for n in ("q", "k", "queue")}
  want = _np_logits(rounded["q"], rounded["k"], rounded["queue"], e["valid"], TEMP, False)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_batch", [False, True])
def test_itc_targets_one_hot_at_the_positive(in_batch):
  ids = jnp.array([7, 7, 9])
  got = np.asarray(losses.itc_targets(ids, jnp.array([7, 7, 9, 1, 7]), jnp.ones(K, bool),
                                      in_batch, multi_positive=False))
  num_keys = B if in_batch else 1
  want = np.zeros((B, num_keys + K))
  for i in range(B):
    want[i, i if in_batch else 0] = 1.0
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("in_batch", [False, True])
def test_itc_targets_multi_positive_spread_over_valid_matches(in_batch):
  ids = np.array([7, 7, 9])
  queue_ids = np.array([7, 9, 7, 1, 9])
  queue_valid = np.array([True, True, False, True, False])
  got = np.asarray(losses.itc_targets(jnp.asarray(ids), jnp.asarray(queue_ids),
                                      jnp.asarray(queue_valid), in_batch, multi_positive=True))
  want = []
  for i in range(B):
    keys = [float(ids[j] == ids[i]) for j in range(B)] if in_batch else [1.0]
    queued = [float(queue_valid[s] and queue_ids[s] == ids[i]) for s in range(K)]
    row = np.array(keys + queued)
    want.append(row / row.sum())
  np.testing.assert_allclose(got, np.array(want), rtol=1e-6)
  # Pair 0 (id 7): its own key, pair 1's key when in-batch, queue slot 0; slot 2 is invalid.
  assert np.count_nonzero(got[0]) == (3 if in_batch else 2)


def test_soft_cross_entropy_matches_numpy():
  rng = np.random.default_rng(1)
  logits, targets = rng.normal(size=(B, 6)), rng.dirichlet(np.ones(6), size=B)
  got = losses.soft_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
  np.testing.assert_allclose(got, -(targets * _np_log_softmax(logits)).sum(-1), rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_loss_matches_numpy_cross_entropy(alpha):
  rng = np.random.default_rng(2)
  i2t, t2i, m_i2t, m_t2i = (rng.normal(size=(B, 1 + K)) for _ in range(4))
  i2t[:, 2] = t2i[:, 2] = m_i2t[:, 2] = m_t2i[:, 2] = losses.NEG_INF
  onehot = np.zeros((B, 1 + K))
  onehot[:, 0] = 1.0

  def np_ce(logits, momentum):
    momentum_probs = np.exp(_np_log_softmax(momentum))
    target = alpha * momentum_probs + (1 - alpha) * onehot
    return -(target * _np_log_softmax(logits)).sum(-1)

  f32 = lambda x: jnp.asarray(x, jnp.float32)
  got = losses.itc_loss(f32(i2t), f32(t2i), f32(onehot), f32(m_i2t), f32(m_t2i), alpha=alpha)
  want = 0.5 * (np_ce(i2t, m_i2t) + np_ce(t2i, m_t2i))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_itc_loss_stops_gradient_into_momentum_logits():
  rng = np.random.default_rng(3)
  i2t, t2i, m_i2t, m_t2i = (jnp.asarray(rng.normal(size=(B, 1 + K)), jnp.float32)
                            for _ in range(4))
  targets = jax.nn.one_hot(jnp.zeros(B, jnp.int32), 1 + K)
  grads = jax.grad(lambda m1, m2: losses.itc_loss(i2t, t2i, targets, m1, m2, 0.4).sum(),
                   argnums=(0, 1))(m_i2t, m_t2i)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


def test_itc_loss_with_alpha_needs_momentum_logits():
  logits = jnp.zeros((B, 1 + K))
  with pytest.raises(ValueError, match="itc_alpha"):
    losses.itc_loss(logits, logits, jax.nn.softmax(logits), alpha=0.4)


def test_info_nce_matches_numpy_both_directions():
  """½[CE(a bᵀ/τ, diag) + CE(b aᵀ/τ, diag)] per pair, against a float64 numpy reference; a
  temperature-scaled row-wise and column-wise softmax, so it is symmetric in (a, b)."""
  rng = np.random.default_rng(3)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  a, b = (unit(rng.normal(size=(6, 8))).astype(np.float32) for _ in range(2))
  logits = np.float64(a) @ np.float64(b).T / 0.05
  log_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  log_cols = logits - np.log(np.exp(logits).sum(0, keepdims=True))
  want = -0.5 * (np.diag(log_rows) + np.diag(log_cols))
  got = losses.info_nce(jnp.asarray(a), jnp.asarray(b), 0.05)
  assert got.shape == (6,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(losses.info_nce(b, a, 0.05), want, rtol=1e-5)
  # Identical, well separated rows: each pair's own similarity dominates, the loss nears 0.
  assert float(jnp.max(losses.info_nce(jnp.eye(4), jnp.eye(4), 0.01))) < 1e-6
  grads = jax.grad(lambda x, y: jnp.mean(losses.info_nce(x, y, 0.07)), argnums=(0, 1))(a, b)
  assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in grads)


def test_info_nce_with_k_captions_per_image_matches_numpy():
  """b holds K = 3 rows per row of a (its captions): image i's positives are its K captions
  (and those of another row of the same image id), each caption's positives its image; the
  caption side is averaged over each image's K rows."""
  rng = np.random.default_rng(6)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  k, ids = 3, np.array([4, 9, 4, 2], np.int32)
  a = unit(rng.normal(size=(4, 8))).astype(np.float32)
  b = unit(rng.normal(size=(4 * k, 8))).astype(np.float32)
  logits = np.float64(a) @ np.float64(b).T / 0.1
  match = np.float64(ids[:, None] == np.repeat(ids, k)[None, :])
  log_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  log_cols = (logits - np.log(np.exp(logits).sum(0, keepdims=True))).T
  ce_ab = -(match / match.sum(1, keepdims=True) * log_rows).sum(1)
  ce_ba = -(match.T / match.T.sum(1, keepdims=True) * log_cols).sum(1)
  want = 0.5 * (ce_ab + ce_ba.reshape(4, k).mean(1))
  np.testing.assert_allclose(losses.info_nce(a, b, 0.1, jnp.asarray(ids)), want, rtol=1e-5)
  # Without ids the rows are distinct images.
  match = np.float64(np.arange(4)[:, None] == np.repeat(np.arange(4), k)[None, :])
  ce_ab = -(match / match.sum(1, keepdims=True) * log_rows).sum(1)
  ce_ba = -(match.T / match.T.sum(1, keepdims=True) * log_cols).sum(1)
  np.testing.assert_allclose(losses.info_nce(a, b, 0.1), 0.5 * (ce_ab + ce_ba.reshape(4, k)
                                                                .mean(1)), rtol=1e-5)


def test_multi_positive_info_nce_spreads_the_target_over_the_pairs_of_one_image():
  """With image ids, every pair of the same image is a positive: target mass 1/m on each of
  the m columns of the row's image, both ways; a float64 numpy reference."""
  rng = np.random.default_rng(5)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  a, b = (unit(rng.normal(size=(6, 8))).astype(np.float32) for _ in range(2))
  ids = np.array([7, 3, 7, 1, 3, 7], np.int32)
  logits = np.float64(a) @ np.float64(b).T / 0.05
  log_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  log_cols = (logits - np.log(np.exp(logits).sum(0, keepdims=True))).T
  same = np.float64(ids[:, None] == ids[None, :])
  target = same / same.sum(1, keepdims=True)
  want = -0.5 * ((target * log_rows).sum(1) + (target * log_cols).sum(1))
  got = losses.info_nce(jnp.asarray(a), jnp.asarray(b), 0.05, jnp.asarray(ids))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  single = losses.info_nce(jnp.asarray(a), jnp.asarray(b), 0.05)
  assert np.abs(np.asarray(got) - np.asarray(single)).max() > 0.1
  # Distinct ids are the single-positive loss.
  np.testing.assert_allclose(losses.info_nce(a, b, 0.05, jnp.arange(6)), single, rtol=1e-5)



@pytest.mark.parametrize("direction", losses.KL_DIRECTIONS)
def test_kl_alignment_matches_numpy(direction):
  rng = np.random.default_rng(4)
  i2t, t2i = rng.normal(size=(B, 1 + K)), rng.normal(size=(B, 1 + K))
  got = losses.kl_alignment(jnp.asarray(i2t, jnp.float32), jnp.asarray(t2i, jnp.float32), direction)
  want = {"sym": 0.5 * (_np_kl(i2t, t2i) + _np_kl(t2i, i2t)),
          "i2t_to_t2i": _np_kl(i2t, t2i), "t2i_to_i2t": _np_kl(t2i, i2t)}[direction]
  assert np.all(want > 1e-3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("direction", losses.KL_DIRECTIONS)
def test_kl_alignment_is_zero_for_identical_distributions(direction):
  logits = jnp.asarray(np.random.default_rng(5).normal(size=(B, 1 + K)) / TEMP, jnp.float32)
  np.testing.assert_allclose(losses.kl_alignment(logits, logits, direction), 0.0, atol=1e-5)


@pytest.mark.parametrize("direction", losses.KL_DIRECTIONS)
def test_kl_alignment_finite_and_exact_with_masked_columns(direction, embeddings):
  e = embeddings
  rng = np.random.default_rng(6)
  v, t = jnp.asarray(e["q"], jnp.float32), jnp.asarray(e["k"], jnp.float32)
  img_keys = jnp.asarray(_unit_rows(rng, B), jnp.float32)
  queue_img = jnp.asarray(_unit_rows(rng, K), jnp.float32)
  queue_txt, valid = jnp.asarray(e["queue"], jnp.float32), jnp.asarray(e["valid"])

  def loss(v, t):
    i2t = losses.contrastive_logits(v, t, queue_txt, valid, TEMP, False)
    t2i = losses.contrastive_logits(t, img_keys, queue_img, valid, TEMP, False)
    return losses.kl_alignment(i2t, t2i, direction)

  got = loss(v, t)
  grads = jax.grad(lambda v, t: loss(v, t).sum(), argnums=(0, 1))(v, t)
  # Reference: the same KL over the valid columns only.
  keep = np.concatenate([[True], e["valid"]])
  i2t = _np_logits(e["q"], e["k"], e["queue"], e["valid"], TEMP, False)[:, keep]
  t2i = _np_logits(e["k"], np.asarray(img_keys), np.asarray(queue_img), e["valid"], TEMP,
                   False)[:, keep]
  want = {"sym": 0.5 * (_np_kl(i2t, t2i) + _np_kl(t2i, i2t)),
          "i2t_to_t2i": _np_kl(i2t, t2i), "t2i_to_i2t": _np_kl(t2i, i2t)}[direction]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  for g in grads:
    assert np.all(np.isfinite(g)) and np.any(g != 0)


@pytest.mark.parametrize("direction, target_arg", [("i2t_to_t2i", 0), ("t2i_to_i2t", 1)])
def test_kl_stopgrad_target_detaches_the_target_side(direction, target_arg):
  rng = np.random.default_rng(7)
  i2t, t2i = (jnp.asarray(rng.normal(size=(B, 1 + K)), jnp.float32) for _ in range(2))

  def grads(stopgrad):
    return jax.grad(lambda a, b: losses.kl_alignment(a, b, direction, stopgrad).sum(),
                    argnums=(0, 1))(i2t, t2i)

  detached, attached = grads(True), grads(False)
  np.testing.assert_array_equal(detached[target_arg], 0.0)
  assert np.abs(attached[target_arg]).max() > 1e-3
  np.testing.assert_allclose(detached[1 - target_arg], attached[1 - target_arg], rtol=1e-6)


def test_kl_alignment_rejects_unknown_direction():
  logits = jnp.zeros((B, 1 + K))
  with pytest.raises(ValueError, match="'backwards'"):
    losses.kl_alignment(logits, logits, "backwards")


def test_clamp_temperature_values_and_gradient():
  np.testing.assert_allclose(
      [losses.clamp_temperature(t, 0.001, 0.5) for t in (0.0001, 0.07, 0.9)], [0.001, 0.07, 0.5],
      rtol=1e-6)
  grad = jax.grad(lambda t: losses.clamp_temperature(t, 0.001, 0.5))
  assert [float(grad(t)) for t in (0.0001, 0.07, 0.9)] == [0.0, 1.0, 0.0]


def _masked_inputs(rng, positions=4, vocab=6):
  logits = rng.normal(size=(B, positions, vocab))
  targets = rng.integers(0, vocab, size=(B, positions))
  weights = (rng.random(size=(B, positions)) < 0.6).astype(np.float64)
  weights[0, 0] = 1.0
  targets[weights == 0] = -100  # padding ids are arbitrary
  return logits, targets, weights


def _masked_prediction_loss(logits, targets, weights, pair_weights):
  """The MLM / MVM term as the step forms it: token CE, then the AMF-weighted masked mean."""
  return losses.masked_mean(losses.token_cross_entropy(logits, targets), weights, pair_weights)


def test_masked_prediction_loss_and_its_gradient_match_numpy():
  logits, targets, weights = _masked_inputs(np.random.default_rng(8))
  pair_weights = np.array([1.0, 0.0, 1.0])
  log_probs = _np_log_softmax(logits)
  total, count = 0.0, 0.0
  want_grad = np.zeros_like(logits)
  for i in range(B):
    for p in range(targets.shape[1]):
      if weights[i, p] and pair_weights[i]:
        total += -log_probs[i, p, targets[i, p]]
        count += 1
        want_grad[i, p] = np.exp(log_probs[i, p])
        want_grad[i, p, targets[i, p]] -= 1.0
  loss = lambda x: _masked_prediction_loss(x, jnp.asarray(targets), jnp.asarray(weights),
                                           jnp.asarray(pair_weights))
  got, grad = jax.value_and_grad(loss)(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(got, total / count, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad / count, rtol=1e-5, atol=1e-7)


def test_masked_prediction_loss_with_nothing_masked_is_zero_with_zero_gradient():
  logits, targets, weights = _masked_inputs(np.random.default_rng(9))
  loss = lambda x: _masked_prediction_loss(x, jnp.asarray(targets),
                                           jnp.zeros_like(jnp.asarray(weights)), jnp.ones(B))
  value, grad = jax.value_and_grad(loss)(jnp.asarray(logits, jnp.float32))
  assert float(value) == 0.0
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad, 0.0)


def test_weighted_mean_matches_numpy():
  per_pair, weights = np.array([1.0, 2.0, 4.0]), np.array([1.0, 0.0, 1.0])
  got = losses.weighted_mean(jnp.asarray(per_pair), jnp.asarray(weights))
  np.testing.assert_allclose(got, (per_pair * weights).sum() / weights.sum(), rtol=1e-6)
  assert float(losses.weighted_mean(jnp.asarray(per_pair), jnp.zeros(B))) == 0.0


def test_amf_first_update_initialises_from_the_batch():
  stats = losses.amf_init()
  assert (float(stats["mu"]), float(stats["var"]), int(stats["count"])) == (0.0, 0.0, 0)
  assert stats["count"].dtype == jnp.int32
  scores = np.array([0.2, 0.5, 0.8, 0.1])
  stats = losses.amf_update(stats, jnp.asarray(scores, jnp.float32), beta=0.99)
  np.testing.assert_allclose([stats["mu"], stats["var"]], [scores.mean(), scores.var()], rtol=1e-6)
  assert int(stats["count"]) == 1


def test_amf_statistics_follow_numpy_ema():
  rng = np.random.default_rng(10)
  batches = rng.normal(0.5, 0.1, size=(5, 8))
  beta = 0.9
  update = jax.jit(losses.amf_update)
  stats = losses.amf_init()
  mu, var = batches[0].mean(), batches[0].var()
  for n, batch in enumerate(batches):
    stats = update(stats, jnp.asarray(batch, jnp.float32), beta)
    if n:
      mu = beta * mu + (1 - beta) * batch.mean()
      var = beta * var + (1 - beta) * batch.var()
  np.testing.assert_allclose([stats["mu"], stats["var"]], [mu, var], rtol=1e-5)
  assert int(stats["count"]) == len(batches)


def test_amf_drops_injected_mismatched_pairs_and_keeps_clean_ones():
  rng = np.random.default_rng(11)
  clean, noisy = 200, 12
  stats, weights = losses.amf_init(), None
  for _ in range(20):
    scores = np.concatenate([rng.normal(0.6, 0.05, clean), rng.normal(0.05, 0.05, noisy)])
    scores = jnp.asarray(scores, jnp.float32)
    stats = losses.amf_update(stats, scores, beta=0.9)
    weights = np.asarray(losses.amf_weights(stats, scores, 2.0, jnp.array(True)))
  assert set(np.unique(weights)) <= {0.0, 1.0}
  assert weights[clean:].sum() == 0.0
  assert weights[:clean].mean() >= 0.95


def test_amf_inactive_keeps_every_pair_even_when_traced():
  stats = {"mu": jnp.float32(0.9), "var": jnp.float32(0.01), "count": jnp.int32(5)}
  scores = jnp.array([0.1, 0.95, 0.5])
  weights_fn = jax.jit(losses.amf_weights)
  np.testing.assert_array_equal(weights_fn(stats, scores, 2.0, jnp.array(False)), [1.0, 1.0, 1.0])
  np.testing.assert_array_equal(weights_fn(stats, scores, 2.0, jnp.array(True)), [0.0, 1.0, 0.0])


@pytest.mark.parametrize("var", [0.0, 0.01])
def test_amf_infinite_lambda_keeps_all_and_minus_infinite_drops_all(var):
  stats = {"mu": jnp.float32(0.5), "var": jnp.float32(var), "count": jnp.int32(3)}
  scores = jnp.array([-0.9, 0.1, 0.5, 0.99])
  np.testing.assert_array_equal(losses.amf_weights(stats, scores, np.inf, True), 1.0)
  np.testing.assert_array_equal(losses.amf_weights(stats, scores, -np.inf, True), 0.0)


def test_amf_dropping_everything_gives_zero_loss_and_zero_finite_gradient(embeddings):
  e = embeddings
  queries, keys = jnp.asarray(e["q"], jnp.float32), jnp.asarray(e["k"], jnp.float32)
  queue, valid = jnp.asarray(e["queue"], jnp.float32), jnp.asarray(e["valid"])
  stats = losses.amf_update(losses.amf_init(), jnp.sum(queries * keys, -1), 0.99)

  def total(queries):
    i2t = losses.contrastive_logits(queries, keys, queue, valid, TEMP, False)
    t2i = losses.contrastive_logits(keys, queries, queue, valid, TEMP, False)
    per_pair = (losses.itc_loss(i2t, t2i, jax.nn.one_hot(jnp.zeros(B, jnp.int32), 1 + K))
                + losses.kl_alignment(i2t, t2i))
    weights = losses.amf_weights(stats, jnp.sum(queries * keys, -1), -jnp.inf, True)
    return losses.weighted_mean(per_pair, weights)

  value, grad = jax.value_and_grad(total)(queries)
  assert float(value) == 0.0
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad, 0.0)
