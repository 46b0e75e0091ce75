"""cots_jax.search: index files, image / caption indexing, queries, the FAISS backend, the CLI."""

import contextlib
import io
import json
import pathlib
import re
import sys

from absl import app
import numpy as np
import pytest
import safetensors
from PIL import Image

from cots_jax import inference
from cots_jax import search
from support import ABSL_INFO, run_module

CAPTIONS = ["a small red circle on the left", "two blue squares", "a green triangle at the top",
            "three yellow circles", "a large purple square on the right"]
QUERY = "a red circle"


def _write_images(folder):
  """Writes images of every kind the index must take plus two bad files; returns (the readable
  paths, the bad paths), absolute strings."""
  rng = np.random.default_rng(0)

  def rgb(height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)

  (folder / "nested" / "deeper").mkdir(parents=True)
  images = {
      "rgb.png": Image.fromarray(rgb(30, 40)),
      "gray.jpg": Image.fromarray(rgb(32, 32)[..., 0], "L"),
      "rgba.png": Image.fromarray(rng.integers(0, 256, (28, 28, 4), dtype=np.uint8), "RGBA"),
      "palette.png": Image.fromarray(rgb(26, 26)).convert("P"),
      "deep16.png": Image.fromarray(rng.integers(0, 65536, (24, 30), dtype=np.uint16)),
      "tiny.png": Image.fromarray(rgb(5, 3)),
      "large.jpg": Image.fromarray(rgb(200, 300)),
      "nested/deeper/inner.png": Image.fromarray(rgb(24, 24)),
  }
  for name, image in images.items():
    image.save(folder / name)
  assert Image.open(folder / "deep16.png").mode.startswith("I;16")
  good_jpeg = io.BytesIO()
  Image.fromarray(rgb(40, 40)).save(good_jpeg, "JPEG")
  (folder / "broken.jpg").write_bytes(good_jpeg.getvalue()[:200])
  (folder / "notes.txt").write_text("not an image\n")
  return ([str(folder / name) for name in sorted(images)],
          [str(folder / "broken.jpg"), str(folder / "notes.txt")])


@pytest.fixture(scope="module")
def run(trained_run):
  return inference.TrainedRun.load(trained_run)


@pytest.fixture(scope="module")
def embedder(run, trained_run):
  return search.run_embedder(run, trained_run)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("images")
  return (folder, *_write_images(folder))


@pytest.fixture(scope="module")
def image_index(embedder, image_folder):
  """build_image_index of the folder in batches of 3 (so batches straddle the skipped files):
  ((embeddings, items, skipped), what it wrote on stderr)."""
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    built = search.build_image_index(embedder, image_folder[0], batch_size=3)
  return built, stderr.getvalue()


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("captions") / "captions.txt"
  path.write_text("\n".join(["", CAPTIONS[0], "   ", *[f"  {c} " for c in CAPTIONS[1:]], ""]))
  return path


def _command_line(*args):
  """Runs `python -m cots_jax.search ARGS` in this process: its flags parsed, then its main."""
  search.FLAGS.unparse_flags()
  search.main(search.FLAGS(["cots_jax.search", *args]))


def _reference_embeddings(run, paths):
  """The test's own decoding of `paths` with the run's transform, embedded in one batch."""
  transform = run.image_transform()
  return run.embed_images(np.stack([transform(pathlib.Path(p).read_bytes(), p) for p in paths]))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_index_round_trip(tmp_path, suffix):
  embeddings = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
  items = ["/a/b.png", "ünïcode path.jpg", "a caption\twith a tab", "x"]
  meta = {"kind": "image", "workdir": "/w", "step": 12, "encoder": "online", "embed_dim": 6}
  path = tmp_path / f"index{suffix}"
  search.save_index(path, embeddings.astype(np.float64), items, meta)
  loaded, loaded_items, loaded_meta = search.load_index(path)
  assert loaded.dtype == np.float32
  np.testing.assert_array_equal(loaded, embeddings)
  assert loaded_items == items and loaded_meta == meta


