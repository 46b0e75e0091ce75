"""Sizes derived from the config (cots_jax/shapes.py), each against an independent count."""

import numpy as np
import pytest

from configs import common
from cots_jax import shapes
from cots_jax.data import pipeline


def test_patches_and_masked_patches_match_what_the_pipeline_draws():
  config = common.base_config("tiny")
  config.input.data.num_train_images, config.input.batch_size = 8, 4
  assert shapes.patch_grid(config) == (6, 6) and shapes.num_patches(config) == 36
  batch = next(pipeline.make_train_iterator(config))
  assert batch["mvm_mask"].shape == (4, 36)
  np.testing.assert_array_equal(batch["mvm_mask"].sum(axis=1), [shapes.num_mvm_masked(config)] * 4)
  assert shapes.num_mvm_masked(config) == round(0.4 * 36)


def test_patch_grid_names_both_fields_when_the_image_does_not_divide():
  config = common.base_config("tiny")
  config.model.image.image_size = 50
  with pytest.raises(ValueError, match=r"image_size=50 is not a multiple of "
                     r"config.model.image.patch_size=8"):
    shapes.patch_grid(config)


@pytest.mark.parametrize("in_batch, columns", [(True, 4096 + 64), (False, 4096 + 1)])
def test_contrastive_columns_count_the_positive_or_the_batch_and_the_queue(in_batch, columns):
  config = common.base_config("tiny")
  config.queue.in_batch_negatives = in_batch
  assert shapes.contrastive_columns(config) == columns
