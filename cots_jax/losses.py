"""COTS and COOKIE losses as pure functions of logits and embeddings (method.md §1.3, §2.3,
§4 items 11-18).

Every loss returns a per-pair vector [B] (or, for the token losses, a scalar already weighted per
pair) so that the adaptive momentum filter (AMF) weights apply to each pair (design.md §8.2).
The math runs in float32 whatever the input dtype. Invalid logits are the finite `NEG_INF`, not
-inf, so that softmax gives them an exact 0 and 0·log 0 terms stay 0 (no NaN in values or grads).
"""

import jax
import jax.numpy as jnp
import optax

NEG_INF = -1e9

KL_DIRECTIONS = ("sym", "i2t_to_t2i", "t2i_to_i2t")


def clamp_temperature(temp, min_temp, max_temp):
  """Clips a (learnable) temperature to [min_temp, max_temp] (ALBEF); the gradient is 0 outside."""
  return jnp.clip(temp, min_temp, max_temp)


def contrastive_logits(queries, pos_keys, queue_keys, queue_valid, temp, in_batch_negatives):
  """Cross-modal momentum-contrast logits (method §4.11).

  Args:
    queries: [B, D] online embeddings of one modality, L2-normalised.
    pos_keys: [B, D] momentum keys of the other modality, row i paired with query i.
    queue_keys: [K, D] queued momentum keys of the other modality.
    queue_valid: [K] bool; False slots get NEG_INF.
    temp: scalar temperature (may be traced).
    in_batch_negatives: static bool. False (BriVL): column 0 is q_i·k_i. True (ALBEF): columns
      0..B-1 are q_i·k_j for every j in the batch.

  Returns:
    [B, 1 + K] or [B, B + K] float32 logits divided by `temp`, queue columns last.
  """
  queries = queries.astype(jnp.float32)
  pos_keys = pos_keys.astype(jnp.float32)
  if in_batch_negatives:
    key_logits = queries @ pos_keys.T
  else:
    key_logits = jnp.sum(queries * pos_keys, axis=-1, keepdims=True)
  queue_logits = queries @ queue_keys.astype(jnp.float32).T
  queue_logits = jnp.where(queue_valid[None, :], queue_logits / temp, NEG_INF)
  return jnp.concatenate([key_logits / temp, queue_logits], axis=1)


def itc_targets(image_ids, queue_image_ids, queue_valid, in_batch_negatives, multi_positive):
  """Target distributions over the columns of `contrastive_logits` (method §4.12).

  Args:
    image_ids: [B] int image id of each pair.
    queue_image_ids: [K] int image id of each queue slot.
    queue_valid: [K] bool; invalid slots are never positives.
    in_batch_negatives: static bool, the layout of the logits (positive at 0, or at i).
    multi_positive: static bool. True spreads the mass uniformly over every batch key and valid
      queue slot whose image id equals image_ids[i] (ALBEF `idx_queue`, for fine-tuning).

  Returns:
    [B, C] float32 rows summing to 1, C = 1 + K or B + K.
  """
  batch = image_ids.shape[0]
  num_keys = batch if in_batch_negatives else 1
  if not multi_positive:
    positive = jnp.arange(batch) if in_batch_negatives else jnp.zeros(batch, jnp.int32)
    return jax.nn.one_hot(positive, num_keys + queue_image_ids.shape[0], dtype=jnp.float32)
  if in_batch_negatives:
    key_match = image_ids[:, None] == image_ids[None, :]
  else:
    key_match = jnp.ones((batch, 1), bool)
  queue_match = (image_ids[:, None] == queue_image_ids[None, :]) & queue_valid[None, :]
  match = jnp.concatenate([key_match, queue_match], axis=1).astype(jnp.float32)
  return match / jnp.sum(match, axis=1, keepdims=True)


def soft_cross_entropy(logits, targets):
  """Cross-entropy of softmax(logits [B, C]) against target distributions [B, C]; returns [B]."""
  return optax.losses.softmax_cross_entropy(logits.astype(jnp.float32),
                                            targets.astype(jnp.float32))


def _distilled_targets(targets, momentum_logits, alpha):
  """alpha·softmax(momentum logits) + (1 - alpha)·targets (ALBEF momentum distillation)."""
  if alpha == 0:
    return targets
  if momentum_logits is None:
    raise ValueError(f"itc_loss: loss.itc_alpha={alpha} needs the momentum logits")
  soft = jax.nn.softmax(jax.lax.stop_gradient(momentum_logits.astype(jnp.float32)), axis=-1)
  return alpha * soft + (1.0 - alpha) * targets


