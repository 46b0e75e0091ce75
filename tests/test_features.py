"""Cached features of a fully locked tower in the run (issue 23 item 2, design §9.3): the rows
the pipeline and the eval split carry are the live tower's outputs of their own examples, the
step with them equals the step with the live locked tower, and a changed caption file rebuilds
the cache."""

import io
import json

from absl import logging
import jax
import numpy as np
from PIL import Image
import pytest

from cots_jax import features
from cots_jax import state as state_lib
from cots_jax import step as step_lib
from cots_jax import vq_trainer
from cots_jax.data import eval_split
from cots_jax.data import pipeline
from cots_jax.evaluators import common as evaluators_common
from support import tiny_config

LOCKED_TEXT = {"model.text.locked": "all", "model.text.lock_random_ok": True,
               "loss.mlm": 0.0}


def write_captions_json(root, captions_of_image):
  """A Karpathy-style json of 6 train + 2 test PNG images under `root`."""
  images, rng = [], np.random.default_rng(0)
  (root / "images").mkdir(exist_ok=True)
  for i in range(8):
    name = f"{i}.png"
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), np.uint8)).save(buffer, "PNG")
    (root / "images" / name).write_bytes(buffer.getvalue())
    images.append({"filename": name, "split": "train" if i < 6 else "test",
                   "sentences": [{"raw": c} for c in captions_of_image(i)]})
  (root / "annotations.json").write_text(json.dumps({"images": images}))


def flickr_like_config(root, **overrides):
  return tiny_config(**{
      "input.data.name": "captions_json", "input.data.annotations": str(root / "annotations.json"),
      "input.data.images_dir": str(root / "images"), "input.batch_size": 4, "eval.batch_size": 4,
      "feature_cache_dir": str(root / "cache"), **LOCKED_TEXT, **overrides})


