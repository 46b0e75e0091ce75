"""Batches of whole source groups (`input.group_batches`): the synthetic clips that differ only in
direction, one caption each, so that every clip meets its twins as in-batch negatives.

The training stream (cots_jax/data/pipeline.py) asks `grouped_rows` for the order of its
pair-table rows instead of a plain global shuffle.
"""

import dataclasses
from typing import Any

import grain
import numpy as np


def group_pair_blocks(pairs, group_size):
  """`pair_table` rows -> int64 [P / group_size, group_size] blocks for `input.group_batches`:
  the source's items form groups of `group_size` consecutive indices, and block b of a group
  holds the b-th pair (row index) of each of its items, so a block is one caption of every
  item of the group.

  Raises:
    ValueError when the items do not split into whole groups, or the items of a group have
    different caption counts.
  """
  counts = np.bincount(pairs[:, 0])
  if len(counts) % group_size:
    raise ValueError(f"input.group_batches: {len(counts)} source items do not split into groups "
                     f"of {group_size}")
  per_group = counts.reshape(-1, group_size)
  uneven = np.flatnonzero((per_group != per_group[:, :1]).any(axis=1))
  if uneven.size:
    raise ValueError(f"input.group_batches: the items of group {uneven[0]} have different "
                     f"caption counts {per_group[uneven[0]].tolist()}")
  first_rows = (np.cumsum(counts) - counts).reshape(-1, group_size)
  return np.concatenate([rows[None, :] + np.arange(n)[:, None]
                         for rows, n in zip(first_rows, per_group[:, 0])]).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class _BlockRow:
  """Example k -> the pair-table row in slot k % G of block `order[k // G]`."""
  blocks: np.ndarray  # [num_blocks, G]
  order: Any  # MapDataset of block indices, reshuffled every epoch

  def __call__(self, example):
    group_size = self.blocks.shape[1]
    return int(self.blocks[self.order[example // group_size], example % group_size])


def grouped_rows(source, pairs, process_batch, seed, process_index, process_count):
  """The endless pair-table rows of this process for `input.group_batches`: blocks
  (`group_pair_blocks`) shuffled anew every epoch, dealt to the processes block by block, so
  every batch holds whole groups."""
  group_size = getattr(source, "batch_group_size", None)
  if group_size is None:
    raise ValueError(f"input.group_batches: the {type(source).__name__} source has no groups "
                     "(only synthetic_video has: clips that differ only in direction)")
  if process_batch % group_size:
    raise ValueError(f"input.group_batches: a batch of {process_batch} pairs per process does "
                     f"not hold whole groups of {group_size}")
  blocks = group_pair_blocks(pairs, group_size)
  order = (grain.MapDataset.range(len(blocks)).shuffle(seed=seed).repeat()
           [process_index::process_count])
  return grain.MapDataset.range(len(order)).map(_BlockRow(blocks, order))
