"""The pair-aligned key queue of cross-modal momentum contrast (method §4.5, design.md §3).

State: {"img": [K, D] f32, "txt": [K, D] f32, "idx": [K] int32 image id, "valid": [K] bool,
"ptr": int32}. Image and text keys of one pair always share a slot, so the i2t and t2i logits
range over the same pairs and their KL is defined (method §1.3.3).
"""

import jax
import jax.numpy as jnp


def check_queue_size(queue_size, global_batch):
  """Raises ValueError unless queue_size is a positive multiple of the global batch."""
  if global_batch <= 0 or queue_size < global_batch or queue_size % global_batch:
    raise ValueError(f"config.queue.size={queue_size} must be a positive multiple of "
                     f"config.input.batch_size={global_batch} (the queue advances one global "
                     "batch per step)")


def _random_unit_rows(rng, size, dim):
  """[size, dim] float32 rows drawn uniformly on the unit sphere."""
  rows = jax.random.normal(rng, (size, dim), jnp.float32)
  return rows / jnp.linalg.norm(rows, axis=-1, keepdims=True)


def init_queue(size, dim, rng):
  """An empty queue of `size` slots: random unit keys, all slots invalid, idx -1, ptr 0."""
  rng_img, rng_txt = jax.random.split(rng)
  return {
      "img": _random_unit_rows(rng_img, size, dim),
      "txt": _random_unit_rows(rng_txt, size, dim),
      "idx": jnp.full((size,), -1, jnp.int32),
      "valid": jnp.zeros((size,), bool),
      "ptr": jnp.zeros((), jnp.int32),
  }


def enqueue(queue, img_keys, txt_keys, image_ids, valid):
  """Writes one batch of pairs at slots [ptr, ptr + B) and advances ptr by B modulo K.

  Args:
    queue: the queue dict (ptr may be traced).
    img_keys, txt_keys: [B, D] momentum keys of the pairs (stored as float32).
    image_ids: [B] int image ids.
    valid: [B] bool; False slots are masked out of the logits (AMF `enqueue_filtered=False`).

  Returns:
    The new queue dict.
  """
  size, batch = queue["idx"].shape[0], image_ids.shape[0]
  check_queue_size(size, batch)
  ptr = queue["ptr"]

  def write(buffer, rows):
    return jax.lax.dynamic_update_slice_in_dim(buffer, rows.astype(buffer.dtype), ptr, axis=0)

  return {
      "img": write(queue["img"], img_keys),
      "txt": write(queue["txt"], txt_keys),
      "idx": write(queue["idx"], image_ids),
      "valid": write(queue["valid"], valid),
      "ptr": (ptr + batch) % size,
  }
