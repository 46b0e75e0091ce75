"""Cross-modal search with a trained run or its export: index images or captions once, then
query the index, on the command line or in the browser.

  python -m cots_jax.search index --workdir=DIR --images=FOLDER --out=INDEX.safetensors
  python -m cots_jax.search query --index=INDEX.safetensors --text="a dog runs in the snow" -k 5
  python -m cots_jax.search index --export=EXPORT --captions=CAPTIONS.txt --out=INDEX.npz
  python -m cots_jax.search query --index=INDEX.npz --image=photo.jpg --json
  python -m cots_jax.search serve --index=INDEX.safetensors --export=EXPORT --port=8000

The model is one encoder of a run's checkpoint (--workdir, --step, --encoder) or an export of one
(--export, `python -m cots_jax.export`: no model code or Orbax needed), behind one `Embedder`.
An index file holds the unit embeddings float32 [n, E] of n items (absolute image paths, or
captions: one per non-blank line of a text file) and its meta (kind "image" | "text", embed_dim,
and the model: workdir, step and encoder, or export). `.safetensors` keeps the items and meta as
JSON strings in the header metadata (which safetensors caps at 100 MB: use `.npz` for millions of
long paths); `.npz` keeps them as a unicode array and a JSON string, read back without pickle. A
query is embedded with the index's model (or --workdir / --export) and ranked by dot product:
exact top-k over numpy chunks by default, or FAISS (`faiss.IndexFlatIP`, also exact) with
--backend=faiss. Index, caption and query image files may be gs:// URLs (etils.epath, like the
workdir); --images is a local folder. `serve` answers text, image and "more like this" queries
of the index from a local web page (cots_jax.serve).
"""

import dataclasses
import json
import os
import pathlib
import sys
from typing import Callable

from absl import app
from absl import flags
from etils import epath
import numpy as np
from safetensors import numpy as safetensors_numpy

from cots_jax import export
from cots_jax import inference
from cots_jax import logs
from cots_jax import paths
from cots_jax.data import transforms
from cots_jax.evaluators import retrieval

# This tool's own flags, apart from absl's global FLAGS: the functions of this module are imported
# beside cots_jax.report, which defines --workdir, --step and --encoder there too.
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "index: workdir of a finished run; query, serve: run to embed the queries "
    "with (default: the index's model)", flag_values=FLAGS)
_EXPORT = flags.DEFINE_string(
    "export", None, "index: folder of an export (cots_jax.export) to embed with instead of a "
    "run; query, serve: export to embed the queries with (default: the index's model)",
    flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "index: checkpoint step (default: the latest); "
                             "serve: the run's step (default: the index's)", flag_values=FLAGS)
_ENCODER = flags.DEFINE_enum("encoder", "online", sorted(inference.ENCODERS), "index: encoder; "
                             "serve: the run's encoder (default: the index's)",
                             flag_values=FLAGS)
_IMAGES = flags.DEFINE_string("images", None, "index: folder of images (recursive): an image "
                              "index", flag_values=FLAGS)
_CAPTIONS = flags.DEFINE_string("captions", None, "index: text file, one caption per line: a "
                                "text index", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "index: index file, .safetensors or .npz",
                           flag_values=FLAGS)
_INDEX = flags.DEFINE_string("index", None, "query, serve: index file written by `index`",
                             flag_values=FLAGS)
_TEXT = flags.DEFINE_string("text", None, "query: caption to search an image index with",
                            flag_values=FLAGS)
_IMAGE = flags.DEFINE_string("image", None, "query: image file to search a text index with",
                             flag_values=FLAGS)
_K = flags.DEFINE_integer("k", 5, "query: number of hits", flag_values=FLAGS)
_JSON = flags.DEFINE_bool("json", False, "query: print a JSON list of hits", flag_values=FLAGS)
_BACKEND = flags.DEFINE_enum("backend", "exact", ["exact", "faiss"], "query: top-k backend",
                             flag_values=FLAGS)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "serve: address to listen on (the default "
                            "answers this machine only)", flag_values=FLAGS)
_PORT = flags.DEFINE_integer("port", 8000, "serve: TCP port", lower_bound=1, upper_bound=65535,
                             flag_values=FLAGS)