def test_safetensors_index_holds_the_named_tensor(tmp_path):
  path = tmp_path / "index.safetensors"
  search.save_index(path, np.eye(2), ["a", "b"], {"kind": "text"})
  with safetensors.safe_open(str(path), framework="numpy") as file:
    assert list(file.keys()) == ["embeddings"]
    assert json.loads(file.metadata()["items"]) == ["a", "b"]


def test_index_format_errors(tmp_path):
  with pytest.raises(ValueError, match=r"unknown suffix '\.pkl'"):
    search.save_index(tmp_path / "index.pkl", np.eye(2), ["a", "b"], {})
  with pytest.raises(ValueError, match="unknown suffix ''"):
    search.load_index(tmp_path / "index")
  with pytest.raises(ValueError, match=r"embeddings must be \[3 items, E\]"):
    search.save_index(tmp_path / "index.npz", np.eye(2), ["a", "b", "c"], {})
  np.savez(tmp_path / "other.npz", weights=np.eye(2))
  with pytest.raises(ValueError, match="no cots_jax.search index"):
    search.load_index(tmp_path / "other.npz")


def test_image_index_takes_every_readable_image_and_reports_the_rest(image_index, image_folder):
  (embeddings, items, skipped), stderr = image_index
  _, readable, bad = image_folder
  assert search.image_files(image_folder[0]) == sorted(readable + bad)
  assert items == readable
  assert [path for path, _ in skipped] == bad
  assert "truncated or corrupt" in dict(skipped)[bad[0]]
  assert "not an image" in dict(skipped)[bad[1]]
  for path, reason in skipped:
    assert f"skipped {path}: {reason}" in stderr
  assert embeddings.shape == (len(readable), 16) and embeddings.dtype == np.float32


