"""A trained run's towers as serialized StableHLO: embeddings without the model code or Orbax.

  python -m cots_jax.export --workdir=RUN [--step=N] [--encoder=online|momentum] --out=DIR

writes to DIR (a new or empty folder, local or gs://):
  image_encoder.stablehlo  uint8 pixels [b, S, S, 3] -> float32 unit embeddings [b, E]
  text_encoder.stablehlo   int32 ids, mask [b, L] -> float32 unit embeddings [b, E]
  tokenizer/               the run's tokenizer (transformers `save_pretrained`)
  manifest.json            format, versions, source run, shapes, preprocessing and the config
Each function is `jax.export` of the chosen encoder, its parameters baked in as constants, over
a symbolic batch size b, lowered for every platform of --platforms (default cpu, cuda and tpu,
so that an export made on one serves on the others). S is the run's model.image.image_size, L its
input.max_len; the image function maps the pixels to [-1, 1] itself (transforms.to_unit_range).

`load(DIR)` returns an `ExportedModel`: jax.export.deserialize, numpy and the tokenizer, no
model code and no Orbax (the writer imports them itself, only when it runs). manifest.json is
written last, so an export cut short has none and is refused whole. Video runs are refused.
"""

import dataclasses
import importlib.metadata
import json
import os
import pathlib
import tempfile
from typing import Any, Callable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from cots_jax import logs
from cots_jax import paths
from cots_jax.data import tokenizer as tokenizer_lib
from cots_jax.data import transforms

# The version of the directory layout and manifest that `load` reads; raise it on any change.
EXPORT_FORMAT = 1
MANIFEST_FILE = "manifest.json"
IMAGE_FILE = "image_encoder.stablehlo"
TEXT_FILE = "text_encoder.stablehlo"
TOKENIZER_DIR = "tokenizer"
PLATFORMS = ("cpu", "cuda", "tpu")
# The platform names of jax.export ("cuda", not "gpu", for NVIDIA GPUs).
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# The keys of inference.ENCODERS, which is not imported here: `load` runs without the model code.
ENCODERS = ("momentum", "online")
# Rows per call of an exported function in `ExportedModel` (each batch size compiles once).
DEFAULT_BATCH_SIZE = 256
# How a client prepares the inputs (manifest "preprocessing", beside image_size and max_len).
PREPROCESSING_RULES = {
    "resize": "resize the shorter side to image_size (bicubic, aspect kept) and take the centre "
              "image_size x image_size square, as one bicubic resampling of the image's centre "
              "square (cots_jax.data.transforms.resize_center_crop)",
    "pixels": "uint8 RGB, alpha composited on black; the image function maps x to "
              "x / 127.5 - 1, in [-1, 1]",
    "text": "the tokenizer/ folder's [CLS] ... [SEP] ids, truncated and padded (its pad "
            "token) to max_len; mask 1 on real tokens, 0 on padding",
}
MANIFEST_FIELDS = ("format", "cots_jax_version", "jax_version", "source", "platforms",
                   "embed_dim", "image", "text", "tokenizer", "preprocessing", "config")

# This tool's own flags, apart from absl's global FLAGS (like cots_jax.search's): cots_jax.search
# imports this module beside cots_jax.report, which defines --workdir, --step and --encoder there.
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "workdir of the run to export", flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)",
                             flag_values=FLAGS)
_ENCODER = flags.DEFINE_enum("encoder", "online", ENCODERS, "the encoder to export",
                             flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "the export folder, new or empty (local or gs://)",
                           flag_values=FLAGS)
_PLATFORMS = flags.DEFINE_list("platforms", list(PLATFORMS), "platforms to lower the functions "
                               f"for, some of {', '.join(KNOWN_PLATFORMS)}", flag_values=FLAGS)