# Each command's flags, the groups of them of which it needs exactly one, and those of which it
# takes at most one (query's --text / --image are checked against the index's kind by
# `check_query_kind`).
COMMANDS = {
    "index": (("workdir", "export", "step", "encoder", "images", "captions", "out"),
              (("workdir", "export"), ("out",), ("images", "captions")), ()),
    "query": (("index", "text", "image", "k", "json", "backend", "workdir", "export"),
              (("index",),), (("workdir", "export"),)),
    "serve": (("index", "workdir", "export", "step", "encoder", "host", "port"),
              (("index",),), (("workdir", "export"),)),
}
FORMATS = (".safetensors", ".npz")
# The JSON key of an item in query results, per index kind.
ITEM_KEYS = {"image": "path", "text": "caption"}


@dataclasses.dataclass(frozen=True)
class Embedder:
  """The model that indexes and queries: one encoder of a trained run, or an export.

  Attributes:
    pixels: (encoded image bytes, name) -> uint8 [S, S, 3], the eval resize and centre crop;
      raises transforms.BadExampleError.
    images: uint8 [b, S, S, 3] -> unit embeddings float32 [b, E].
    texts: list of b str -> unit embeddings float32 [b, E].
    batch_size: images decoded and embedded at a time.
    embed_dim: E.
    source: what an index's meta records of the model: {"workdir", "step", "encoder"} of a run,
      {"export"} of an export.
  """
  pixels: Callable
  images: Callable
  texts: Callable
  batch_size: int
  embed_dim: int
  source: dict


def run_embedder(run, workdir, encoder="online"):
  """The `Embedder` of `encoder` ("online" or "momentum") of `run`, the inference.TrainedRun of
  WORKDIR (images and captions in batches of its config.eval.batch_size).

  Raises:
    ValueError when the run has no such encoder.
  """
  run.encoder_params(encoder)  # an encoder the run lacks fails here, before any embedding
  return Embedder(
      pixels=run.image_transform().pixels,
      images=lambda pixels: run.embed_images(transforms.to_unit_range(pixels), encoder),
      texts=lambda captions: run.embed_texts(captions, encoder),
      batch_size=run.config.eval.batch_size, embed_dim=run.config.model.embed_dim,
      source={"workdir": os.fspath(paths.absolute(workdir)), "step": int(run.step),
              "encoder": encoder})


def export_embedder(exported, directory):
  """The `Embedder` of `exported`, the export.ExportedModel of the folder DIRECTORY."""
  return Embedder(pixels=exported.image_transform, images=exported.embed_images,
                  texts=exported.embed_texts, batch_size=exported.batch_size,
                  embed_dim=exported.embed_dim,
                  source={"export": os.fspath(paths.absolute(directory))})


def image_files(folder):
  """Every file under FOLDER (recursive) as absolute path strings, sorted (for determinism).

  Raises:
    NotADirectoryError when FOLDER is not a folder.
  """
  # Local only: epath refuses recursive globs (an RPC per folder on GCS), and its walk, unlike
  # pathlib's rglob, does not follow symlinked folders.
  root = pathlib.Path(folder).expanduser().absolute()
  if not root.is_dir():
    raise NotADirectoryError(f"--images {folder!r} is not a folder")
  return sorted(str(path) for path in root.rglob("*") if path.is_file())


def _decoded_batches(files, transform, batch_size, skipped):
  """Yields (uint8 [b, S, S, 3] of transform(bytes, path), b paths) of the files that decode,
  b = batch_size except in the last batch (one compiled shape for all others); each file that
  does not decode is appended to `skipped` as (path, reason) and reported on stderr."""
  pixels, names = [], []
  for path in files:
    try:
      pixels.append(transform(epath.Path(path).read_bytes(), path))
      names.append(path)
    except transforms.BadExampleError as error:
      _report_skip(skipped, path, error.reason)
    except OSError as error:
      _report_skip(skipped, path, error.strerror or str(error))
    if len(pixels) == batch_size:
      yield np.stack(pixels), names
      pixels, names = [], []
  if pixels:
    yield np.stack(pixels), names


def _report_skip(skipped, path, reason):
  """Records and reports one file left out of an image index."""
  skipped.append((path, reason))
  print(f"skipped {path}: {reason}", file=sys.stderr)


