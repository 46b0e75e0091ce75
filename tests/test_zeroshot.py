"""Zero-shot classification (cots_jax/zeroshot.py): the prompt ensemble, the metrics and their
tie rule, the class folder (cots_jax/data/class_folder.py), `cots_jax.evaluate --zeroshot`, and
the synthetic shape / colour evaluator (cots_jax/evaluators/zeroshot.py)."""

import hashlib
import io
import json
import shutil

import numpy as np
from PIL import Image
import pytest

from configs import video_retrieval
from cots_jax import inference
from cots_jax import zeroshot
from cots_jax.data import class_folder
from cots_jax.data import eval_split
from cots_jax.data import synthetic
from cots_jax.data import tokenizer as tokenizer_lib
from cots_jax.data import transforms
from cots_jax.evaluators import common as evaluators_common
from cots_jax.evaluators import zeroshot as zeroshot_evaluator
from support import run_module, tiny_config, tiny_flags
from test_evaluate import RUN_OVERRIDES

# Solid colours of the test folders, as unit RGB directions: the hand-made embedders below read
# them back from pixels and from prompts.
RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def hashed_embeddings(texts, dim=6):
  """float32 [n, dim]: a fixed random vector (not of unit length) per distinct text."""
  return np.stack([np.random.default_rng(list(hashlib.sha256(t.encode()).digest()[:8]))
                   .normal(size=dim) * (1 + len(t)) for t in texts]).astype(np.float32)


def colour_of_prompt(texts):
  """float32 [n, 3]: the RGB direction of the colour word in each prompt."""
  return np.asarray([next(RGB[w] for w in RGB if w in t) for t in texts], np.float32)


def colour_of_pixels(images):
  """float32 [b, S, S, 3] in [-1, 1] -> [b, 3] mean colour."""
  return (np.asarray(images) + 1).mean(axis=(1, 2))


def write_folder(root, counts, size=(10, 14)):
  """Class folders "<colour>_thing" of solid-colour PNGs ({colour: image count})."""
  for colour, count in counts.items():
    folder = root / f"{colour}_thing"
    folder.mkdir(parents=True)
    for index in range(count):
      Image.new("RGB", size, RGB[colour]).save(folder / f"{index}.png")
  return root


def test_the_class_embedding_is_the_renormalised_mean_of_unit_prompt_embeddings():
  templates = ("a photo of a {}.", "art of the {}.")
  classnames = ["cat", ("dog", "puppy"), "red panda"]
  got = zeroshot.class_embeddings(hashed_embeddings, classnames, templates)
  assert got.shape == (3, 6) and got.dtype == np.float32
  for row, names in zip(got, [("cat",), ("dog", "puppy"), ("red panda",)]):
    prompts = [t.replace("{}", name) for name in names for t in templates]
    unit = [v / np.linalg.norm(v) for v in hashed_embeddings(prompts)]
    want = np.mean(unit, axis=0)
    np.testing.assert_allclose(row, want / np.linalg.norm(want), rtol=1e-5)
  assert zeroshot.prompts(["cat"], templates) == ["a photo of a cat.", "art of the cat."]
  np.testing.assert_allclose(zeroshot.unit_rows([[3.0, 4.0], [0.0, 0.0]]), [[0.6, 0.8], [0, 0]])
  with pytest.raises(ValueError, match=r"template 'a \{\} or \{\}' must hold exactly one"):
    zeroshot.prompts(["cat"], ["a {} or {}"])


def test_template_sets_are_named_and_each_template_takes_one_name():
  assert zeroshot.template_set("simple") == ("a photo of a {}.",)
  assert 8 <= len(zeroshot.template_set("clip")) <= 18
  for name in ("clip", "simple", "synthetic"):
    assert len(zeroshot.prompts(["x"], zeroshot.template_set(name))) >= 1
  with pytest.raises(ValueError, match=r"template set 'imagenet' is unknown; known: \['clip'"):
    zeroshot.template_set("imagenet")


