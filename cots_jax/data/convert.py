"""Converts an image-caption dataset into ArrayRecord shards of `records` records, for the
`array_record` source (docs/data.md).

  python -m cots_jax.data.convert --from=captions_json --annotations=A.json --images_dir=DIR \\
      --splits=train --to=array_record --out_dir=OUT [--shard_size=10000] [--workers=N] \\
      [--resize=SIDE] [--on_bad_example=skip|fail]
  python -m cots_jax.data.convert --from=webdataset --shards='dl/{00000..00099}.tar' \\
      --to=array_record --out_dir=OUT

A captions json is cut into shards of --shard_size images in file order, named
SPLITS-NNNNN.array_record, its images' ids their positions in the json (as the captions_json
source numbers them); a webdataset (img2dataset) tar becomes one shard of the same name, read by
`cots_jax.data.webdataset.iter_examples`, its ids those the webdataset source gives
(`webdataset.image_id`: a hash of folder/shard and key). Worker processes (--workers) write one
shard each, to NAME.tmp renamed when complete, so a shard that exists is whole.
OUT/manifest.json (`records` describes it) lists the finished shards and the totals, and is
rewritten as shards finish; a re-run with the same settings skips the shards it lists whose file
is there with the listed size, and writes the rest.

Images are stored as read, bit-exact, after a header check (PIL identifies the format and the
size, which catches files that are no image and decompression bombs; damage further in shows
when training decodes it). With --resize=SIDE an image whose shorter side is longer is decoded,
resized to SIDE on that side and re-encoded as JPEG quality 95; the others stay as read. An
unreadable image fails the run (--on_bad_example=fail) or is left out, named in a warning and
counted in the manifest (skip).
"""

import dataclasses
from concurrent import futures
import hashlib
import io
import json
import multiprocessing
import os
import struct
import time

from absl import flags
from absl import logging
from array_record.python import array_record_module
from PIL import Image
import tqdm

from cots_jax import paths
from cots_jax.data import records
from cots_jax.data import shard_paths
from cots_jax.data import sources
from cots_jax.data import transforms
from cots_jax.data.transforms import BadExampleError

FLAGS = flags.FlagValues()
_FROM = flags.DEFINE_enum("from", None, ["captions_json", "webdataset"], "input format",
                          flag_values=FLAGS)
_TO = flags.DEFINE_enum("to", "array_record", ["array_record"], "output format",
                        flag_values=FLAGS)
_ANNOTATIONS = flags.DEFINE_string("annotations", None, "captions_json: the Karpathy-style json",
                                   flag_values=FLAGS)
_IMAGES_DIR = flags.DEFINE_string("images_dir", None, "captions_json: the image folder",
                                  flag_values=FLAGS)
_SPLITS = flags.DEFINE_list("splits", ["train"], "captions_json: the splits to convert, e.g. "
                            "train,restval", flag_values=FLAGS)
_SHARDS = flags.DEFINE_string("shards", None, "webdataset: the tar files, comma-separated paths, "
                              "glob or brace patterns, local or gs://", flag_values=FLAGS)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "local folder of the shards and manifest.json",
                               flag_values=FLAGS)
# img2dataset's number of images per tar.
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 10_000, "captions_json: images per shard",
                                   lower_bound=1, flag_values=FLAGS)
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count(), "worker processes", lower_bound=1,
                                flag_values=FLAGS)
_RESIZE = flags.DEFINE_integer("resize", 0, "store images resized to this shorter side, as JPEG "
                               "(0: as read)", lower_bound=0, flag_values=FLAGS)
_ON_BAD_EXAMPLE = flags.DEFINE_enum("on_bad_example", "skip", ["skip", "fail"],
                                    "an unreadable image: leave it out (counted) or stop",
                                    flag_values=FLAGS)

FORMAT = "cots_jax.data.records/1 (msgpack)"
JPEG_QUALITY = 95
# Skipped examples named in warnings per run; the rest are only counted.
WARN_FIRST = 10
# The manifest is rewritten at most this often while shards finish (it lists every record's
# caption count: rewriting it per shard would cost quadratic time on millions of records).
MANIFEST_EVERY_S = 30.0
SUFFIX = ".array_record"
# What PIL raises on a damaged header (as transforms' decoding catches it); UnidentifiedImageError
# is an OSError.
_HEADER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)


