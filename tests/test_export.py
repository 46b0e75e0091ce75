"""cots_jax.export: the exported towers against the run's, the manifest, `load` without the model
code or Orbax, the errors of both sides and the command line."""

import dataclasses
import importlib.metadata
import io
import json
import pathlib
import re
import shutil
import subprocess
import sys

from absl import app
import jax
import numpy as np
import pytest
from PIL import Image

from cots_jax import export
from cots_jax import inference
from cots_jax.data import transforms
from support import REPO, subprocess_env
from test_remote_paths import fixture_bucket_root  # noqa: F401  (the gs:// stand-in, bucket_root)

CAPTIONS = ["a small red circle on the left", "two blue squares", "a green triangle at the top",
            "three yellow circles", "a large purple square on the right"]
FILES = ["image_encoder.stablehlo", "manifest.json", "text_encoder.stablehlo", "tokenizer"]
# Run by a child: `load` and both embedders, then the modules of the model code and Orbax that
# the child imported (none may be).
CHILD = """
import json, sys
import numpy as np
from cots_jax import export
model = export.load(sys.argv[1])
images, texts = model.embed_images(np.load(sys.argv[2])), model.embed_texts(json.loads(sys.argv[3]))
heavy = ("orbax", "flax", "cots_jax.models", "cots_jax.state", "cots_jax.inference",
         "cots_jax.checkpoint", "cots_jax.train")
print(json.dumps({"images": images.tolist(), "texts": texts.tolist(),
                  "modules": sorted(m for m in sys.modules if m.startswith(heavy))}))
"""


@pytest.fixture(scope="module")
def run(trained_run):
  return inference.TrainedRun.load(trained_run)


@pytest.fixture(scope="module")
def exported(exported_run):
  return export.load(exported_run)


def _images(count, seed=0):
  """`count` random uint8 [24, 24, 3] images (the tiny config's image size)."""
  return np.random.default_rng(seed).integers(0, 256, (count, 24, 24, 3), dtype=np.uint8)


def _captions(count):
  """`count` distinct captions."""
  return [f"{CAPTIONS[i % len(CAPTIONS)]} number {i}" for i in range(count)]


def _command_line(*args):
  """Runs `python -m cots_jax.export ARGS` in this process: its flags parsed, then its main."""
  export.FLAGS.unparse_flags()
  export.main(export.FLAGS(["cots_jax.export", *args]))


def _copy(exported_run, tmp_path):
  """A copy of the export to break."""
  return pathlib.Path(shutil.copytree(exported_run, tmp_path / "copy"))


@pytest.mark.parametrize("count", [1, 7, 64])
def test_exported_embeddings_equal_the_runs(run, exported, count):
  """One export, three batch sizes (its batch is symbolic)."""
  images, captions = _images(count), _captions(count)
  got = exported.embed_images(images)
  assert got.dtype == np.float32 and got.shape == (count, 16)
  np.testing.assert_allclose(got, run.embed_images(transforms.to_unit_range(images)), atol=1e-5)
  texts = exported.embed_texts(captions)
  assert texts.dtype == np.float32 and texts.shape == (count, 16)
  np.testing.assert_allclose(texts, run.embed_texts(captions), atol=1e-5)


def test_rows_are_embedded_in_batches_of_batch_size(exported_run, exported):
  """7 images in calls of 3, 3 and 1 rows (captions go through the same batching)."""
  images = _images(7, seed=1)
  in_threes = export.load(exported_run, batch_size=3)
  np.testing.assert_allclose(in_threes.embed_images(images), exported.embed_images(images),
                             atol=1e-6)