def test_metrics_match_a_reference_with_a_class_never_predicted_and_ties():
  # 6 classes; class 5 has no image, class 4 is never predicted. Image 3 ties its true class 2
  # with class 0: ties go against it (rank 2, predicted 0). Image 5 holds a NaN logit: ahead.
  logits = np.array([
      [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # true 0: rank 1
      [0.2, 0.8, 0.1, 0.0, 0.0, 0.0],   # true 1: rank 1
      [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # true 1: rank 2, predicted 0
      [0.6, 0.1, 0.6, 0.0, 0.0, 0.0],   # true 2: tie with 0 -> rank 2, predicted 0
      [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],   # true 4: rank 2, predicted 5
      [0.0, 0.0, 0.0, np.nan, 0.0, 0.0],  # true 0: ranks behind every class -> 6, predicted 3
      [0.1, 0.0, 0.0, 0.9, 0.0, 0.0],   # true 3: rank 1
  ], np.float32)
  labels = np.array([0, 1, 1, 2, 4, 0, 3])
  np.testing.assert_array_equal(zeroshot.true_class_ranks(logits, labels), [1, 1, 2, 2, 2, 6, 1])
  np.testing.assert_array_equal(zeroshot.scored_predictions(logits, labels), [0, 1, 0, 0, 5, 3, 3])
  metrics, confusion = zeroshot.classification_metrics(logits, labels, ks=(1, 5))
  want = np.zeros((6, 6), np.int64)
  for true, predicted in [(0, 0), (1, 1), (1, 0), (2, 0), (4, 5), (0, 3), (3, 3)]:
    want[true, predicted] += 1
  np.testing.assert_array_equal(confusion, want)
  assert metrics == pytest.approx({
      "top1": 100 * 3 / 7, "top5": 100 * 6 / 7,
      # recall per class with images: 0: 1/2, 1: 1/2, 2: 0, 3: 1, 4: 0
      "mean_per_class_recall": 100 * (0.5 + 0.5 + 0 + 1 + 0) / 5})


def test_fewer_classes_than_k_leave_top_k_out_and_a_collapsed_model_scores_zero():
  metrics, confusion = zeroshot.classification_metrics(np.zeros((4, 3)), [0, 1, 2, 2])
  assert metrics == {"top1": 0.0, "mean_per_class_recall": 0.0}
  # Every class ties with the true one, so the prediction is the lowest other class.
  np.testing.assert_array_equal(confusion, [[0, 1, 0], [1, 0, 0], [2, 0, 0]])
  with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\)"):
    zeroshot.classification_metrics(np.zeros((2, 3)), [0, 3])


def test_classify_scores_cosines_and_breaks_ties_towards_the_lower_class():
  images = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, -3.0]])
  classes = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
  result = zeroshot.classify(images, classes, k=5)
  np.testing.assert_allclose(result.logits, [[1, 0, 0], [0.5**0.5] * 3, [0, -1, -1]], atol=1e-6)
  np.testing.assert_array_equal(result.top_k, [[0, 1, 2], [0, 1, 2], [0, 1, 2]])
  assert zeroshot.classify(images, classes, k=1).top_k.shape == (3, 1)