def itc_loss(logits_i2t, logits_t2i, targets, momentum_logits_i2t=None,
             momentum_logits_t2i=None, alpha=0.0):
  """Per-pair instance loss ½·CE(i2t) + ½·CE(t2i) (method §4.12).

  Args:
    logits_i2t, logits_t2i: [B, C] from `contrastive_logits`.
    targets: [B, C] from `itc_targets`, shared by both directions (the index sets align).
    momentum_logits_i2t, momentum_logits_t2i: [B, C] the same logits with momentum queries;
      needed only when alpha > 0 (no gradient flows into them).
    alpha: static Python float, the weight of the momentum-distilled soft targets.

  Returns:
    [B] float32 per-pair loss.
  """
  ce_i2t = soft_cross_entropy(logits_i2t, _distilled_targets(targets, momentum_logits_i2t, alpha))
  ce_t2i = soft_cross_entropy(logits_t2i, _distilled_targets(targets, momentum_logits_t2i, alpha))
  return 0.5 * (ce_i2t + ce_t2i)


def info_nce(a, b, temp, image_ids=None):
  """Symmetric in-batch InfoNCE ½·[CE(a·bᵀ/τ, P) + CE(b·aᵀ/τ, Pᵀ)] per row of `a` (method
  §4.18), P the identity, or with `image_ids` every pair of the same image a positive (the target
  mass spread uniformly over them, as `itc_targets`).

  COOKIE's three terms: cross-modal (a = image, b = text embeddings), image-image (two views),
  text-text (two dropout passes), or WST-level against encoder-level embeddings ("cross_model").
  `b` may hold K rows per row of `a` (rows i·K..i·K+K-1: the K captions of image i,
  input.captions_per_image): each is a positive of a_i, and the b-side loss of a_i is the mean
  of its K rows'.

  Args:
    a: [B, D] L2-normalised embeddings; b: [B·K, D]. Gradients flow into both.
    temp: scalar temperature (may be traced).
    image_ids: None, or [B] int image id of each row of `a` (multi-positive targets).

  Returns:
    [B] float32 per-pair loss.
  """
  logits = a.astype(jnp.float32) @ b.astype(jnp.float32).T / temp
  per_row = b.shape[0] // a.shape[0]
  if image_ids is None and per_row == 1:
    diagonal = jnp.diagonal(logits)
    ce_ab = jax.nn.logsumexp(logits, axis=1) - diagonal
    ce_ba = jax.nn.logsumexp(logits, axis=0) - diagonal
    return 0.5 * (ce_ab + ce_ba)
  ids = jnp.arange(a.shape[0]) if image_ids is None else image_ids
  match = (ids[:, None] == jnp.repeat(ids, per_row)[None, :]).astype(jnp.float32)  # [B, B·K]
  ce_ab = soft_cross_entropy(logits, match / jnp.sum(match, axis=1, keepdims=True))
  ce_ba = soft_cross_entropy(logits.T, match.T / jnp.sum(match.T, axis=1, keepdims=True))
  return 0.5 * (ce_ab + jnp.mean(ce_ba.reshape(-1, per_row), axis=1))


def _kl(log_target, log_pred, stopgrad_target):
  """KL(target || pred) per row from log-probabilities [B, C]; returns [B]."""
  if stopgrad_target:
    log_target = jax.lax.stop_gradient(log_target)
  # optax takes the prediction first: Σ exp(log_targets)·(log_targets - log_predictions).
  return optax.losses.kl_divergence_with_log_targets(log_pred, log_target)