def build_image_index(embedder, folder, batch_size=None):
  """Embeds every readable image under FOLDER (recursive, sorted paths), batch by batch.

  Args:
    embedder: an `Embedder`.
    folder: the image folder; files of any size and PIL mode, other files are skipped.
    batch_size: images decoded and embedded at a time (None: the embedder's).

  Returns:
    (embeddings float32 [n, E] unit rows, the n absolute image paths, skipped [(path, reason)]).

  Raises:
    NotADirectoryError when FOLDER is not a folder; ValueError when no file in it is an image.
  """
  skipped, embeddings, items = [], [], []
  batches = _decoded_batches(image_files(folder), embedder.pixels,
                             batch_size or embedder.batch_size, skipped)
  for pixels, names in batches:
    embeddings.append(embedder.images(pixels))
    items.extend(names)
  if not items:
    raise ValueError(f"no readable image under {folder!r} ({len(skipped)} files skipped)")
  return np.concatenate(embeddings).astype(np.float32), items, skipped


def read_captions(path):
  """The non-blank lines of the UTF-8 text file PATH, stripped: one caption per line."""
  lines = epath.Path(path).read_text(encoding="utf-8").splitlines()
  return [line.strip() for line in lines if line.strip()]


def build_text_index(embedder, captions_file):
  """Embeds the captions of CAPTIONS_FILE (one per non-blank line) with an `Embedder`.

  Returns:
    (embeddings float32 [n, E] unit rows, the n captions in file order).

  Raises:
    ValueError when the file holds no caption.
  """
  captions = read_captions(captions_file)
  if not captions:
    raise ValueError(f"--captions {captions_file!r} holds no caption (only blank lines)")
  return embedder.texts(captions).astype(np.float32), captions


def index_format(path):
  """The suffix of index file PATH (".safetensors" or ".npz"); ValueError for any other."""
  suffix = epath.Path(path).suffix
  if suffix not in FORMATS:
    raise ValueError(f"index {path}: unknown suffix {suffix!r}; use one of {', '.join(FORMATS)}")
  return suffix


def save_index(path, embeddings, items, meta):
  """Writes an index file in the format its suffix names (see `index_format`).

  Args:
    path: the file to write.
    embeddings: [n, E], stored as float32.
    items: n str, the image paths or captions.
    meta: JSON-serialisable dict (kind, embed_dim, `Embedder.source`).

  Raises:
    ValueError on an unknown suffix or when embeddings are not [len(items), E].
  """
  suffix = index_format(path)
  embeddings = np.ascontiguousarray(embeddings, np.float32)
  if embeddings.ndim != 2 or embeddings.shape[0] != len(items):
    raise ValueError(f"embeddings must be [{len(items)} items, E], got {embeddings.shape}")
  if suffix == ".safetensors":
    epath.Path(path).write_bytes(safetensors_numpy.save({"embeddings": embeddings}, metadata={
        "items": json.dumps(list(items)), "meta": json.dumps(meta)}))
  else:
    with epath.Path(path).open("wb") as file:
      np.savez(file, embeddings=embeddings, items=np.array(items, dtype=str),
               meta=np.array(json.dumps(meta)))


def load_index(path):
  """Reads a `save_index` file -> (embeddings float32 [n, E], list of n items, meta dict).

  Raises:
    ValueError on an unknown suffix or a file without the index's entries.
  """
  suffix = index_format(path)
  try:
    if suffix == ".safetensors":
      data = epath.Path(path).read_bytes()
      embeddings = safetensors_numpy.load(data)["embeddings"]
      # safetensors reads the metadata from local files only (safe_open); the file starts with
      # its JSON header's length as a little-endian uint64, then the header.
      header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
      metadata = header.get("__metadata__") or {}
      return embeddings, json.loads(metadata["items"]), json.loads(metadata["meta"])
    with epath.Path(path).open("rb") as file, np.load(file, allow_pickle=False) as index:
      return index["embeddings"], index["items"].tolist(), json.loads(index["meta"].item())
  except KeyError as error:
    raise ValueError(f"index {path} is no cots_jax.search index (it lacks {error})") from error