def captions(i):
  return [f"a photo number {i} of a dog", f"another photo {i}, a cat on a mat"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("flickr_like")
  write_captions_json(root, captions)
  config = flickr_like_config(root)
  built = state_lib.build(config, state_lib.make_mesh(config),
                          vq_trainer.random_tokenizer(config, jax.random.PRNGKey(1)))
  state = built.initial_state()
  split = eval_split.make_eval_split(built.config)
  tables = features.feature_tables(built.config, built.model, state["params"], split, root)
  return root, built, state, split, tables


def live_text_features(built, state, ids, mask):
  return np.asarray(built.model.apply({"params": state["params"]}, ids, mask,
                                      method=built.model.text_features))


def cached_and_live_batches(config, tables):
  """The first training batch with the cached text features, and the same batch with the
  captions' tokens instead (the stream without the cache)."""
  cached = next(pipeline.make_train_iterator(config, features=tables.train))
  live = next(pipeline.make_train_iterator(config))
  assert "text_ids" not in cached and "text_features" not in live
  for key in cached.keys() - {"text_features"}:
    np.testing.assert_array_equal(cached[key], live[key], err_msg=key)
  return cached, live


def test_a_locked_text_tower_is_cached_and_its_rows_are_the_live_outputs(run):
  _, built, state, split, tables = run
  assert features.cached_towers(built.config) == ("text",)
  assert set(tables.train) == set(tables.eval) == {"text"}
  assert tables.train["text"].shape == (12, built.config.model.text.width)
  cached, live = cached_and_live_batches(built.config, tables)
  np.testing.assert_allclose(
      cached["text_features"],
      live_text_features(built, state, live["text_ids"], live["text_mask"]), atol=1e-5)
  split.attach_features(tables.eval)
  for text_batch in split.text_batches():
    np.testing.assert_allclose(
        text_batch["text_features"],
        live_text_features(built, state, text_batch["text_ids"], text_batch["text_mask"]),
        atol=1e-5)


def test_the_step_with_cached_features_equals_the_step_with_the_live_locked_tower(run):
  _, built, state, _, tables = run
  batch, live = cached_and_live_batches(built.config, tables)
  update = jax.jit(step_lib.make_update_fn(built.config, built.model, built.optimizer))
  copy = lambda: jax.tree.map(np.array, jax.device_get(state))  # noqa: E731
  cached_state, cached_metrics = update(copy(), batch)
  live_state, live_metrics = update(copy(), live)
  for key in cached_metrics:
    np.testing.assert_allclose(cached_metrics[key], live_metrics[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  for a, b in zip(jax.tree.leaves(cached_state["params"]), jax.tree.leaves(live_state["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_evals_on_cached_features_equal_evals_on_the_live_tower(run):
  _, built, state, split, tables = run
  evaluators = evaluators_common.from_config(built.config, split)
  embed_fns = evaluators_common.make_embed_fns(built.model, built.mesh)
  split.attach_features(tables.eval)
  cached = evaluators_common.run_evals(evaluators, embed_fns, state)
  split.attach_features({})
  live = evaluators_common.run_evals(evaluators, embed_fns, state)
  assert cached.keys() == live.keys()
  for key in cached:
    np.testing.assert_allclose(cached[key], live[key], atol=1e-6, err_msg=key)


def test_a_changed_caption_file_rebuilds_the_cache_saying_why(run, tmp_path):
  _, built, state, split, tables = run
  root = tmp_path
  write_captions_json(root, captions)
  config = flickr_like_config(root, feature_cache_dir=str(run[0] / "cache"))
  with pytest.MonkeyPatch.context() as patch:
    messages = []
    patch.setattr(logging, "warning", lambda msg, *args: messages.append(msg % args))
    same = features.feature_tables(config, built.model, state["params"], split, root)
    assert not messages
    np.testing.assert_array_equal(same.train["text"], tables.train["text"])
    write_captions_json(root, lambda i: captions(i) if i != 2 else ["a changed caption", "x"])
    changed = features.feature_tables(config, built.model, state["params"], split, root)
  assert any("text_train" in m and "fingerprint" in m for m in messages), messages
  rows = np.flatnonzero(np.any(changed.train["text"] != tables.train["text"], axis=1))
  np.testing.assert_array_equal(rows, [4, 5])  # the two captions of image 2


def test_a_locked_image_tower_with_augmented_input_runs_live(tmp_path):
  write_captions_json(tmp_path, captions)
  config = flickr_like_config(tmp_path, **{
      "model.image.locked": "all", "model.image.lock_random_ok": True, "loss.mvm": 0.0,
      "input.augment": "crop_flip"})
  assert features.why_live(config, "image").startswith("its training input is augmented")
  assert features.cached_towers(config) == ("text",)
  config.input.augment = "none"
  assert features.cached_towers(config) == ("image", "text")
  config.model.image.token_drop = 0.5
  assert features.why_live(config, "image") == "model.image.token_drop=0.5 makes every pass differ"
  assert features.cached_towers(config) == ("text",)


def test_k_captions_per_image_carry_their_own_feature_rows_and_train(run):
  _, built, state, _, tables = run
  config = built.config.copy_and_resolve_references()
  config.update_from_flattened_dict({
      "input.captions_per_image": 2, "loss.itc": 0.0, "loss.kl_align": 0.0, "loss.mvm": 0.0,
      "loss.cookie_cm": 1.0, "amf.enabled": False, "queue.multi_positive": True})
  built_k = state_lib.build(config, built.mesh, built.vq_variables)
  batch, tokens = cached_and_live_batches(built_k.config, tables)
  b = config.input.batch_size
  assert tokens["text_ids"].shape == (b, 2, config.input.max_len)
  assert batch["text_features"].shape == (b, 2, config.model.text.width)
  assert "mlm_ids" not in tokens
  live = live_text_features(built, state, tokens["text_ids"].reshape(2 * b, -1),
                            tokens["text_mask"].reshape(2 * b, -1))
  np.testing.assert_allclose(batch["text_features"].reshape(2 * b, -1), live, atol=1e-5)
  # Flickr-like images have exactly 2 captions here: all of them, in order.
  update = jax.jit(step_lib.make_update_fn(built_k.config, built_k.model, built_k.optimizer))
  _, metrics = update(built_k.initial_state(), batch)
  assert np.isfinite(float(metrics["train/cookie_cm"]))


def test_k_captions_per_image_needs_the_in_batch_terms(run):
  _, built, _, _, _ = run
  config = built.config.copy_and_resolve_references()
  config.input.captions_per_image = 2
  with pytest.raises(ValueError, match=r"^config.input.captions_per_image=2 works with the "
                     r"in-batch terms only .*loss.itc"):
    state_lib.prepare_config(config)