def kl_alignment(logits_i2t, logits_t2i, direction="sym", stopgrad_target=False):
  """Per-pair KL between the i2t and t2i distributions over the same columns (method §4.15).

  Args:
    logits_i2t, logits_t2i: [B, C] aligned logits (p = softmax(i2t), q = softmax(t2i)).
    direction: "sym" = ½KL(p||q) + ½KL(q||p); "i2t_to_t2i" = KL(p||q); "t2i_to_i2t" = KL(q||p).
    stopgrad_target: detach the first argument of each KL (distillation-style target).

  Returns:
    [B] float32, finite with NEG_INF columns.

  Raises:
    ValueError naming `direction` when it is unknown.
  """
  if direction not in KL_DIRECTIONS:
    raise ValueError(f"kl.direction {direction!r} is unknown; known: {', '.join(KL_DIRECTIONS)}")
  log_p = jax.nn.log_softmax(logits_i2t.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(logits_t2i.astype(jnp.float32), axis=-1)
  if direction == "i2t_to_t2i":
    return _kl(log_p, log_q, stopgrad_target)
  if direction == "t2i_to_i2t":
    return _kl(log_q, log_p, stopgrad_target)
  return 0.5 * (_kl(log_p, log_q, stopgrad_target) + _kl(log_q, log_p, stopgrad_target))


def token_cross_entropy(logits, targets):
  """Cross-entropy at each prediction slot (MLM / MVM).

  Args:
    logits: [B, P, V] predictions at the P fixed prediction slots of each example.
    targets: [B, P] int ids; padding slots may hold any value (clipped into range).

  Returns:
    float32 [B, P].
  """
  safe_targets = jnp.clip(targets, 0, logits.shape[-1] - 1)
  # logsumexp minus the target's logit: no [B, P, V] tensor of log-probabilities.
  return optax.losses.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                                safe_targets)


def masked_mean(values, weights, pair_weights):
  """Mean over the masked slots of the batch, each pair weighted (MLM / MVM, design §8.3).

  Args:
    values: [B, P] per-slot losses (`token_cross_entropy`).
    weights: [B, P] float, 1 for a real masked position, 0 for padding.
    pair_weights: [B] float AMF weight of each pair.

  Returns:
    float32 scalar Σ_i pair_w_i Σ_p w_ip·l_ip / max(1, Σ_i pair_w_i Σ_p w_ip); 0 if nothing is
    masked.
  """
  position_weights = weights.astype(jnp.float32) * pair_weights.astype(jnp.float32)[:, None]
  return jnp.sum(position_weights * values) / jnp.maximum(1.0, jnp.sum(position_weights))


def weighted_mean(per_pair, weights):
  """Σ w·l / max(1, Σ w) over [B] per-pair losses and [B] weights; 0 when every weight is 0."""
  weights = weights.astype(jnp.float32)
  return jnp.sum(weights * per_pair.astype(jnp.float32)) / jnp.maximum(1.0, jnp.sum(weights))


def amf_init():
  """AMF running statistics before the first batch: {"mu", "var": f32 0, "count": int32 0}."""
  return {"mu": jnp.zeros((), jnp.float32), "var": jnp.zeros((), jnp.float32),
          "count": jnp.zeros((), jnp.int32)}


def amf_update(stats, scores, beta):
  """EMA of the batch mean and variance of the pair scores (method §4.16).

  Args:
    stats: dict from `amf_init` / `amf_update`.
    scores: [B] momentum pair cosine similarities v'_i·t'_i (no gradient is taken).
    beta: EMA decay of the statistics (0.99).

  Returns:
    New stats; the first batch (count == 0) sets mu and var to its own mean and variance.
  """
  scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
  batch_mu, batch_var = jnp.mean(scores), jnp.var(scores)
  first = stats["count"] == 0
  mu = jnp.where(first, batch_mu, beta * stats["mu"] + (1.0 - beta) * batch_mu)
  var = jnp.where(first, batch_var, beta * stats["var"] + (1.0 - beta) * batch_var)
  return {"mu": mu, "var": var, "count": stats["count"] + 1}


def amf_weights(stats, scores, lambda_, active):
  """AMF keep-weights 1[s_i >= mu - lambda_·sigma] (method §4.16).

  Args:
    stats: dict from `amf_update`.
    scores: [B] momentum pair cosine similarities (no gradient is taken).
    lambda_: threshold in standard deviations; +inf keeps every pair, -inf drops every pair
      (whatever sigma, even 0).
    active: bool scalar (may be traced); False (warm-up, fine-tuning) gives all ones.

  Returns:
    [B] float32 in {0, 1}.
  """
  scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
  lambda_ = jnp.asarray(lambda_, jnp.float32)
  margin = jnp.where(jnp.isinf(lambda_), lambda_, lambda_ * jnp.sqrt(stats["var"]))
  keep = scores >= stats["mu"] - margin
  return jnp.where(active, keep, True).astype(jnp.float32)