def test_the_manifest_describes_the_export(exported_run, exported, trained_run, run):
  manifest = json.loads((exported_run / "manifest.json").read_text())
  assert manifest == exported.manifest
  assert sorted(p.name for p in exported_run.iterdir()) == FILES
  assert manifest["format"] == export.EXPORT_FORMAT == 1
  assert manifest["cots_jax_version"] == importlib.metadata.version("cots_jax")
  assert manifest["jax_version"] == jax.__version__
  assert manifest["source"] == {"workdir": str(pathlib.Path(trained_run).absolute()), "step": 12,
                                "encoder": "online"}
  assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
  assert manifest["embed_dim"] == exported.embed_dim == 16
  max_len = run.config.input.max_len
  output = {"shape": ["b", 16], "dtype": "float32"}
  assert manifest["image"] == {
      "file": "image_encoder.stablehlo", "output": output,
      "inputs": [{"name": "images", "shape": ["b", 24, 24, 3], "dtype": "uint8"}]}
  assert manifest["text"] == {
      "file": "text_encoder.stablehlo", "output": output,
      "inputs": [{"name": name, "shape": ["b", max_len], "dtype": "int32"}
                 for name in ("ids", "mask")]}
  assert manifest["preprocessing"] == {"image_size": 24, "max_len": max_len,
                                       **export.PREPROCESSING_RULES}
  assert exported.image_size == 24
  assert manifest["tokenizer"] == {"dir": "tokenizer", "files": sorted(
      p.name for p in (exported_run / "tokenizer").iterdir())}
  assert manifest["config"] == json.loads(run.config.to_json_best_effort())
  assert export.ENCODERS == tuple(sorted(inference.ENCODERS))


def test_image_transform_is_the_runs_eval_transform(exported, run):
  encoded = io.BytesIO()
  Image.fromarray(_images(1)[0].repeat(2, axis=1)[:20]).save(encoded, "PNG")  # 20 x 48 px
  pixels = exported.image_transform(encoded.getvalue())
  assert pixels.dtype == np.uint8 and pixels.shape == (24, 24, 3)
  np.testing.assert_array_equal(pixels, run.image_transform().pixels(encoded.getvalue(), "x"))
  with pytest.raises(transforms.BadExampleError, match="notes.txt: not an image"):
    exported.image_transform(b"some text", "notes.txt")


def test_an_export_on_a_bucket_reads_back(run, trained_run, exported, bucket_root):
  export.export_run(run, trained_run, "gs://bucket/export", platforms=("cpu",))
  assert sorted(p.name for p in (bucket_root / "bucket" / "export").iterdir()) == FILES
  from_bucket = export.load("gs://bucket/export")
  images, captions = _images(2, seed=4), _captions(2)
  np.testing.assert_allclose(from_bucket.embed_images(images), exported.embed_images(images),
                             atol=1e-6)
  np.testing.assert_allclose(from_bucket.embed_texts(captions), exported.embed_texts(captions),
                             atol=1e-6)


def test_load_needs_no_model_code_or_orbax(exported_run, run, tmp_path):
  """`load` and both embedders in a child that has imported nothing else of cots_jax."""
  images, captions = _images(3, seed=2), _captions(3)
  np.save(tmp_path / "images.npy", images)
  child = subprocess.run([sys.executable, "-c", CHILD, str(exported_run),
                          str(tmp_path / "images.npy"), json.dumps(captions)],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300, check=False)
  assert child.returncode == 0, child.stderr[-4000:]
  answer = json.loads(child.stdout)
  assert answer["modules"] == []
  np.testing.assert_allclose(answer["images"],
                             run.embed_images(transforms.to_unit_range(images)), atol=1e-5)
  np.testing.assert_allclose(answer["texts"], run.embed_texts(captions), atol=1e-5)


def test_load_names_what_is_wrong(exported_run, tmp_path):
  copy = _copy(exported_run, tmp_path)
  manifest = json.loads((copy / "manifest.json").read_text())
  (copy / "manifest.json").write_text(json.dumps({**manifest, "format": 2}))
  with pytest.raises(ValueError, match=re.escape(
      f"export format 2 in {copy}/manifest.json; this cots_jax reads format 1: re-export the "
      "run with this version")):
    export.load(copy)
  (copy / "manifest.json").write_text(json.dumps(
      {key: value for key, value in manifest.items() if key != "embed_dim"}))
  with pytest.raises(ValueError, match=re.escape(f"{copy}/manifest.json lacks embed_dim")):
    export.load(copy)
  (copy / "manifest.json").write_text(json.dumps(manifest))
  for missing in ("text_encoder.stablehlo", "tokenizer/tokenizer.json"):
    (copy / missing).rename(tmp_path / "aside")
    with pytest.raises(FileNotFoundError, match=re.escape(
        f"{copy}/{missing} is missing: the export in {copy} is incomplete")):
      export.load(copy)
    (tmp_path / "aside").rename(copy / missing)
  (copy / "manifest.json").unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(f"{copy}/manifest.json does not exist: "
                                                        f"{copy} is no cots_jax export")):
    export.load(copy)