def check_query_kind(meta, text=None, image=None):
  """ValueError unless exactly one of text / image is given and it fits the index's kind: a
  caption searches an image index, an image searches a text index."""
  if (text is None) == (image is None):
    raise ValueError("give exactly one of --text and --image")
  wanted, flag, other = ("image", "--text", "--image") if image is None else (
      "text", "--image", "--text")
  if meta["kind"] != wanted:
    raise ValueError(f"{flag} needs an index of kind {wanted!r} but this one is "
                     f"{meta['kind']!r} (query it with {other})")


def check_embed_dim(meta, embedder):
  """ValueError unless the index of `meta` and the `Embedder` have embeddings of one width."""
  if meta.get("embed_dim", embedder.embed_dim) != embedder.embed_dim:
    raise ValueError(f"the index holds {meta['embed_dim']}-dim embeddings, the model "
                     f"{embedder.source} embeds in {embedder.embed_dim} dims: query it with the "
                     "index's own model")


def embed_query(embedder, text=None, image=None):
  """The unit embedding [E] of one caption or of one image file (exactly one of the two), by
  an `Embedder`.

  Raises:
    BadExampleError when the image does not decode; OSError when it cannot be read.
  """
  if image is not None:
    pixels = embedder.pixels(epath.Path(image).read_bytes(), str(image))
    return embedder.images(pixels[None])[0]
  return embedder.texts([text])[0]


def search(embeddings, items, query, k=5, backend="exact"):
  """The k items whose embeddings have the highest dot product with `query`.

  Args:
    embeddings: [n, E] of the index.
    items: the n items.
    query: [E] (or [1, E]) query embedding.
    k: how many hits (at most n are returned).
    backend: "exact" (retrieval.top_k_chunked) or "faiss" (faiss.IndexFlatIP, exact too).

  Returns:
    list of min(k, n) (item, score float), best first.

  Raises:
    ValueError on a bad k or backend or a query of another width; ImportError when faiss is
    asked for but not installed.
  """
  query = np.asarray(query, np.float32).reshape(1, -1)
  if query.shape[1] != embeddings.shape[1]:
    raise ValueError(f"the query embedding has {query.shape[1]} dims, the index "
                     f"{embeddings.shape[1]}: embed it with the index's model")
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be a positive int, got {k!r}")
  if backend == "exact":
    scores, indices = retrieval.top_k_chunked(query, embeddings, k)
  elif backend == "faiss":
    scores, indices = _faiss_top_k(query, embeddings, min(k, embeddings.shape[0]))
  else:
    raise ValueError(f"backend {backend!r} is unknown; use exact or faiss")
  return [(items[index], float(score)) for index, score in zip(indices[0], scores[0])]


def _faiss_top_k(query, embeddings, k):
  """(scores [1, k], indices [1, k]) of the exact inner-product top k, computed by FAISS."""
  try:
    import faiss  # an optional extra, imported only when asked for
  except ImportError as error:
    raise ImportError("--backend=faiss needs faiss: pip install 'cots_jax[faiss]'") from error
  index = faiss.IndexFlatIP(embeddings.shape[1])
  index.add(np.ascontiguousarray(embeddings, np.float32))
  return index.search(query, k)


def format_hits(hits, kind, as_json=False):
  """Query results as text: one "score<TAB>item" line per hit, or (as_json) a JSON list of
  {"path" | "caption": item, "score": score} for an image | text index."""
  if as_json:
    return json.dumps([{ITEM_KEYS[kind]: item, "score": score} for item, score in hits])
  return "\n".join(f"{score:.4f}\t{item}" for item, score in hits)


def _load_embedder(export_dir=None, workdir=None, step=None, encoder="online"):
  """The `Embedder` of the export EXPORT_DIR, else of checkpoint `step` (None = the latest) of
  the run in WORKDIR.

  Raises:
    ValueError when neither is given (an index whose meta names no model).
  """
  if export_dir is None and workdir is None:
    raise ValueError("the index names no model: give --workdir or --export")
  if export_dir is not None:
    return export_embedder(export.load(os.path.expanduser(export_dir)), export_dir)
  workdir = os.path.expanduser(workdir)
  return run_embedder(inference.TrainedRun.load(workdir, step=step), workdir, encoder)


def _check_no_step_with_export(export_dir):
  """ValueError when --step or --encoder comes with an export, EXPORT_DIR (None: a run)."""
  if export_dir is not None and (FLAGS["step"].present or FLAGS["encoder"].present):
    raise ValueError("--step and --encoder pick a run's checkpoint and encoder; an export holds "
                     "one (pick them when exporting)")


