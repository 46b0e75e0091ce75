"""MLM (BERT 80/10/10) and MVM (BEiT block / random) masks against their definitions (§8.3)."""

import math

import numpy as np
import pytest

from cots_jax.data import masking

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIAL = (PAD, UNK, CLS, SEP, MASK)
VOCAB = 30522
L, P = 40, 6


def _caption(rng, n_words):
  """[CLS] w1 .. wn [SEP] [PAD]..., int32 [L], words drawn from ordinary ids."""
  words = rng.integers(1000, VOCAB, size=n_words)
  return np.concatenate([[CLS], words, [SEP], np.full(L - n_words - 2, PAD)]).astype(np.int32)


def _mlm(ids, seed, prob=0.15, max_predictions=P, vocab_size=VOCAB, special=SPECIAL,
         mask_id=MASK):
  return masking.mlm_mask(ids, np.random.default_rng(seed), prob, max_predictions, vocab_size,
                          special, mask_id)


def test_static_sizes_follow_the_rulings():
  assert masking.num_mlm_predictions(0.15, 40) == 6 == math.ceil(0.15 * 40)
  assert masking.num_mlm_predictions(0.15, 30) == 5
  assert masking.num_mvm_masked(0.4, 196) == 78
  assert masking.num_mvm_masked(0.4, 64) == 26


@pytest.mark.parametrize("n_words", [1, 3, 7, 20, 38])
def test_mlm_masks_the_expected_number_of_real_tokens_only(n_words):
  rng = np.random.default_rng(n_words)
  for seed in range(30):
    ids = _caption(rng, n_words)
    out = _mlm(ids, seed)
    assert out["mlm_ids"].shape == (L,) and out["mlm_ids"].dtype == np.int32
    for key in ("mlm_positions", "mlm_targets"):
      assert out[key].shape == (P,) and out[key].dtype == np.int32
    assert out["mlm_weights"].shape == (P,) and out["mlm_weights"].dtype == np.float32
    n = min(P, max(1, round(0.15 * n_words)))
    np.testing.assert_array_equal(out["mlm_weights"], [1.0] * n + [0.0] * (P - n))
    positions = out["mlm_positions"][:n]
    assert np.all(np.diff(positions) > 0)  # distinct, sorted
    assert np.all((positions >= 1) & (positions <= n_words))  # never [CLS], [SEP], [PAD]
    np.testing.assert_array_equal(out["mlm_targets"][:n], ids[positions])
    np.testing.assert_array_equal(out["mlm_positions"][n:], 0)
    np.testing.assert_array_equal(out["mlm_targets"][n:], 0)
    untouched = np.ones(L, bool)
    untouched[positions] = False
    np.testing.assert_array_equal(out["mlm_ids"][untouched], ids[untouched])


def test_mlm_never_chooses_special_tokens_inside_the_caption():
  ids = np.array([CLS, 2000, UNK, 2001, MASK, 2002, SEP, PAD], np.int32)
  chosen = set()
  for seed in range(200):
    out = _mlm(ids, seed, prob=0.5, max_predictions=3)
    chosen |= set(out["mlm_positions"][out["mlm_weights"] > 0].tolist())
  assert chosen == {1, 3, 5}


def test_mlm_without_maskable_tokens_predicts_nothing():
  ids = np.array([CLS, SEP, PAD, PAD], np.int32)
  out = _mlm(ids, 0, max_predictions=2)
  np.testing.assert_array_equal(out["mlm_ids"], ids)
  np.testing.assert_array_equal(out["mlm_weights"], 0.0)
  np.testing.assert_array_equal(out["mlm_positions"], 0)
  np.testing.assert_array_equal(out["mlm_targets"], 0)


def test_mlm_replaces_80_percent_by_mask_10_by_random_10_unchanged():
  rng = np.random.default_rng(0)
  kept = to_mask = to_random = 0
  random_tokens = []
  for seed in range(3000):
    ids = _caption(rng, 38)
    out = _mlm(ids, seed)
    positions = out["mlm_positions"][out["mlm_weights"] > 0]
    new, old = out["mlm_ids"][positions], ids[positions]
    to_mask += np.sum(new == MASK)
    kept += np.sum(new == old)
    to_random += np.sum((new != MASK) & (new != old))
    random_tokens += new[(new != MASK) & (new != old)].tolist()
  total = kept + to_mask + to_random
  assert total == 3000 * P
  assert abs(to_mask / total - 0.8) < 0.015
  assert abs(kept / total - 0.1) < 0.01 and abs(to_random / total - 0.1) < 0.01
  random_tokens = np.array(random_tokens)
  assert not np.isin(random_tokens, SPECIAL).any()
  assert random_tokens.min() < 1000  # drawn from the whole vocabulary, not the caption's words
  assert abs(random_tokens.mean() / VOCAB - 0.5) < 0.05


