"""MLM and MVM masks of one example, in numpy, seeded by the caller's Generator (design §8.3).

Shapes are static: MLM predicts exactly `max_predictions` slots (padded with weight 0) and MVM
masks exactly `num_masked` patches, so batches stack and the jitted step never retraces.
"""

import math

import numpy as np

# BERT's rule for a chosen token: 80% [MASK], 10% a random token, 10% unchanged.
_MASK_TOKEN_PROB = 0.8
_RANDOM_TOKEN_PROB = 0.1
# BEiT block-wise masking: block aspect ratio in [0.3, 1/0.3]; stop adding blocks after 10
# failed draws in a row (BEiT's attempts per block), then top up patch by patch.
_MIN_ASPECT = 0.3
_MAX_FAILED_BLOCKS = 10


def num_mlm_predictions(mlm_prob, max_len):
  """P, the static number of MLM slots per caption: ceil(mlm_prob * max_len).

  The product is rounded to 6 decimals first, so float noise (0.15 * 40 = 6.000000000000001)
  does not add a slot.
  """
  return math.ceil(round(mlm_prob * max_len, 6))


def num_mvm_masked(mvm_prob, num_patches):
  """The exact number of masked patches per image: round(mvm_prob * num_patches)."""
  return int(round(mvm_prob * num_patches))


def _random_tokens(rng, n, vocab_size, special_ids):
  """int64 [n] ids drawn uniformly from [0, vocab_size) without `special_ids` (sorted, unique)."""
  tokens = rng.integers(0, vocab_size - len(special_ids), size=n)
  # The k-th allowed id is k plus the number of special ids j-th smallest with s_j - j <= k.
  return tokens + np.searchsorted(special_ids - np.arange(len(special_ids)), tokens, side="right")


def mlm_mask(ids, rng, prob, max_predictions, vocab_size, special_ids, mask_id):
  """BERT masking of one tokenised caption.

  Chooses n = min(P, max(1, round(prob * n_real))) of the n_real tokens that are not special
  ([CLS], [SEP], [PAD], ...), none when n_real is 0, and replaces each by [MASK] (80%), a random
  non-special token (10%) or itself (10%).

  Args:
    ids: int [L] token ids.
    rng: np.random.Generator.
    prob: fraction of the real tokens to predict.
    max_predictions: P, the static number of prediction slots.
    vocab_size: size of the vocabulary the random tokens are drawn from.
    special_ids: ids that are never chosen nor drawn as random tokens.
    mask_id: id of [MASK].

  Returns:
    dict of mlm_ids int32 [L] (ids after masking), mlm_positions int32 [P] (sorted, then 0),
    mlm_targets int32 [P] (the original ids, then 0), mlm_weights float32 [P] (1 on the n real
    slots, 0 on padding).
  """
  masked_ids = np.array(ids, np.int32)
  special_ids = np.unique(np.asarray(special_ids, np.int64))
  # (A broadcast compare: np.isin is several times slower on a few dozen ids.)
  maskable = np.flatnonzero((masked_ids[:, None] != special_ids[None, :]).all(axis=1))
  n = min(max_predictions, max(1, round(prob * maskable.size))) if maskable.size else 0
  positions = np.sort(rng.permutation(maskable)[:n])
  targets = masked_ids[positions]
  rule = rng.random(n)
  random_tokens = _random_tokens(rng, n, vocab_size, special_ids)
  masked_ids[positions] = np.where(
      rule < _MASK_TOKEN_PROB, mask_id,
      np.where(rule < _MASK_TOKEN_PROB + _RANDOM_TOKEN_PROB, random_tokens, targets))
  out = {"mlm_ids": masked_ids,
         "mlm_positions": np.zeros(max_predictions, np.int32),
         "mlm_targets": np.zeros(max_predictions, np.int32),
         "mlm_weights": np.zeros(max_predictions, np.float32)}
  out["mlm_positions"][:n], out["mlm_targets"][:n], out["mlm_weights"][:n] = positions, targets, 1
  return out


def _random_patch_mask(rng, num_patches, num_masked):
  """bool [num_patches] with `num_masked` True at uniformly random places."""
  mask = np.zeros(num_patches, bool)
  mask[rng.choice(num_patches, size=num_masked, replace=False)] = True
  return mask


def _neighbours(mask):
  """bool [h, w]: the unmasked 4-neighbours of the True cells of `mask` [h, w]."""
  padded = np.pad(mask, 1)
  grown = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
  return grown & ~mask


def _block_patch_mask(rng, grid_h, grid_w, num_masked, min_block):
  """BEiT block-wise mask, bool [grid_h, grid_w] with exactly `num_masked` True.

  Adds rectangles of at least `min_block` patches that never overshoot the target; when no more
  fit, tops up with random patches next to the masked ones, so the mask stays clustered.
  """
  mask = np.zeros((grid_h, grid_w), bool)
  count, failures = 0, 0
  max_log_aspect = -math.log(_MIN_ASPECT)
  while count < num_masked and failures < _MAX_FAILED_BLOCKS:
    remaining = num_masked - count
    area = rng.uniform(min_block, max(min_block, remaining))
    aspect = math.exp(rng.uniform(-max_log_aspect, max_log_aspect))
    h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    added = 0
    if 1 <= h <= grid_h and 1 <= w <= grid_w:
      top, left = rng.integers(grid_h - h + 1), rng.integers(grid_w - w + 1)
      block = mask[top:top + h, left:left + w]
      added = h * w - int(block.sum())
      if 0 < added <= remaining:
        block[...] = True
      else:
        added = 0
    count += added
    failures = 0 if added else failures + 1
  for _ in range(num_masked - count):
    candidates = _neighbours(mask)
    if not candidates.any():
      candidates = ~mask
    mask.flat[rng.choice(np.flatnonzero(candidates))] = True
  return mask


MVM_MASKS = ("block", "random")


def mvm_mask(rng, grid_h, grid_w, num_masked, mode="block", min_block=16):
  """Patch mask of one image: bool [grid_h * grid_w] (row-major) with exactly `num_masked` True.

  `mode` "block" is BEiT's block-wise masking (blocks of >= `min_block` patches); it falls back
  to "random" (uniform) when the grid has fewer than `min_block` patches.
  """
  num_patches = grid_h * grid_w
  if not 0 <= num_masked <= num_patches:
    raise ValueError(f"num_masked={num_masked} must lie in [0, {num_patches}] for a "
                     f"{grid_h}x{grid_w} grid")
  if mode == "random" or (mode == "block" and num_patches < min_block):
    return _random_patch_mask(rng, num_patches, num_masked)
  if mode == "block":
    return _block_patch_mask(rng, grid_h, grid_w, num_masked, min_block).reshape(-1)
  raise ValueError(f"input.mvm_mask must be one of {MVM_MASKS}, got {mode!r}")