def _index():
  """The `index` command: embeds --images or --captions with the model and writes --out."""
  index_format(_OUT.value)  # a bad suffix fails before the model loads
  _check_no_step_with_export(_EXPORT.value)
  embedder = _load_embedder(_EXPORT.value, _WORKDIR.value, _STEP.value, _ENCODER.value)
  if _IMAGES.value is not None:
    embeddings, items, skipped = build_image_index(embedder, _IMAGES.value)
    kind, summary = "image", f"indexed {len(items)} images, skipped {len(skipped)}"
  else:
    embeddings, items = build_text_index(embedder, _CAPTIONS.value)
    kind, summary = "text", f"indexed {len(items)} captions"
  meta = {"kind": kind, **embedder.source, "embed_dim": int(embeddings.shape[1])}
  save_index(_OUT.value, embeddings, items, meta)
  print(f"{summary}: {_OUT.value}")


def _query_embedder(meta):
  """The `Embedder` of the queries of the index of `meta`: --workdir or --export, else the
  index's own model; a run's step and encoder are --step and --encoder (serve), else the
  index's.

  Raises:
    ValueError when its embeddings are not as wide as the index's, or for --step or --encoder
    with an export.
  """
  given = _WORKDIR.value is not None or _EXPORT.value is not None
  source = {"export": _EXPORT.value, "workdir": _WORKDIR.value} if given else meta
  _check_no_step_with_export(source.get("export"))
  step = _STEP.value if FLAGS["step"].present else meta.get("step")
  encoder = _ENCODER.value if FLAGS["encoder"].present else meta.get("encoder", "online")
  embedder = _load_embedder(source.get("export"), source.get("workdir"), step, encoder)
  check_embed_dim(meta, embedder)
  return embedder


def _query():
  """The `query` command: prints the top k of the index for --text or --image, embedded with
  --workdir or --export, else with the index's own model (the step and encoder of its run)."""
  embeddings, items, meta = load_index(_INDEX.value)
  check_query_kind(meta, _TEXT.value, _IMAGE.value)
  embedder = _query_embedder(meta)
  query = embed_query(embedder, text=_TEXT.value, image=_IMAGE.value)
  hits = search(embeddings, items, query, _K.value, _BACKEND.value)
  print(format_hits(hits, meta["kind"], as_json=_JSON.value))


def _serve():
  """The `serve` command: the search page and JSON API of --index on --host:--port
  (cots_jax.serve), its queries embedded as `_query_embedder` says."""
  # Imported here: cots_jax.serve imports this module, and only serve needs the web server.
  from cots_jax import serve
  embeddings, items, meta = load_index(_INDEX.value)
  searcher = serve.Searcher(embeddings, items, meta, _query_embedder(meta))
  serve.serve(searcher, _HOST.value, _PORT.value)


def _check_flags(command):
  """ValueError unless every flag given belongs to `command`, it has those it needs and no two
  that exclude each other."""
  names, exactly_one, at_most_one = COMMANDS[command]
  foreign = [f"--{name}" for name in FLAGS if FLAGS[name].present and name not in names]
  if foreign:
    raise ValueError(f"{command} takes no {', '.join(foreign)}")
  for group in exactly_one:
    if sum(FLAGS[name].value is not None for name in group) != 1:
      named = " and ".join(f"--{name}" for name in group)
      raise ValueError(f"{command} needs {named}" if len(group) == 1
                       else f"give exactly one of {named}")
  for group in at_most_one:
    if sum(FLAGS[name].value is not None for name in group) > 1:
      raise ValueError(f"give at most one of {' and '.join(f'--{name}' for name in group)}")


def main(argv):
  """Runs the command argv[1] (index, query or serve) with the parsed FLAGS; exits with a
  one-line error on a bad input."""
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"give one command, index, query or serve, and flags; got {argv[1:]}")
  command = argv[1]
  try:
    _check_flags(command)
    {"index": _index, "query": _query, "serve": _serve}[command]()
  except (ValueError, OSError, ImportError) as error:
    sys.exit(f"cots_jax.search {command}: error: {error}")


if __name__ == "__main__":
  logs.run_tool("search", FLAGS, main)