def test_mlm_random_tokens_skip_every_special_id():
  vocab, special, mask_id = 8, (0, 3, 5, 7), 7
  ids = np.array([3, 1, 2, 4, 6, 5, 0, 0], np.int32)  # 3 = CLS, 5 = SEP, 0 = PAD
  counts = np.zeros(vocab, int)
  for seed in range(4000):
    out = _mlm(ids, seed, prob=1.0, max_predictions=4, vocab_size=vocab, special=special,
               mask_id=mask_id)
    positions = out["mlm_positions"]
    new, old = out["mlm_ids"][positions], ids[positions]
    np.add.at(counts, new[(new != mask_id) & (new != old)], 1)
  assert counts[list(special)].sum() == 0
  allowed = counts[[1, 2, 4, 6]]
  # Each allowed token is drawn with chance 1/4, then kept as "random" unless it equals the
  # original (which holds each token at one of the 4 positions): about 3/16 of 10% of 16000.
  assert np.all(np.abs(allowed / (16000 * 0.1 * 3 / 16) - 1) < 0.2), allowed


def test_mlm_is_deterministic_by_seed():
  ids = _caption(np.random.default_rng(0), 30)
  a, b, c = _mlm(ids, 7), _mlm(ids, 7), _mlm(ids, 8)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert any(not np.array_equal(a[key], c[key]) for key in a)


@pytest.mark.parametrize("mode", ["block", "random"])
@pytest.mark.parametrize("grid_h, grid_w, num_masked, min_block",
                         [(8, 8, 26, 4), (14, 14, 78, 16), (8, 8, 0, 4), (8, 8, 64, 4),
                          (8, 8, 1, 4), (4, 6, 10, 16), (3, 3, 4, 16)])
def test_mvm_masks_exactly_num_masked(mode, grid_h, grid_w, num_masked, min_block):
  for seed in range(20):
    mask = masking.mvm_mask(np.random.default_rng(seed), grid_h, grid_w, num_masked, mode,
                            min_block)
    assert mask.shape == (grid_h * grid_w,) and mask.dtype == bool
    assert mask.sum() == num_masked


def test_mvm_is_deterministic_by_seed():
  for mode in ("block", "random"):
    a, b = (masking.mvm_mask(np.random.default_rng(3), 8, 8, 26, mode, 4) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    others = [masking.mvm_mask(np.random.default_rng(s), 8, 8, 26, mode, 4) for s in range(4, 8)]
    assert any(not np.array_equal(a, o) for o in others)


def _masked_neighbour_pairs(mask, grid_h, grid_w):
  """Number of horizontally or vertically adjacent patch pairs that are both masked."""
  m = mask.reshape(grid_h, grid_w)
  return int(np.sum(m[1:] & m[:-1]) + np.sum(m[:, 1:] & m[:, :-1]))


@pytest.mark.parametrize("grid, num_masked, min_block", [(8, 26, 4), (14, 78, 16)])
def test_block_masks_are_clustered_compared_with_random(grid, num_masked, min_block):
  pairs = {}
  for mode in ("block", "random"):
    pairs[mode] = np.mean([_masked_neighbour_pairs(
        masking.mvm_mask(np.random.default_rng(s), grid, grid, num_masked, mode, min_block),
        grid, grid) for s in range(50)])
  # Random masks: about (adjacent pairs) * p^2 masked pairs.
  p = num_masked / grid**2
  assert abs(pairs["random"] / (2 * grid * (grid - 1) * p**2) - 1) < 0.15
  assert pairs["block"] > 1.6 * pairs["random"], pairs


def test_block_falls_back_to_random_when_the_grid_is_smaller_than_a_block():
  for seed in range(10):
    block = masking.mvm_mask(np.random.default_rng(seed), 3, 4, 5, "block", min_block=16)
    uniform = masking.mvm_mask(np.random.default_rng(seed), 3, 4, 5, "random")
    np.testing.assert_array_equal(block, uniform)


def test_mvm_rejects_bad_arguments():
  with pytest.raises(ValueError, match="num_masked=65"):
    masking.mvm_mask(np.random.default_rng(0), 8, 8, 65)
  with pytest.raises(ValueError, match="input.mvm_mask"):
    masking.mvm_mask(np.random.default_rng(0), 8, 8, 10, mode="grid")