def encoder_functions(model, params):
  """The two towers of `model` with `params` closed over (the constants of an export).

  Returns:
    (images uint8 [b, S, S, 3] -> float32 [b, E], (ids, mask int32 [b, L]) -> float32 [b, E]),
    both unit rows: the first output of `model.visual_embedding` / `model.text_embedding`.
  """
  variables = {"params": params}

  def embed_images(images):
    # The uint8 -> [-1, 1] step is part of the function: clients send 4x fewer bytes.
    pixels = transforms.to_unit_range(images)
    return model.apply(variables, pixels, method=model.visual_embedding)[0].astype(jnp.float32)

  def embed_texts(ids, mask):
    return model.apply(variables, ids, mask, method=model.text_embedding)[0].astype(jnp.float32)

  return embed_images, embed_texts


def export_functions(embed_images, embed_texts, image_size, max_len, platforms=PLATFORMS):
  """`jax.export` of the functions of `encoder_functions` over one symbolic batch size b.

  Returns:
    (the image function's jax.export.Exported for uint8 [b, image_size, image_size, 3], the text
    function's for int32 ids, mask [b, max_len]).
  """
  batch, = jax.export.symbolic_shape("b")
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)
  tokens = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)
  return (jax.export.export(jax.jit(embed_images), platforms=platforms)(images),
          jax.export.export(jax.jit(embed_texts), platforms=platforms)(tokens, tokens))


def _signature(file_name, exported, input_names):
  """The manifest entry of one exported function: its file, inputs and output, each with its
  shape (the symbolic batch as "b") and dtype."""

  def described(aval):
    return {"shape": [dim if isinstance(dim, int) else str(dim) for dim in aval.shape],
            "dtype": str(aval.dtype)}

  return {"file": file_name,
          "inputs": [{"name": name, **described(aval)}
                     for name, aval in zip(input_names, exported.in_avals)],
          "output": described(exported.out_avals[0])}


def make_manifest(image_export, text_export, config, source, tokenizer_files):
  """The manifest.json of an export, a JSON-serialisable dict.

  Args:
    image_export, text_export: the Exported functions of `export_functions`.
    config: the run's ConfigDict.
    source: {"workdir", "step", "encoder"} of the exported checkpoint.
    tokenizer_files: the file names in the tokenizer folder.
  """
  return {
      "format": EXPORT_FORMAT,
      "cots_jax_version": importlib.metadata.version("cots_jax"),
      "jax_version": jax.__version__,
      "source": source,
      "platforms": list(image_export.platforms),
      "embed_dim": int(image_export.out_avals[0].shape[1]),
      "image": _signature(IMAGE_FILE, image_export, ("images",)),
      "text": _signature(TEXT_FILE, text_export, ("ids", "mask")),
      "tokenizer": {"dir": TOKENIZER_DIR, "files": tokenizer_files},
      "preprocessing": {"image_size": config.model.image.image_size,
                        "max_len": config.input.max_len, **PREPROCESSING_RULES},
      "config": json.loads(config.to_json_best_effort()),
  }


def _check_platforms(platforms):
  """ValueError unless `platforms` names one or more of KNOWN_PLATFORMS."""
  unknown = [name for name in platforms if name not in KNOWN_PLATFORMS]
  if unknown or not platforms:
    raise ValueError(f"--platforms {','.join(platforms)!r}: give some of "
                     f"{', '.join(KNOWN_PLATFORMS)} (jax.export's names: cuda for NVIDIA GPUs)")


def _check_empty(out):
  """ValueError when the folder OUT (an epath.Path) exists and holds anything: a new export
  must not mix with the files of another."""
  if out.exists() and any(out.iterdir()):
    raise ValueError(f"--out {out} is not empty: export into a new folder")