def test_embedders_refuse_bad_inputs(exported):
  wanted = re.escape("images must be uint8 [B >= 1, 24, 24, 3] (the pixels of image_transform), ")
  for images, got in ((transforms.to_unit_range(_images(2)), r"got float32 \[2, 24, 24, 3\]"),
                      (np.zeros((2, 32, 32, 3), np.uint8), r"got uint8 \[2, 32, 32, 3\]"),
                      (_images(1)[0], r"got uint8 \[24, 24, 3\]"),
                      (_images(0), r"got uint8 \[0, 24, 24, 3\]")):
    with pytest.raises(ValueError, match=wanted + got):
      exported.embed_images(images)
  with pytest.raises(ValueError, match=r"no captions to embed \(an empty list\)"):
    exported.embed_texts([])
  with pytest.raises(ValueError, match="captions must be a list of str, got one str"):
    exported.embed_texts("a red circle")


def test_export_refuses_a_used_folder_a_missing_encoder_video_and_a_bad_platform(
    run, trained_run, tmp_path):
  (tmp_path / "used").mkdir()
  (tmp_path / "used" / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="used is not empty: export into a new folder"):
    export.export_run(run, trained_run, tmp_path / "used")
  # What TrainedRun.load gives for a run whose loss terms read no momentum encoder.
  online_only = dataclasses.replace(run, params={"params": run.params["params"]})
  with pytest.raises(ValueError, match="encoder 'momentum': this run has no momentum encoder"):
    export.export_run(online_only, trained_run, tmp_path / "new", "momentum")
  video_config = run.config.copy_and_resolve_references()
  video_config.input.data.name = "synthetic_video"
  with pytest.raises(ValueError, match="model takes video clips .*'synthetic_video'.*; only "
                                       "image-text runs can be exported"):
    export.export_run(dataclasses.replace(run, config=video_config), trained_run, tmp_path / "new")
  with pytest.raises(ValueError, match="--platforms 'cpu,gpu': give some of cpu, cuda, rocm, "
                                       "tpu"):
    export.export_run(run, trained_run, tmp_path / "new", platforms=("cpu", "gpu"))
  assert not (tmp_path / "new").exists()


def test_command_line_exports_the_momentum_encoder_of_a_step(trained_run, tmp_path, capsys):
  out = tmp_path / "momentum"
  _command_line(f"--workdir={trained_run}", "--step=6", "--encoder=momentum", f"--out={out}",
                "--platforms=cpu")
  assert capsys.readouterr().out == (f"exported the momentum encoder of step 6 of {trained_run} "
                                     f"(16-dim embeddings, for cpu): {out}\n")
  exported = export.load(out)
  assert exported.manifest["source"]["step"] == 6 and exported.manifest["platforms"] == ["cpu"]
  assert exported.manifest["source"]["encoder"] == "momentum"
  step6 = inference.TrainedRun.load(trained_run, step=6)
  images, captions = _images(3, seed=3), _captions(3)
  np.testing.assert_allclose(exported.embed_images(images), step6.embed_images(
      transforms.to_unit_range(images), "momentum"), atol=1e-5)
  np.testing.assert_allclose(exported.embed_texts(captions),
                             step6.embed_texts(captions, "momentum"), atol=1e-5)


def test_command_line_errors_are_one_line(run, trained_run, tmp_path, monkeypatch):
  with pytest.raises(SystemExit, match="^cots_jax.export: error: give --out$"):
    _command_line(f"--workdir={trained_run}")
  with pytest.raises(SystemExit, match="^cots_jax.export: error: .*missing/config.json does not "
                                       "exist: .* is not the workdir of a cots_jax run$"):
    _command_line(f"--workdir={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}")
  online_only = dataclasses.replace(run, params={"params": run.params["params"]})
  monkeypatch.setattr(inference.TrainedRun, "load", lambda *args, **kwargs: online_only)
  with pytest.raises(SystemExit, match="^cots_jax.export: error: encoder 'momentum': this run has "
                                       "no momentum encoder .*; use the online encoder$"):
    _command_line(f"--workdir={trained_run}", "--encoder=momentum", f"--out={tmp_path / 'out'}")
  with pytest.raises(app.UsageError, match="takes flags only"):
    _command_line("now")