@dataclasses.dataclass(frozen=True)
class Task:
  """One output shard.

  Attributes:
    file: its file name in the output folder.
    part: what goes in it: a range of the captions json source's images, or the path of a
      webdataset tar.
  """
  file: str
  part: range | str


@dataclasses.dataclass(frozen=True)
class Example:
  """One image with its captions, as read. `name` (file path, or tar:key) labels errors; the
  other fields are the record's (`records.encode_record`)."""
  name: str
  key: str
  image: bytes
  ext: str
  captions: list
  image_id: int


def _extension(path):
  """"jpg" of "a/b.JPG" ("" without one)."""
  return os.path.splitext(path)[1].lstrip(".").lower()


def captions_json_tasks(source, shard_size):
  """The Tasks of a `sources.CaptionsJson`: shards of `shard_size` images in order, named after
  its splits ("train-00000.array_record")."""
  prefix = "_".join(source.splits)
  return [Task(f"{prefix}-{i:05d}{SUFFIX}", range(start, min(start + shard_size, len(source))))
          for i, start in enumerate(range(0, len(source), shard_size))]


def webdataset_tasks(tars):
  """One Task per tar path, its shard named after it ("00003.tar" -> "00003.array_record",
  also from .tar.gz).

  Raises:
    ValueError naming two tars of the same name (their shards would collide).
  """
  tasks, seen = [], {}
  for tar in tars:
    name = os.path.basename(tar).removesuffix(".gz").removesuffix(".tar")
    if name in seen:
      raise ValueError(f"{tar} and {seen[name]} would both become {name}{SUFFIX}")
    seen[name] = tar
    tasks.append(Task(name + SUFFIX, tar))
  return tasks


# The captions json source of this worker process (`_init_worker`).
_source = None


def _init_worker(source):
  """Keeps `source` (a CaptionsJson, or None for tars) for the tasks of this process."""
  global _source
  _source = source


def _captions_json_example(index):
  """Example of image `index` of this process's source; BadExampleError when it is unreadable."""
  item = _source[index]
  key = os.path.relpath(item["name"], _source.images_dir)
  return Example(item["name"], key, item["image"], _extension(key), item["captions"],
                 item["image_id"])


def _webdataset_example(webdataset, example):
  """Example of an item of `webdataset.iter_examples`; its bad-example marker
  {"bad_example": "SHARD:KEY: reason"} raised as the BadExampleError it was."""
  if "bad_example" in example:
    name, _, reason = example["bad_example"].partition(": ")
    raise BadExampleError(name, reason)
  shard, key = example["shard"], example["key"]
  return Example(webdataset.example_name(shard, key), key, example["image"], example["ext"],
                 example["captions"], webdataset.image_id(shard, key))


def _loaders(part, on_bad_example):
  """Zero-argument functions, one per example of a Task's part, each returning its Example or
  raising BadExampleError. A damaged tar raises here under "fail"."""
  if isinstance(part, range):
    for index in part:
      yield lambda index=index: _captions_json_example(index)
  else:
    # Imported here: only tars need it (and it imports the pipeline).
    from cots_jax.data import webdataset  # pylint: disable=g-import-not-at-top
    for example in webdataset.iter_examples(part, on_bad_example=on_bad_example):
      yield lambda example=example: _webdataset_example(webdataset, example)


def _check_header(data, name):
  """BadExampleError(name, why) unless PIL identifies `data` as an image of a size below its
  decompression-bomb limit (reads the header only)."""
  if not data:
    raise BadExampleError(name, "empty file")
  try:
    with Image.open(io.BytesIO(data)):
      pass
  except Image.DecompressionBombError as error:
    raise BadExampleError(name, f"decompression bomb ({error})") from error
  except Image.UnidentifiedImageError as error:
    raise BadExampleError(name, "not an image (cannot identify image file)") from error
  except _HEADER_ERRORS as error:
    raise BadExampleError(name, f"damaged image header ({error})") from error


def _stored(example, resize):
  """`example` with the image to store: as read (header checked), or, with resize > 0 and a
  shorter side above `resize`, resized to it and re-encoded as JPEG."""
  if not resize:
    _check_header(example.image, example.name)
    return example
  pixels = transforms.decode_image(example.image, example.name)
  if min(pixels.shape[:2]) <= resize:
    return example
  buffer = io.BytesIO()
  Image.fromarray(transforms.resize_shorter_side(pixels, resize)).save(
      buffer, format="JPEG", quality=JPEG_QUALITY)
  return dataclasses.replace(example, image=buffer.getvalue(), ext="jpg")