def _write_tokenizer(tokenizer, out):
  """Saves `tokenizer` as OUT/tokenizer/ (OUT an epath.Path, local or gs://) -> its file names.

  transformers writes local folders only: it is saved to a temporary one and copied.
  """
  (out / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as staging:
    tokenizer.save_pretrained(staging)
    names = sorted(os.listdir(staging))
    for name in names:
      (out / TOKENIZER_DIR / name).write_bytes(pathlib.Path(staging, name).read_bytes())
  return names


def export_run(run, workdir, out, encoder="online", platforms=PLATFORMS):
  """Writes the export of one encoder of a trained run to OUT (module docstring).

  Args:
    run: the inference.TrainedRun of WORKDIR.
    workdir: the run's workdir, named in the manifest.
    out: the export folder (local or gs://), new or empty.
    encoder: "online" or "momentum".
    platforms: the jax.export platforms to lower for.

  Returns:
    The manifest (dict).

  Raises:
    ValueError for a video run, an encoder the run lacks, an unknown platform or an OUT that
    holds files.
  """
  # The model code is imported by the writer only: `load` runs without it.
  from cots_jax.data import registry
  from cots_jax.models import cots as cots_model
  config = run.config
  if registry.is_video(config):
    raise ValueError(f"the run's model takes video clips (input.data.name="
                     f"{config.input.data.name!r}); only image-text runs can be exported")
  params = jax.device_get(run.encoder_params(encoder))
  _check_platforms(platforms)
  out = paths.absolute(out)
  _check_empty(out)
  image_export, text_export = export_functions(
      *encoder_functions(cots_model.CotsModel.from_config(config), params),
      config.model.image.image_size, config.input.max_len, tuple(platforms))
  out.mkdir(parents=True, exist_ok=True)
  (out / IMAGE_FILE).write_bytes(image_export.serialize())
  (out / TEXT_FILE).write_bytes(text_export.serialize())
  tokenizer_files = _write_tokenizer(tokenizer_lib.load_tokenizer(config.input.tokenizer), out)
  source = {"workdir": os.fspath(paths.absolute(workdir)), "step": int(run.step),
            "encoder": encoder}
  manifest = make_manifest(image_export, text_export, config, source, tokenizer_files)
  (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
  return manifest


@dataclasses.dataclass(frozen=True)
class ExportedModel:
  """The two towers of an export, run by jax.export (no model code).

  Attributes:
    manifest: the export's manifest.json.
    image_fn: the image function, jitted: uint8 [b, S, S, 3] -> float32 [b, E].
    text_fn: the text function, jitted: int32 ids, mask [b, L] -> float32 [b, E].
    tokenizer: the export's transformers tokenizer.
    batch_size: rows per call of a function.
  """
  manifest: dict
  image_fn: Callable
  text_fn: Callable
  tokenizer: Any
  batch_size: int = DEFAULT_BATCH_SIZE

  @property
  def embed_dim(self):
    """E, the width of the embeddings."""
    return self.manifest["embed_dim"]

  @property
  def image_size(self):
    """S, the side of the pixels that `embed_images` takes."""
    return self.manifest["preprocessing"]["image_size"]

  def image_transform(self, image, name="image"):
    """Encoded bytes or a decoded array (any size, common layouts) -> uint8 [S, S, 3]: the
    shorter side resized to S and the centre square, as the run's eval transform.

    Raises:
      transforms.BadExampleError naming `name` when `image` does not decode.
    """
    return transforms.ImageTransform(self.image_size).pixels(image, name)

  def embed_images(self, images):
    """uint8 [B, S, S, 3] (from `image_transform`) -> unit embeddings float32 [B, E].

    Raises:
      ValueError for another dtype or shape, or B = 0.
    """
    images = np.asarray(images)
    side = self.image_size
    if images.dtype != np.uint8 or images.shape[1:] != (side, side, 3) or not len(images):
      raise ValueError(f"images must be uint8 [B >= 1, {side}, {side}, 3] (the pixels of "
                       f"image_transform), got {images.dtype} {list(images.shape)}")
    return self._in_batches(self.image_fn, images)

  def embed_texts(self, captions):
    """list of B str -> unit embeddings float32 [B, E] (the export's tokenizer and max_len).

    Raises:
      ValueError for an empty list or a str instead of a list.
    """
    if isinstance(captions, str):
      raise ValueError("captions must be a list of str, got one str")
    if not len(captions):
      raise ValueError("no captions to embed (an empty list)")
    ids, mask = tokenizer_lib.tokenize(self.tokenizer, captions,
                                       self.manifest["preprocessing"]["max_len"])
    return self._in_batches(self.text_fn, ids, mask)

  def _in_batches(self, function, *arrays):
    """`function` over the rows of `arrays` [B, ...], batch_size rows a call -> numpy [B, E]."""
    return np.concatenate([
        np.asarray(function(*(array[start:start + self.batch_size] for array in arrays)))
        for start in range(0, len(arrays[0]), self.batch_size)])


def _existing(path, directory):
  """PATH (an epath.Path in the export DIRECTORY), or FileNotFoundError naming it."""
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: the export in {directory} is incomplete; "
                            "export the run again")
  return path


def read_manifest(directory):
  """The manifest dict of the export in DIRECTORY (an epath.Path).

  Raises:
    FileNotFoundError when it has no manifest.json; ValueError for a manifest of another format
    or one that lacks a field.
  """
  path = directory / MANIFEST_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: {directory} is no cots_jax export (or one "
                            f"cut short: {MANIFEST_FILE} is written last)")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != EXPORT_FORMAT:
    raise ValueError(f"export format {manifest.get('format')} in {path}; this cots_jax reads "
                     f"format {EXPORT_FORMAT}: re-export the run with this version")
  missing = [field for field in MANIFEST_FIELDS if field not in manifest]
  if missing:
    raise ValueError(f"{path} lacks {', '.join(missing)}: re-export the run")
  return manifest


def _read_tokenizer(directory, manifest):
  """The tokenizer of the export in DIRECTORY, through a local copy of its files (transformers
  reads local folders only)."""
  folder = directory / manifest["tokenizer"]["dir"]
  with tempfile.TemporaryDirectory() as local:
    for name in manifest["tokenizer"]["files"]:
      pathlib.Path(local, name).write_bytes(_existing(folder / name, directory).read_bytes())
    return tokenizer_lib.load_tokenizer(local)


def load(directory, batch_size=DEFAULT_BATCH_SIZE):
  """The `ExportedModel` of the export in DIRECTORY (local or gs://).

  Args:
    directory: the folder `export_run` wrote.
    batch_size: rows per call of an exported function.

  Raises:
    FileNotFoundError naming a missing file; ValueError for a manifest of another format or one
    that lacks a field.
  """
  directory = paths.absolute(directory)
  manifest = read_manifest(directory)
  image_export, text_export = (
      jax.export.deserialize(bytearray(_existing(directory / manifest[kind]["file"],
                                                 directory).read_bytes()))
      for kind in ("image", "text"))
  return ExportedModel(manifest, jax.jit(image_export.call), jax.jit(text_export.call),
                       _read_tokenizer(directory, manifest), batch_size)


def _export():
  """The command: loads --workdir's checkpoint and writes the export of --encoder to --out."""
  # The model code and Orbax are imported by the writer only: `load` runs without them.
  from cots_jax import inference
  for name in ("workdir", "out"):
    if FLAGS[name].value is None:
      raise ValueError(f"give --{name}")
  _check_empty(paths.absolute(_OUT.value))  # before the run loads
  workdir = os.path.expanduser(_WORKDIR.value)
  run = inference.TrainedRun.load(workdir, step=_STEP.value)
  manifest = export_run(run, workdir, _OUT.value, _ENCODER.value, _PLATFORMS.value)
  print(f"exported the {_ENCODER.value} encoder of step {manifest['source']['step']} of "
        f"{workdir} ({manifest['embed_dim']}-dim embeddings, for "
        f"{', '.join(manifest['platforms'])}): {_OUT.value}")


# Runs the export with the parsed FLAGS; exits with a one-line error on a bad input.
main = logs.tool_main("export", _export)


if __name__ == "__main__":
  logs.run_tool("export", FLAGS, main)
