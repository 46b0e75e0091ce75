"""Image-caption source of ArrayRecord shards (`input.data.name=array_record`), with random access.

The shards hold one `cots_jax.data.records` record per image, as `python -m
cots_jax.data.convert` writes them (docs/data.md), and are read through grain's
`ArrayRecordDataSource` (random access by global index over the shards in the order given, so
the pipeline's global shuffle and per-process sharding work as for any source). Paths are local
or gs:// (array_record's reader opens both); patterns are expanded by
`shard_paths.expand_shards`.

A `manifest.json` beside the shards (the converter's, see `records`) gives every record's
caption count, so that `caption_counts()` costs nothing at any size; without one it reads every
record once.
"""

from concurrent import futures
import os

from absl import logging
from array_record.python import array_record_module
import grain
import numpy as np
import tqdm

from cots_jax.data import records
from cots_jax.data import shard_paths
from cots_jax.data import sources
from cots_jax.data.transforms import BadExampleError

# Shards opened at once to count their records (file opens are I/O bound, most on gs://).
_OPEN_THREADS = 32
# Records read per call in the caption-counting pass (grain reads each shard's in a thread).
_COUNT_CHUNK = 1024


def count_records(path):
  """The number of records of the ArrayRecord file at `path`.

  Raises:
    ValueError naming `path` when it cannot be opened or is not an ArrayRecord file.
  """
  reader = array_record_module.ArrayRecordReader(os.fspath(path))
  if reader.ok():
    count = reader.num_records()
    reader.close()
    return count
  try:  # a reader that failed reports why only when it is closed
    reader.close()
    reason = "unknown error"
  except RuntimeError as error:
    reason = str(error)
  raise ValueError(f"{path}: cannot read as an ArrayRecord file ({reason})")


def _manifest_caption_counts(paths, shard_sizes):
  """int64 [sum(shard_sizes)]: the caption count of every record from the manifests beside the
  shards, or None when a shard is not listed in one with its counts.

  Raises:
    ValueError naming the shard and the manifest when they disagree on its record count (the
    shard was replaced after the manifest was written).
  """
  manifests, counts = {}, []
  for path, size in zip(paths, shard_sizes):
    directory, name = os.path.split(os.fspath(path))
    if directory not in manifests:
      manifest = records.read_manifest(directory or ".")
      shards = manifest.get("shards", []) if isinstance(manifest, dict) else []
      manifests[directory] = {entry.get("file"): entry for entry in shards
                              if isinstance(entry, dict)}
    entry = manifests[directory].get(name)
    if entry is None or not isinstance(entry.get("caption_counts"), list):
      return None
    if entry.get("records") != size or len(entry["caption_counts"]) != size:
      manifest_path = os.path.join(directory, records.MANIFEST)
      raise ValueError(f"{path}: holds {size} records but {manifest_path} lists "
                       f"{entry.get('records')}; convert it again or remove the manifest")
    counts.append(np.asarray(entry["caption_counts"], np.int64))
  return np.concatenate(counts)


class ArrayRecordCaptions:
  """Images of a list of ArrayRecord shards of `records` records: item i is record i of the
  shards in the order given.

  The shards are opened once at construction to count their records (and to check they are
  ArrayRecord files); records are read when asked for. The object pickles without open files
  (grain's data source reopens its readers in the receiving process).
  """

  def __init__(self, paths):
    """Args:
      paths: the shards, as `shard_paths.expand_shards` takes them.

    Raises:
      ValueError naming the pattern that matches nothing, the file that is not an ArrayRecord
      file, or the shard whose record count its manifest contradicts.
    """
    self.paths = shard_paths.expand_shards(paths)
    with futures.ThreadPoolExecutor(min(_OPEN_THREADS, len(self.paths))) as pool:
      shard_sizes = list(pool.map(count_records, self.paths))
    self._ends = np.cumsum(shard_sizes)  # record index one past each shard's last
    # "path[start:end]" tells grain the count, so it does not open every shard again.
    self._records = grain.sources.ArrayRecordDataSource(
        [f"{path}[0:{size}]" for path, size in zip(self.paths, shard_sizes)])
    self._caption_counts = _manifest_caption_counts(self.paths, shard_sizes)

  def __len__(self):
    return len(self._records)

  def _where(self, index):
    """"shard path[position in the shard]" of record `index`."""
    shard = int(np.searchsorted(self._ends, index, side="right"))
    start = int(self._ends[shard - 1]) if shard else 0
    return f"{self.paths[shard]}[{index - start}]"

  def _record(self, index):
    """The decoded record `index`; BadExampleError naming shard and position when it is not a
    record."""
    sources.check_index(index, len(self))
    where = self._where(index)
    try:
      return records.decode_record(self._records[int(index)], where)
    except ValueError as error:
      raise BadExampleError(where, str(error).removeprefix(f"{where}: ")) from error

  def captions(self, index):
    """The captions of image `index` (reads its record; the image is not decoded)."""
    return self._record(index)["captions"]

  def caption_counts(self):
    """int64 [len(self)]: the number of captions of each image, from the manifests beside the
    shards; without them from one pass over every record (logged, with a progress bar), kept for
    later calls and pickled copies."""
    if self._caption_counts is None:
      logging.info("no manifest with caption counts beside the %d shards: reading every record "
                   "once to count captions", len(self.paths))
      counts = []
      with tqdm.tqdm(total=len(self), desc="counting captions", unit="record",
                     dynamic_ncols=True) as progress:
        for start in range(0, len(self), _COUNT_CHUNK):
          keys = range(start, min(start + _COUNT_CHUNK, len(self)))
          counts += [len(records.decode_record(data, self._where(key))["captions"])
                     for key, data in zip(keys, self._records.__getitems__(keys))]
          progress.update(len(keys))
      self._caption_counts = np.array(counts, np.int64)
    return self._caption_counts.copy()

  def __getitem__(self, index):
    """{"image": the encoded image bytes as stored, "name": "shard[position] (key)", "captions",
    "image_id": the record's id}.

    Raises:
      BadExampleError naming shard and position when the record does not decode.
    """
    record = self._record(index)
    return {"image": record["image"], "name": f"{self._where(index)} ({record['key']})",
            "captions": record["captions"], "image_id": record["id"]}
