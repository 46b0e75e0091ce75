"""Sizes that every part derives from the config, one function each (so none is computed twice).

Pure functions of a ConfigDict; the data pipeline, the models' callers, the step, the FLOP count
and the compile proof all ask here.
"""

from cots_jax.data import masking


def patch_grid(config):
  """(rows, cols) of ViT patches of one image; the image side must be a multiple of the patch.

  Raises:
    ValueError naming both fields when it is not.
  """
  image_size, patch_size = config.model.image.image_size, config.model.image.patch_size
  if image_size % patch_size:
    raise ValueError(f"config.model.image.image_size={image_size} is not a multiple of "
                     f"config.model.image.patch_size={patch_size}")
  return image_size // patch_size, image_size // patch_size


def num_patches(config):
  """Patches of one image (= image tokens without [CLS], = VQ codes per image, design §8.1)."""
  rows, cols = patch_grid(config)
  return rows * cols


def num_mvm_masked(config):
  """Patches that MVM masks in each image (design §8.3: exactly this many per image)."""
  return masking.num_mvm_masked(config.input.mvm_prob, num_patches(config))


def contrastive_columns(config):
  """Columns of each row of the ITC / KL logits: the positive and the K queued keys (1 + K), or
  the batch's keys and the queue (B + K) with in-batch negatives."""
  batch = config.input.batch_size
  return config.queue.size + (batch if config.queue.in_batch_negatives else 1)