def test_image_index_embeddings_equal_the_runs(image_index, image_folder, run):
  embeddings = image_index[0][0]
  np.testing.assert_allclose(embeddings, _reference_embeddings(run, image_folder[1]), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_image_index_errors(embedder, tmp_path):
  with pytest.raises(NotADirectoryError, match="is not a folder"):
    search.build_image_index(embedder, tmp_path / "missing")
  (tmp_path / "notes.txt").write_text("no images here")
  with contextlib.redirect_stderr(io.StringIO()):
    with pytest.raises(ValueError, match=r"no readable image .* \(1 files skipped\)"):
      search.build_image_index(embedder, tmp_path)


def test_text_query_ranks_by_dot_product(image_index, run, embedder):
  embeddings, items, _ = image_index[0]
  query = search.embed_query(embedder, text=QUERY)
  np.testing.assert_allclose(query, run.embed_texts([QUERY])[0], atol=1e-6)
  expected = embeddings.astype(np.float64) @ query.astype(np.float64)
  hits = search.search(embeddings, items, query, k=5)
  scores = [score for _, score in hits]
  assert len(hits) == 5 and scores == sorted(scores, reverse=True)
  assert hits[0][0] == items[int(np.argmax(expected))]
  assert [item for item, _ in hits] == [items[i] for i in np.argsort(-expected)[:5]]
  np.testing.assert_allclose(scores, [expected[items.index(item)] for item, _ in hits], atol=1e-5)
  assert len(search.search(embeddings, items, query, k=50)) == len(items)
  assert len(search.search(embeddings, items, query, k=10**9)) == len(items)  # nothing of size k


def test_search_errors(image_index):
  embeddings, items, _ = image_index[0]
  with pytest.raises(ValueError, match="k must be a positive int"):
    search.search(embeddings, items, embeddings[0], k=0)
  with pytest.raises(ValueError, match="the query embedding has 3 dims, the index 16"):
    search.search(embeddings, items, np.ones(3), k=1)
  with pytest.raises(ValueError, match="backend 'annoy' is unknown"):
    search.search(embeddings, items, embeddings[0], k=1, backend="annoy")


def test_image_queries_a_caption_index(run, embedder, captions_file, image_folder):
  embeddings, captions = search.build_text_index(embedder, captions_file)
  assert captions == CAPTIONS
  np.testing.assert_allclose(embeddings, run.embed_texts(CAPTIONS), atol=1e-6)
  image = image_folder[1][0]
  query = search.embed_query(embedder, image=image)
  np.testing.assert_allclose(query, _reference_embeddings(run, [image])[0], atol=1e-5)
  expected = embeddings @ query
  hits = search.search(embeddings, captions, query, k=3)
  assert [caption for caption, _ in hits] == [CAPTIONS[i] for i in np.argsort(-expected)[:3]]
  np.testing.assert_allclose([s for _, s in hits], np.sort(expected)[::-1][:3], atol=1e-5)


def test_empty_caption_file_is_an_error(embedder, tmp_path):
  (tmp_path / "blank.txt").write_text("\n  \n")
  with pytest.raises(ValueError, match="holds no caption"):
    search.build_text_index(embedder, tmp_path / "blank.txt")


def test_faiss_backend_equals_exact(image_index):
  embeddings, items, _ = image_index[0]
  for query in (embeddings[2], -embeddings[0], embeddings[1:4].mean(axis=0)):
    exact = search.search(embeddings, items, query, k=4)
    faiss_hits = search.search(embeddings, items, query, k=4, backend="faiss")
    assert [item for item, _ in faiss_hits] == [item for item, _ in exact]
    np.testing.assert_allclose([s for _, s in faiss_hits], [s for _, s in exact], atol=1e-5)


def test_faiss_missing_names_the_extra(image_index, monkeypatch):
  embeddings, items, _ = image_index[0]
  monkeypatch.setitem(sys.modules, "faiss", None)
  with pytest.raises(ImportError, match=r"pip install 'cots_jax\[faiss\]'"):
    search.search(embeddings, items, embeddings[0], k=1, backend="faiss")


def test_query_kind_must_fit_the_index():
  with pytest.raises(ValueError, match="--image needs an index of kind 'text' but this one "
                                       "is 'image' \\(query it with --text\\)"):
    search.check_query_kind({"kind": "image"}, image="a.png")
  with pytest.raises(ValueError, match="--text needs an index of kind 'image'"):
    search.check_query_kind({"kind": "text"}, text="a dog")
  with pytest.raises(ValueError, match="exactly one of --text and --image"):
    search.check_query_kind({"kind": "text"}, text="a dog", image="a.png")
  search.check_query_kind({"kind": "image"}, text="a dog")
  search.check_query_kind({"kind": "text"}, image="a.png")


def test_format_hits():
  hits = [("/x/a.png", 0.5), ("/x/b.png", -0.25)]
  assert search.format_hits(hits, "image") == "0.5000\t/x/a.png\n-0.2500\t/x/b.png"
  assert json.loads(search.format_hits(hits, "text", as_json=True)) == [
      {"caption": "/x/a.png", "score": 0.5}, {"caption": "/x/b.png", "score": -0.25}]


def test_main_reports_bad_inputs_in_one_line(trained_run, tmp_path):
  with pytest.raises(SystemExit, match=r"cots_jax.search index: error: index .*x\.pkl: unknown"):
    _command_line("index", f"--workdir={trained_run}", "--captions=c.txt", "--out=x.pkl")
  search.save_index(tmp_path / "text.npz", np.eye(2), ["a", "b"], {"kind": "text"})
  index = f"--index={tmp_path / 'text.npz'}"
  with pytest.raises(SystemExit, match="cots_jax.search query: error: --text needs an index"):
    _command_line("query", index, "--text=a dog")
  with pytest.raises(SystemExit, match="query: error: give exactly one of --text and --image"):
    _command_line("query", index, "--text=a", "--image=b.png")
  with pytest.raises(SystemExit, match="index: error: give exactly one of --images and --captions"):
    _command_line("index", f"--workdir={trained_run}", "--images=f", "--captions=c.txt",
                  "--out=x.npz")
  with pytest.raises(SystemExit, match="cots_jax.search index: error: index needs --out"):
    _command_line("index", f"--workdir={trained_run}", "--captions=c.txt")
  with pytest.raises(SystemExit, match="cots_jax.search query: error: query takes no --images"):
    _command_line("query", index, "--text=a dog", "--images=f")
  with pytest.raises(app.UsageError, match="give one command, index, query or serve"):
    _command_line("find", index)


def test_main_queries_a_caption_index_with_an_image(run, trained_run, captions_file, image_folder,
                                                    tmp_path, capsys):
  index = tmp_path / "captions.safetensors"
  _command_line("index", f"--workdir={trained_run}", f"--captions={captions_file}", "--step=6",
                f"--out={index}")
  assert capsys.readouterr().out == f"indexed {len(CAPTIONS)} captions: {index}\n"
  embeddings, captions, meta = search.load_index(index)
  assert meta == {"kind": "text", "workdir": str(pathlib.Path(trained_run).absolute()),
                  "step": 6, "encoder": "online", "embed_dim": 16}
  step6 = inference.TrainedRun.load(trained_run, step=6)
  np.testing.assert_allclose(embeddings, step6.embed_texts(CAPTIONS), atol=1e-6)
  assert not np.allclose(embeddings, run.embed_texts(CAPTIONS), atol=1e-4)
  _command_line("query", f"--index={index}", f"--image={image_folder[1][0]}", "-k", "2")
  expected = search.search(embeddings, captions,
                           search.embed_query(search.run_embedder(step6, trained_run),
                                              image=image_folder[1][0]), k=2)
  assert capsys.readouterr().out == search.format_hits(expected, "text") + "\n"


def test_command_line_indexes_a_folder_and_answers_json(run, trained_run, image_folder,
                                                        image_index, tmp_path, capsys):
  """The two commands end to end (the momentum encoder, an .npz index); the query in a child
  process, as `python -m cots_jax.search`, its library logs in --log_dir."""
  folder, readable, bad = image_folder
  index = tmp_path / "images.npz"
  _command_line("index", f"--workdir={trained_run}", f"--images={folder}", "--encoder=momentum",
                f"--out={index}")
  indexed = capsys.readouterr()
  assert indexed.out == f"indexed {len(readable)} images, skipped {len(bad)}: {index}\n"
  assert all(f"skipped {path}: " in indexed.err for path in bad)
  embeddings, items, meta = search.load_index(index)
  assert items == readable and meta["encoder"] == "momentum" and meta["step"] == 12
  assert not np.allclose(embeddings, image_index[0][0], atol=1e-4)  # the online encoder's
  queried = run_module("cots_jax.search", "query", f"--index={index}", f"--text={QUERY}", "-k",
                       "3", "--json", f"--log_dir={tmp_path}")
  assert not ABSL_INFO.search(queried.stderr)  # Orbax's restore lines: in absl's log dir
  assert "Restoring checkpoint from" in (tmp_path / "cots_jax.search.log.txt").read_text()
  hits = json.loads(queried.stdout)
  query = run.embed_texts([QUERY], "momentum")[0]
  expected = embeddings @ query
  assert [hit["path"] for hit in hits] == [items[i] for i in np.argsort(-expected)[:3]]
  np.testing.assert_allclose([hit["score"] for hit in hits], np.sort(expected)[::-1][:3],
                             atol=1e-5)


def test_an_export_indexes_and_answers_like_its_run(embedder, exported_run, image_folder,
                                                   image_index, tmp_path, capsys):
  """index and query through an export (no --workdir): the run's embeddings and ranking."""
  folder, readable, bad = image_folder
  index = tmp_path / "images.safetensors"
  _command_line("index", f"--export={exported_run}", f"--images={folder}", f"--out={index}")
  assert capsys.readouterr().out == (f"indexed {len(readable)} images, skipped {len(bad)}: "
                                     f"{index}\n")
  embeddings, items, meta = search.load_index(index)
  assert meta == {"kind": "image", "export": str(exported_run), "embed_dim": 16}
  assert items == readable
  np.testing.assert_allclose(embeddings, image_index[0][0], atol=1e-5)
  _command_line("query", f"--index={index}", f"--text={QUERY}", "-k", "4", "--json")
  hits = json.loads(capsys.readouterr().out)
  expected = search.search(image_index[0][0], readable, search.embed_query(embedder, text=QUERY),
                           k=4)
  assert [hit["path"] for hit in hits] == [item for item, _ in expected]
  np.testing.assert_allclose([hit["score"] for hit in hits], [s for _, s in expected], atol=1e-5)


def test_an_export_queries_a_runs_caption_index(trained_run, embedder, exported_run,
                                                captions_file, image_folder, tmp_path, capsys):
  index = tmp_path / "captions.npz"
  _command_line("index", f"--workdir={trained_run}", f"--captions={captions_file}",
                f"--out={index}")
  capsys.readouterr()
  image = image_folder[1][2]
  _command_line("query", f"--index={index}", f"--image={image}", f"--export={exported_run}")
  embeddings, captions, _ = search.load_index(index)
  expected = search.search(embeddings, captions, search.embed_query(embedder, image=image))
  printed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
  assert [caption for _, caption in printed] == [caption for caption, _ in expected]
  np.testing.assert_allclose([float(s) for s, _ in printed], [s for _, s in expected], atol=1e-4)


def test_export_flags_and_embedding_widths_are_checked(trained_run, exported_run, tmp_path):
  export_flag, image = f"--export={exported_run}", "--image=a.png"
  with pytest.raises(SystemExit, match="index: error: give exactly one of --workdir and --export"):
    _command_line("index", f"--workdir={trained_run}", export_flag, "--captions=c.txt",
                  "--out=x.npz")
  with pytest.raises(SystemExit, match="index: error: --step and --encoder pick a run's "
                                       "checkpoint and encoder; an export holds one"):
    _command_line("index", export_flag, "--step=6", "--captions=c.txt", "--out=x.npz")
  search.save_index(tmp_path / "wide.npz", np.eye(24)[:2], ["a", "b"],
                    {"kind": "text", "export": str(exported_run), "embed_dim": 24})
  wide = f"--index={tmp_path / 'wide.npz'}"
  with pytest.raises(SystemExit, match="query: error: give at most one of --workdir and --export"):
    _command_line("query", wide, image, f"--workdir={trained_run}", export_flag)
  with pytest.raises(SystemExit, match=re.escape(
      "query: error: the index holds 24-dim embeddings, the model {'export': "
      f"'{exported_run}'}} embeds in 16 dims: query it with the index's own model")):
    _command_line("query", wide, image)
  search.save_index(tmp_path / "bare.npz", np.eye(2), ["a", "b"], {"kind": "text"})
  with pytest.raises(SystemExit, match="query: error: the index names no model: give --workdir "
                                       "or --export"):
    _command_line("query", f"--index={tmp_path / 'bare.npz'}", image)
  narrow = search.Embedder(pixels=None, images=None, texts=None, batch_size=1, embed_dim=16,
                           source={"export": "e"})
  with pytest.raises(ValueError, match="the index holds 24-dim"):
    search.check_embed_dim({"embed_dim": 24}, narrow)
  search.check_embed_dim({"embed_dim": 16}, narrow)
  search.check_embed_dim({}, narrow)  # an index of the first format may lack embed_dim
