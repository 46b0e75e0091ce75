"""The format of converted shards: the record of one image and its captions (msgpack, no pickle),
and the manifest that `cots_jax.data.convert` writes beside the shards.

One record is a msgpack map (msgpack spec, bin type for bytes, str as UTF-8):

  {"captions": [str, ...],  the image's captions as given by the source
   "id": int,               image_id: unique over the dataset's splits, 0 <= id < 2**31
   "key": str,              where it came from, e.g. the image's path under images_dir or a tar
                            member's key
   "ext": str,              the image's encoding as a file extension, lower case: "jpg", "png"
   "image": bytes}          the encoded image, as stored at the source (or re-encoded once by
                            `cots_jax.data.convert --resize`)

Any msgpack reader in any language reads it; nothing here executes code on load.

The manifest, `manifest.json` in the shards' folder (JSON):

  {"format", "from", "to", "source", "shard_size", "resize": the conversion's settings (a re-run
   resumes only with the same), "complete": whether every shard is written,
   "totals": {"shards", "records", "captions", "bytes", "skipped"},
   "shards": [{"file": name in the folder, "records", "bytes", "sha256": of the file, "skipped":
               examples left out, "captions", "caption_counts": [int per record]}, ...]}

The ArrayRecord source reads the caption counts from it instead of from every record.
"""

from etils import epath
import msgpack
import numpy as np

from cots_jax.data import sources

MANIFEST = "manifest.json"
INT32_MAX = int(np.iinfo(np.int32).max)
# Field -> type, in the order they are written.
FIELDS = {"captions": list, "id": int, "key": str, "ext": str, "image": bytes}


def _checked_id(image_id, where):
  """int(image_id); ValueError naming `where` unless it is an int in [0, 2**31) (the queue marks
  empty slots -1 in int32)."""
  if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
    raise ValueError(f"{where}: id should be an int, got {type(image_id).__name__}")
  if not 0 <= image_id <= INT32_MAX:
    raise ValueError(f"{where}: id {image_id} is not a non-negative int32")
  return int(image_id)


def encode_record(image, ext, captions, image_id, key):
  """The record bytes of one image.

  Args:
    image: the encoded image (bytes), stored as it is.
    ext: its encoding as a lower-case file extension ("jpg", "png", ...).
    captions: sequence of str.
    image_id: int in [0, 2**31).
    key: the example's name at its source (str).

  Raises:
    ValueError naming `key` and the field whose value has another type, or an id out of range.
  """
  captions = list(captions)
  if not all(isinstance(caption, str) for caption in captions):
    raise ValueError(f"{key}: captions should all be str")
  for field, value in (("ext", ext), ("key", key)):
    if not isinstance(value, str):
      raise ValueError(f"{key}: {field} should be str, got {type(value).__name__}")
  if not isinstance(image, (bytes, bytearray, memoryview)):
    raise ValueError(f"{key}: image should be bytes, got {type(image).__name__}")
  return msgpack.packb({"captions": captions, "id": _checked_id(image_id, key), "key": key,
                        "ext": ext, "image": bytes(image)}, use_bin_type=True)


def decode_record(data, where):
  """{"captions": list of str, "id": int, "key": str, "ext": str, "image": bytes} of record bytes.

  Raises:
    ValueError naming `where` (e.g. "shard.array_record[12]") when `data` is not msgpack, not a
    map, lacks a field or holds one of another type.
  """
  try:
    record = msgpack.unpackb(data, raw=False)
  except (ValueError, TypeError) as error:  # msgpack's errors are ValueErrors
    raise ValueError(f"{where}: not a cots_jax record (msgpack: {error})") from error
  if not isinstance(record, dict):
    raise ValueError(f"{where}: not a cots_jax record (a msgpack {type(record).__name__}, not a "
                     "map)")
  for field, expected_type in FIELDS.items():
    if field not in record:
      raise ValueError(f"{where}: record has no {field!r}; it has {sorted(map(str, record))}")
    if not isinstance(record[field], expected_type):
      raise ValueError(f"{where}: record[{field!r}] should be {expected_type.__name__}, got "
                       f"{type(record[field]).__name__}")
  if not all(isinstance(caption, str) for caption in record["captions"]):
    raise ValueError(f"{where}: record['captions'] should hold str only")
  _checked_id(record["id"], where)
  return record


def read_manifest(directory):
  """The manifest (a dict) of the shards in `directory` (local or gs://), or None when it has
  none; ValueError naming the file when it is not JSON."""
  path = epath.Path(directory) / MANIFEST
  return sources.load_json(path, "shard manifest") if path.exists() else None