def test_the_confusion_png_draws_small_and_large_class_sets():
  for num_classes in (3, 50):
    confusion = np.random.default_rng(0).integers(0, 5, (num_classes, num_classes))
    png = zeroshot.confusion_png(confusion, [f"class {i}" for i in range(num_classes)], "t")
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_a_folder_of_solid_colours_is_classified_by_its_names(tmp_path):
  root = write_folder(tmp_path / "colours", {"red": 3, "green": 2, "blue": 4})
  (root / "red_thing" / "notes.txt").write_text("not an image")
  (root / "red_thing" / ".DS_Store").write_bytes(b"\0")
  (root / "blue_thing" / "nested").mkdir()
  listing = class_folder.read_class_folder(root)
  assert listing.folders == ("blue_thing", "green_thing", "red_thing")
  assert listing.classnames == ("blue thing", "green thing", "red thing")
  assert len(listing.files) == 10 and list(np.bincount(listing.labels)) == [4, 2, 4]
  batch_rows = []

  def embed_images(images):
    batch_rows.append(len(images))
    return colour_of_pixels(images)

  def classify(classnames_file=None):
    return zeroshot.classify_folder(
        embed_images, colour_of_prompt, class_folder.read_class_folder(root, classnames_file),
        zeroshot.template_set("clip"), transforms.ImageTransform(8), batch_size=4)

  result = classify()
  assert (result.num_images, result.num_skipped) == (9, 1)
  assert result.metrics == {"top1": 100.0, "mean_per_class_recall": 100.0}
  np.testing.assert_array_equal(result.confusion, np.diag([4, 2, 3]))
  assert set(batch_rows) == {4}  # the last batch is padded: one compiled shape
  swapped = tmp_path / "swapped.json"
  swapped.write_text(json.dumps({"red_thing": "green", "green_thing": "red",
                                 "blue_thing": "blue"}))
  result = classify(str(swapped))
  assert result.metrics["top1"] == pytest.approx(100 * 4 / 9)  # only the blue images
  np.testing.assert_array_equal(result.confusion, [[4, 0, 0], [0, 0, 2], [0, 3, 0]])
  with pytest.raises(transforms.BadExampleError, match="notes.txt: not an image"):
    zeroshot.classify_folder(embed_images, colour_of_prompt, listing, ("{}",),
                             transforms.ImageTransform(8), 4, on_bad_example="fail")


@pytest.mark.parametrize("names, message", [
    ({"red_thing": "red", "blue_thing": "blue", "cat": "cat"},
     r"names no folder \['blue_thing', 'cat'\], misses the folder\(s\) \['green_thing'\]"),
    ({"red_thing": "x", "green_thing": "x"}, r"gives two folders the class name\(s\) \['x'\]"),
    (["red", "green"], "must hold a JSON object"),
])
def test_a_classnames_file_that_does_not_fit_the_folders_is_refused(tmp_path, names, message):
  root = write_folder(tmp_path / "colours", {"red": 1, "green": 1})
  path = tmp_path / "names.json"
  path.write_text(json.dumps(names))
  with pytest.raises(ValueError, match=message):
    class_folder.read_class_folder(root, str(path))