def _sha256(path):
  """Hex sha256 of the file at `path`, read in 1 MB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(2**20), b""):
      digest.update(block)
  return digest.hexdigest()


def _open_writer(path):
  """An ArrayRecordWriter of `path` with group size 1 (grain's random access reads one record
  per group); OSError naming `path` when it cannot be created."""
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  if not writer.ok():
    try:
      writer.close()
    except RuntimeError as error:
      raise OSError(f"{path}: cannot write ({error})") from error
    raise OSError(f"{path}: cannot write")
  return writer


def write_shard(task, out_dir, resize, on_bad_example):
  """Writes `task`'s shard into `out_dir` (as FILE.tmp, renamed when complete).

  Returns:
    (manifest entry {"file", "records", "bytes", "sha256", "skipped", "captions",
    "caption_counts": list of int per record}, list of the skipped examples' "name: reason").

  Raises:
    BadExampleError for an unreadable image when on_bad_example is "fail" (no file is left).
  """
  path = os.path.join(out_dir, task.file)
  temporary = path + ".tmp"
  writer = _open_writer(temporary)
  caption_counts, skipped = [], []
  try:
    for load in _loaders(task.part, on_bad_example):
      try:
        example = _stored(load(), resize)
      except BadExampleError as error:
        if on_bad_example == "fail":
          raise
        skipped.append(str(error))
        continue
      writer.write(records.encode_record(example.image, example.ext, example.captions,
                                         example.image_id, example.key))
      caption_counts.append(len(example.captions))
  except BaseException:
    writer.close()
    os.remove(temporary)
    raise
  writer.close()
  entry = {"file": task.file, "records": len(caption_counts),
           "bytes": os.path.getsize(temporary), "sha256": _sha256(temporary),
           "skipped": len(skipped), "captions": sum(caption_counts),
           "caption_counts": caption_counts}
  os.replace(temporary, path)
  return entry, skipped


def _write_manifest(out_dir, settings, tasks, done):
  """Writes OUT/manifest.json (via a temporary file) listing the shards in `done` ({file: entry})
  in task order, with totals; returns it."""
  shards = [done[task.file] for task in tasks if task.file in done]
  totals = {"shards": len(shards)}
  for field in ("records", "captions", "bytes", "skipped"):
    totals[field] = sum(entry[field] for entry in shards)
  manifest = {**settings, "complete": len(shards) == len(tasks), "totals": totals,
              "shards": shards}
  temporary = os.path.join(out_dir, records.MANIFEST + ".tmp")
  with open(temporary, "w", encoding="utf-8") as f:
    json.dump(manifest, f)
  os.replace(temporary, os.path.join(out_dir, records.MANIFEST))
  return manifest


def _finished_shards(out_dir, settings):
  """{file: entry} of the shards that OUT/manifest.json lists and whose file is there with the
  listed size.

  Raises:
    ValueError naming the manifest when it was written with other settings.
  """
  manifest = records.read_manifest(out_dir)
  if manifest is None:
    return {}
  differing = sorted(key for key in settings if manifest.get(key) != settings[key])
  if differing:
    raise ValueError(f"{os.path.join(out_dir, records.MANIFEST)}: written with other "
                     f"{', '.join(differing)}; convert into another --out_dir")
  return {entry["file"]: entry for entry in manifest["shards"]
          if os.path.isfile(os.path.join(out_dir, entry["file"]))
          and os.path.getsize(os.path.join(out_dir, entry["file"])) == entry["bytes"]}


def _warn_skipped(names, already_named):
  """Names the skipped examples in warnings, up to WARN_FIRST per run; returns how many are now
  named."""
  for name in names[:max(0, WARN_FIRST - already_named)]:
    logging.warning("skipping bad example: %s", name)
  if already_named < WARN_FIRST <= already_named + len(names):
    logging.warning("further skipped examples are only counted (manifest.json)")
  return already_named + len(names)


def convert(tasks, settings, out_dir, workers, on_bad_example, source=None):
  """Writes the shards of `tasks` that `out_dir` lacks, in `workers` processes, and the manifest.

  Args:
    tasks: the Tasks of the whole dataset.
    settings: what made them ({"format", "from", "to", "source", "shard_size", "resize"}); a
      re-run resumes only an out_dir converted with the same.
    out_dir: local output folder (made).
    workers: worker processes.
    on_bad_example: "skip" | "fail", for unreadable images.
    source: the CaptionsJson that range tasks read (None for tars).

  Returns:
    The manifest (a dict, as written to OUT/manifest.json).

  Raises:
    ValueError for an out_dir converted with other settings; BadExampleError of a bad image
    under "fail" (the manifest then lists the shards finished before).
  """
  if not paths.is_local(out_dir):
    raise ValueError(f"--out_dir={out_dir}: write the shards locally, then copy them "
                     "(gsutil -m cp -r)")
  os.makedirs(out_dir, exist_ok=True)
  done = _finished_shards(out_dir, settings)
  todo = [task for task in tasks if task.file not in done]
  logging.info("%s: %d of %d shards already converted", out_dir, len(tasks) - len(todo),
               len(tasks))
  # Spawned, not forked: the parent may hold threads (jax, grain) that a fork would copy mid-lock.
  pool = futures.ProcessPoolExecutor(min(workers, max(len(todo), 1)),
                                     mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_worker, initargs=(source,))
  running = [pool.submit(write_shard, task, out_dir, settings["resize"], on_bad_example)
             for task in todo]
  named, last_write = 0, time.monotonic()
  try:
    for future in tqdm.tqdm(futures.as_completed(running), total=len(tasks),
                            initial=len(tasks) - len(todo), desc="converting", unit="shard",
                            dynamic_ncols=True):
      entry, skipped = future.result()
      done[entry["file"]] = entry
      named = _warn_skipped(skipped, named)
      if time.monotonic() - last_write > MANIFEST_EVERY_S:
        _write_manifest(out_dir, settings, tasks, done)
        last_write = time.monotonic()
  finally:
    pool.shutdown(cancel_futures=True)
    # Shards that finished beside a failure (a bad image under "fail", an interrupt) are kept.
    for future in running:
      if future.done() and not future.cancelled() and future.exception() is None:
        entry, _ = future.result()
        done.setdefault(entry["file"], entry)
    manifest = _write_manifest(out_dir, settings, tasks, done)
  return manifest


def _required(*names):
  """ValueError naming the first of the flags `names` that is not given."""
  for name in names:
    if not FLAGS[name].value:
      raise ValueError(f"give --{name}")


def _convert():
  """The command: plans the tasks of --from and converts them into --out_dir."""
  _required("from", "out_dir")
  settings = {"format": FORMAT, "from": _FROM.value, "to": _TO.value,
              "resize": _RESIZE.value or None}
  source = None
  if _FROM.value == "captions_json":
    _required("annotations", "images_dir")
    source = sources.CaptionsJson(os.fspath(paths.absolute(_ANNOTATIONS.value)),
                                  os.fspath(paths.absolute(_IMAGES_DIR.value)), _SPLITS.value)
    tasks = captions_json_tasks(source, _SHARD_SIZE.value)
    settings.update(source={"annotations": source.annotations, "images_dir": source.images_dir,
                            "splits": list(source.splits)}, shard_size=_SHARD_SIZE.value)
  else:
    _required("shards")
    tasks = webdataset_tasks(shard_paths.expand_shards(_SHARDS.value))
    settings.update(source={"shards": _SHARDS.value}, shard_size=None)
  manifest = convert(tasks, settings, _OUT_DIR.value, _WORKERS.value, _ON_BAD_EXAMPLE.value,
                     source)
  totals = manifest["totals"]
  print(f"{_OUT_DIR.value}: {totals['records']} images, {totals['captions']} captions, "
        f"{totals['shards']} shard(s) of {totals['bytes'] / 2**20:.1f} MB in all; "
        f"{totals['skipped']} skipped")


if __name__ == "__main__":
  # Imported here: it imports jax, which the worker processes (they import this module) do not
  # need, and which takes them seconds to import.
  from cots_jax import logs  # pylint: disable=g-import-not-at-top
  logs.run_tool("data.convert", FLAGS, logs.tool_main("data.convert", _convert))