def test_an_empty_or_unreadable_class_is_named(tmp_path):
  root = write_folder(tmp_path / "colours", {"red": 1})
  (root / "green_thing").mkdir()
  with pytest.raises(ValueError, match=r"class folder\(s\) \['green_thing'\] hold no file"):
    class_folder.read_class_folder(root)
  (root / "green_thing" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
  listing = class_folder.read_class_folder(root)
  with pytest.raises(ValueError, match=r"no file of the class folder\(s\) \['green_thing'\] is "
                                       r"a readable image \(1 skipped\)"):
    zeroshot.classify_folder(colour_of_pixels, colour_of_prompt, listing, ("{}",),
                             transforms.ImageTransform(8), 4)
  with pytest.raises(ValueError, match="has no class folder"):
    class_folder.read_class_folder(root / "red_thing")
  with pytest.raises(NotADirectoryError, match="is not a folder"):
    class_folder.read_class_folder(tmp_path / "missing")


def test_single_object_scenes_are_balanced_eval_scenes_and_fixed_by_the_seed():
  scenes = synthetic.single_object_scenes(64, seed=3)
  assert scenes == synthetic.single_object_scenes(64, seed=3)
  assert scenes != synthetic.single_object_scenes(64, seed=4)
  assert all(len(s.objects) == 1 and synthetic.scene_split(s) == "eval" for s in scenes)
  pairs = [(s.objects[0].colour, s.objects[0].shape) for s in scenes]
  assert len(set(pairs)) == 32 and all(pairs.count(p) == 2 for p in pairs)


def test_the_zeroshot_evaluator_reads_the_colour_of_its_images():
  """A hand-made embedder that sees colours only: colour is always right, and every shape class
  gets the same embedding, so shape scores zero (ties against the image)."""
  tokenizer = tokenizer_lib.load_tokenizer()
  colours = list(synthetic.COLOURS)
  reference = np.asarray([synthetic.COLOURS[c] for c in colours], np.float32) / 255

  def embed_images(batch):
    pixels = (batch["image"] + 1) / 2
    bright = pixels.max(axis=-1) > 0.6  # the object; the background stays far darker
    mean = np.stack([p[b].mean(axis=0) for p, b in zip(pixels, bright)])
    nearest = np.argmin(((mean[:, None] - reference[None]) ** 2).sum(-1), axis=1)
    return np.eye(len(colours))[nearest]

  def embed_texts(batch):
    words = [set(tokenizer.decode(ids, skip_special_tokens=True).split())
             for ids in batch["text_ids"]]
    return np.asarray([[c in w for c in colours] for w in words], np.float32)

  evaluator = zeroshot_evaluator.SyntheticZeroShotEvaluator(
      "zeroshot", tokenizer, max_len=36, batch_size=100, image_size=48, num_images=64)
  assert list(np.bincount(evaluator.labels["shape"])) == [16] * 4
  assert evaluator.run(embed_images, embed_texts) == {
      "colour_top1": 100.0, "colour_top5": 100.0, "colour_mean_per_class_recall": 100.0,
      "shape_top1": 0.0, "shape_mean_per_class_recall": 0.0}


def test_the_zeroshot_evaluator_runs_from_the_config_on_a_trained_run(trained_run):
  run = inference.TrainedRun.load(trained_run)
  run.config.eval.evaluators = (("retrieval", {}), ("zeroshot", {}))
  evaluators = evaluators_common.from_config(run.config, eval_split.make_eval_split(run.config))
  results = evaluators_common.run_evals(evaluators, run.embed_fns, run.params)
  zeroshot_keys = {key for key in results if key.startswith("eval/zeroshot")}
  assert zeroshot_keys == {f"eval/zeroshot{suffix}/{metric}"
                           for suffix in ("", "_momentum")
                           for metric in ("colour_top1", "colour_top5",
                                          "colour_mean_per_class_recall", "shape_top1",
                                          "shape_mean_per_class_recall")}
  assert all(0 <= results[key] <= 100 for key in zeroshot_keys)
  assert "zeroshot: colour top-1/5 " in evaluators_common.summary(results)


@pytest.mark.parametrize("config", [
    tiny_config(**{"input.data.name": "captions_json"}), video_retrieval.get_config()])
def test_the_zeroshot_evaluator_is_refused_without_synthetic_images(config):
  config.eval.evaluators = (("retrieval", {}), ("zeroshot", {}))
  with pytest.raises(ValueError, match=r"names 'zeroshot', which classifies synthetic "
                                       r".*it needs input.data.name='synthetic'"):
    evaluators_common.check_config(config)


def test_evaluate_zeroshot_writes_its_entry_and_the_confusion_png(trained_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained_run, workdir)
  (workdir / "eval_results.json").write_text(json.dumps({"retrieval": {"rsum": 1.0}}))
  root = write_folder(tmp_path / "colours", {"red": 2, "green": 1, "blue": 2})
  (root / "blue_thing" / "broken.png").write_bytes(b"\x89PNG broken")
  names = tmp_path / "names.json"
  names.write_text(json.dumps({"red_thing": "red square", "green_thing": "green circle",
                               "blue_thing": "blue cross"}))
  result = run_module("cots_jax.evaluate", "--config=configs/pretrain.py:runlocal",
                      f"--workdir={workdir}", f"--zeroshot={root}", f"--classnames={names}",
                      "--templates=synthetic", *tiny_flags(**RUN_OVERRIDES))
  assert "3 classes, 5 images (1 skipped)" in result.stdout
  assert "top-5 n/a (fewer than 5 classes)" in result.stdout
  written = json.loads((workdir / "eval_results.json").read_text())
  assert written["retrieval"] == {"rsum": 1.0}
  entry = written["zeroshot_folder"]
  assert set(entry) == {"top1", "mean_per_class_recall", "num_classes", "num_images",
                        "num_skipped", "folder", "templates", "step"}
  assert (entry["num_classes"], entry["num_images"], entry["num_skipped"], entry["step"]) == (
      3, 5, 1, 12)
  assert Image.open(workdir / "zeroshot_confusion.png").format == "PNG"
