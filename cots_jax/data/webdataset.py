"""webdataset / img2dataset tar shards: shard patterns, examples of a shard, a training stream.

img2dataset writes shards `00000.tar`, `00001.tar`, ... (local or gs://) whose members come in
runs of one key: `000000012.jpg`, `000000012.txt`, `000000012.json`. Here:

  - shard lists (a list, a comma-separated string, brace patterns and globs) are expanded by
    `shard_paths.expand_shards`.
  - `iter_examples(shard)`: the examples of one shard, its tar read as a stream (`r|*`, so a
    `.tar.gz` too), consecutive members grouped by key (the member name up to the first dot of
    its base name, webdataset's rule); the image from `jpg|jpeg|png|webp`, as stored (the
    pipeline decodes it: `transforms.decode_image` refuses decompression bombs), the caption
    from `txt`, else from a field of `json`. Members of another extension are ignored and
    counted in `UNKNOWN_EXTENSIONS` (each extension named once in a warning). A key without
    image or caption, and a shard that is missing or ends early (truncated: no end-of-archive
    block), are bad examples (`transforms.BadExampleError`, "SHARD:KEY: reason").
  - `WebDatasetShards`: the endless training stream of one process, a grain IterDataset.

The stream: shard i of the expanded list goes to process i % process_count (and, inside a
process, to grain worker w of W when its position in the process's list is w mod W:
`set_slice`); every epoch reads the process's shards in an order drawn from (seed, epoch), and
shuffles in blocks of `shuffle_buffer` items: a block is read, yielded in a permutation drawn
from (seed, block number), and the next block is read one item per item yielded, so the stream
never stalls for a whole block and holds at most 2 x shuffle_buffer examples. Each example is
the dict of `iter_examples` plus "name" ("SHARD:KEY") and "image_id" (`image_id`); a bad one
is `pipeline.bad_example`'s marker (on_bad_example "skip") or raises ("fail").

Why blocks and not webdataset's sample-replacing buffer: grain asks an iterator for its state
after every element (its prefetch threads and worker processes deep-copy it), so the state
must be a few ints. A block's content is fixed by where it started, so the state is the reader
position at the start of the current block (epoch, position in the epoch's shard order, items
read of that shard) plus the block number and the items of it already yielded; set_state
re-reads that block (and the items read ahead of it) from the shards. That costs reading the
shard of the block start from its first member (a tar stream cannot seek) and about two blocks.

Resume, exact and approximate:
  - Same shard list, process_count and worker count: exact (the same items in the same order,
    bad markers included), across epochs.
  - Another process_count (or worker count, or shard list): shard assignment changes with
    process_count (shard i goes to process i % M now), so a position in one process's shard
    order means nothing to the new layout. set_state then starts the saved epoch again from its
    first shard under the new assignment, with a warning: no example of that epoch is skipped,
    but those the old processes had already yielded in it (up to one epoch) are seen again, and
    processes whose saved epochs differ (uneven shard counts) each restart their own.
Processes with more shards than others run through their epochs more slowly; every process
yields one example per example of the others, so epochs drift apart, never the batch count.
"""

import collections
import hashlib
import itertools
import json
import os
import tarfile
import zlib

from absl import logging
from etils import epath
import grain
import numpy as np

from cots_jax import paths
from cots_jax.data import pipeline
from cots_jax.data import shard_paths
from cots_jax.data.transforms import BadExampleError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
# Tar members of any other extension seen by this process, {extension: count}; "" for none.
UNKNOWN_EXTENSIONS = collections.Counter()
# image_id: this many low bits of a hash, so ids fit the pipeline's int32 (see `image_id`).
IMAGE_ID_BITS = 31
# What reading a tar stream raises when it is cut short or damaged.
_STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


# -------------------------------------------------------------------- examples of one shard


class _EndMarkingTarInfo(tarfile.TarInfo):
  """Marks its TarFile (`end_of_archive`) when the end-of-archive block is read. In stream mode
  tarfile stops the same way, silently, at a header cut short; this mark tells them apart."""

  @classmethod
  def fromtarfile(cls, tar):
    try:
      return super().fromtarfile(tar)
    except tarfile.EOFHeaderError:
      tar.end_of_archive = True
      raise


def _open_shard(shard):
  """A binary file object of `shard`. BadExampleError when a local one is missing or
  unreadable, or a remote one missing; ValueError (credentials, network) for other remote
  errors, which are no property of the data."""
  try:
    return epath.Path(shard).open("rb")
  except FileNotFoundError:
    raise BadExampleError(shard, "no such shard") from None
  except Exception as error:  # pylint: disable=broad-except  (stores raise their own types)
    if not paths.is_local(shard):
      raise shard_paths.remote_error(shard, error) from error
    if isinstance(error, OSError):
      raise BadExampleError(shard, f"unreadable shard ({shard_paths.one_line(error)})") from error
    raise


def _split_name(name):
  """Tar member name -> (key, lower-case extension): "d/000012.seg.png" -> ("d/000012",
  "seg.png"), the extension starting at the first dot of the base name ("" when none)."""
  folder, base = os.path.split(name)
  stem, _, extension = base.partition(".")
  return os.path.join(folder, stem), extension.lower()


def _note_unknown(shard, name, extension):
  """Counts a member of an unknown extension; warns the first time the extension is seen."""
  UNKNOWN_EXTENSIONS[extension] += 1
  if UNKNOWN_EXTENSIONS[extension] == 1:
    logging.warning("%s: ignoring tar members with extension %r (the first: %s); they are "
                    "counted in webdataset.UNKNOWN_EXTENSIONS", shard, extension, name)


def _files(tar):
  """The regular-file members of a stream-mode TarFile; tarfile.ReadError when the archive
  ends without its end-of-archive block (truncated)."""
  while True:
    info = tar.next()
    if info is None:
      break
    tar.members.clear()  # stream mode keeps every member's header otherwise
    if info.isfile():
      yield info
  if not getattr(tar, "end_of_archive", False):
    raise tarfile.ReadError("it ends without the end-of-archive block")


def _member_groups(shard):
  """Yields (key, {extension: bytes}) for each run of consecutive members of one key in the
  tar at `shard`, only image and caption members read. BadExampleError(shard, ...) when the
  shard cannot be opened or is truncated or corrupt (after the runs before the damage)."""
  key, members, done = None, {}, 0
  with _open_shard(shard) as stream:
    try:
      tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndMarkingTarInfo)
      for info in _files(tar):
        member_key, extension = _split_name(info.name)
        if member_key != key and members:
          yield key, members
          members, done = {}, done + 1
        key = member_key
        if extension in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS:
          members.setdefault(extension, tar.extractfile(info).read())
        else:
          _note_unknown(shard, info.name, extension)
    except _STREAM_ERRORS as error:
      raise BadExampleError(shard, f"truncated or corrupt shard after {done} examples "
                            f"({type(error).__name__}: {shard_paths.one_line(error)})") from error
  if members:
    yield key, members


def _captions(members, caption_field, name):
  """The captions of one key: its `txt`, else `json`[caption_field] (a string or a list of
  them); BadExampleError(name, ...) when there is none or a caption is blank."""
  if "txt" in members:
    try:
      captions = [members["txt"].decode("utf-8")]
    except UnicodeDecodeError as error:
      raise BadExampleError(name, f"txt caption is not UTF-8 ({error})") from None
  elif "json" in members:
    try:
      value = json.loads(members["json"]).get(caption_field)
    except (ValueError, AttributeError) as error:
      raise BadExampleError(name, f"json is not a JSON object ({shard_paths.one_line(error)})") from None
    captions = [value] if isinstance(value, str) else value
    if not (isinstance(captions, list) and captions
            and all(isinstance(c, str) for c in captions)):
      raise BadExampleError(name, f"json has no string caption in {caption_field!r}")
  else:
    raise BadExampleError(name, f"no caption (txt, or {caption_field!r} of a json)")
  if not all(caption.strip() for caption in captions):
    raise BadExampleError(name, "empty caption")
  return captions


def example_name(shard, key):
  """How messages name an example of a shard: "SHARD:KEY"."""
  return f"{shard}:{key}"


def _example(shard, key, members, caption_field):
  """One key's members -> the dict of `iter_examples`; BadExampleError without an image."""
  name = example_name(shard, key)
  extension = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
  if extension is None:
    raise BadExampleError(name, f"no image ({'|'.join(IMAGE_EXTENSIONS)})")
  return {"key": key, "image": members[extension], "ext": extension,
          "captions": _captions(members, caption_field, name), "shard": shard}


def iter_examples(shard_path, caption_field="caption", on_bad_example="fail"):
  """The examples of one tar shard (local or remote), in member order.

  Yields:
    {"key": str, "image": bytes as stored (not decoded), "ext": the image's extension,
    "captions": [str, ...] (one from txt; a json field may hold several), "shard": the path}
    per key. A bad key (no image, no caption, a blank or undecodable caption) and a shard that
    is missing, truncated or corrupt (after what could be read of it) raise BadExampleError
    naming shard and key with on_bad_example="fail"; with "skip" they are yielded as
    `pipeline.bad_example` markers {"bad_example": message}, in place.
  Raises:
    ValueError when a remote shard cannot be read for want of credentials or network.
  """
  shard = os.fspath(shard_path)
  groups = _member_groups(shard)
  while True:
    try:
      key, members = next(groups)
    except StopIteration:
      return
    except BadExampleError as error:  # the shard itself: nothing more to read from it
      yield pipeline.bad_example(error, on_bad_example)
      return
    try:
      yield _example(shard, key, members, caption_field)
    except BadExampleError as error:
      yield pipeline.bad_example(error, on_bad_example)


# --------------------------------------------------------------------------- training stream


def _tail(shard):
  """The last two components of a shard path, "FOLDER/SHARD": the same wherever the dataset
  lies (local or gs://), and different for cc3m/00000.tar and cc12m/00000.tar."""
  return "/".join(os.fspath(shard).rstrip("/").split("/")[-2:])


def image_id(shard, key):
  """A stable id of an example: the low IMAGE_ID_BITS bits of the blake2b hash of `_tail(shard)`
  and `key`, so the id survives moving the dataset. 31 bits fit the pipeline's int32 image_id;
  10^7 images share some 23,000 ids in pairs, a negligible false positive rate for the queue's
  same-image test."""
  digest = hashlib.blake2b(f"{_tail(shard)}\0{key}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") & ((1 << IMAGE_ID_BITS) - 1)


class WebDatasetShards(grain.IterDataset):
  """The endless training stream of one process over tar shards (see the module docstring).

  Yields `iter_examples`' dicts plus "name" (str) and "image_id" (int, `image_id`), or, with
  on_bad_example="skip", `pipeline.bad_example` markers for the pipeline to drop and count.
  """

  def __init__(self, shards, *, seed=0, shuffle_buffer=1000, process_index=0, process_count=1,
               caption_field="caption", on_bad_example="skip"):
    """Args:
      shards: an `expand_shards` spec.
      seed: int >= 0; draws the shard order of every epoch and every block's permutation.
      shuffle_buffer: examples per shuffled block (1: no shuffle within the shard order).
      process_index, process_count: this process among those reading the shards.
      caption_field: the json field holding the caption when a key has no txt.
      on_bad_example: "skip" (markers) or "fail" (raise), as `input.on_bad_example`.
    Raises:
      ValueError (one line) when there are fewer shards than processes, or as expand_shards.
    """
    super().__init__()
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    every_shard = shard_paths.expand_shards(shards)
    if len(every_shard) < process_count:
      raise ValueError(f"{len(every_shard)} shards for {process_count} processes: every process "
                       "reads shards of its own, so write at least one shard per process")
    self.process_shards = every_shard[process_index::process_count]
    self.seed, self.block_size = seed, max(1, int(shuffle_buffer))
    self.caption_field, self.on_bad_example = caption_field, on_bad_example
    self._process = [process_index, process_count]
    self._keep(self.process_shards, slice(None))

  def _keep(self, shards, sl):
    """Reads `shards`, the slice `sl` of this process's. `layout`: [process_index,
    process_count, the slice's start, stop, step, crc32 of the shards' `_tail`s], all that an
    exact resume needs unchanged (computed once: grain asks for the state every element)."""
    self.shards = shards
    tails = "\n".join(_tail(shard) for shard in shards)
    self.layout = [*self._process, sl.start, sl.stop, sl.step, zlib.crc32(tails.encode())]

  def set_slice(self, sl, sequential_slice=False):
    """Keeps the shards `sl` of this process's (grain's worker w of W: slice(w, None, W))."""
    del sequential_slice  # whole shards either way
    shards = self.process_shards[sl]
    if not shards:
      raise ValueError(f"process {self._process[0]} has {len(self.process_shards)} shards, none "
                       f"for the worker slice {sl}: give each process at least "
                       "input.num_workers shards")
    self._keep(shards, sl)

  def seed_sequence(self, *words):
    """np.random.SeedSequence of (seed, this process and worker, `words`)."""
    return np.random.SeedSequence([self.seed, self._process[0], self.layout[2] or 0, *words])

  def shard_order(self, epoch):
    """The order (indices into self.shards) in which epoch `epoch` reads the shards."""
    return np.random.default_rng(self.seed_sequence(0, epoch)).permutation(len(self.shards))

  def __iter__(self):
    return _BlockShuffleIterator(self)


class _ShardReader:
  """The items of a stream's shards (examples with name and image_id, or bad markers), epoch
  after epoch, each in its shard order, from (epoch, position, offset): `offset` items into
  the shard at `position` of the epoch's order."""

  def __init__(self, stream, epoch, position, offset):
    self._stream = stream
    self.epoch, self.position, self.offset = epoch, position, offset
    self._order = stream.shard_order(epoch)
    self._items = None
    self._empty_in_a_row = 0

  def where(self):
    """(epoch, position, offset) of the next item."""
    return self.epoch, self.position, self.offset

  def _next_shard(self):
    """Moves to the next shard of the order, or the first of the next epoch."""
    self._empty_in_a_row = self._empty_in_a_row + 1 if self.offset == 0 else 0
    if self._empty_in_a_row >= len(self._stream.shards):
      raise ValueError(f"none of the {len(self._stream.shards)} shards of this process holds "
                       f"a tar member (the first: {self._stream.shards[0]})")
    self.position, self.offset, self._items = self.position + 1, 0, None
    if self.position == len(self._order):
      self.epoch, self.position = self.epoch + 1, 0
      self._order = self._stream.shard_order(self.epoch)

  def read(self):
    """The next item."""
    stream = self._stream
    while True:
      if self._items is None:
        shard = stream.shards[self._order[self.position]]
        self._items = itertools.islice(
            iter_examples(shard, stream.caption_field, stream.on_bad_example), self.offset, None)
      item = next(self._items, None)
      if item is not None:
        self.offset += 1
        if "bad_example" in item:
          return item
        return {**item, "name": example_name(item["shard"], item["key"]),
                "image_id": image_id(item["shard"], item["key"])}
      self._next_shard()


class _BlockShuffleIterator(grain.DatasetIterator):
  """Yields each block of `block_size` items in a permutation drawn from its number, reading
  the next block one item per item yielded. State: where the current block starts, its number
  and how many of its items were yielded (module docstring)."""

  def __init__(self, stream):
    super().__init__()
    self._stream = stream
    self._go_to((0, 0, 0), block=0, index=0)

  def _go_to(self, block_start, block, index):
    """Positions the iterator; the blocks are read on the next __next__."""
    self._block_start, self._block_number, self._index = tuple(block_start), block, index
    self._block = None

  def _permuted(self, items):
    """`items` in the permutation of the current block number."""
    rng = np.random.default_rng(self._stream.seed_sequence(1, self._block_number))
    return [items[i] for i in rng.permutation(len(items))]

  def _load(self):
    """Reads the current block and what was read ahead of it while `_index` items were
    yielded, as the uninterrupted stream had them."""
    self._reader = _ShardReader(self._stream, *self._block_start)
    self._block = self._permuted([self._reader.read() for _ in range(self._stream.block_size)])
    self._block[:self._index] = [None] * self._index  # yielded already
    self._ahead_start = self._reader.where()
    self._ahead = [self._reader.read() for _ in range(self._index)]

  def __next__(self):
    if self._block is None:
      self._load()
    if self._index == len(self._block):  # the block read ahead becomes the current one
      self._block_start, self._block_number = self._ahead_start, self._block_number + 1
      self._block, self._ahead, self._index = self._permuted(self._ahead), [], 0
      self._ahead_start = self._reader.where()
    item, self._block[self._index] = self._block[self._index], None
    self._index += 1
    self._ahead.append(self._reader.read())
    return item

  def get_state(self):
    """{"epoch", "position", "offset": where the current block starts; "block": its number;
    "index": its items yielded; "layout": the stream's `layout`}, all ints (None where the
    worker slice has none): JSON-ready."""
    epoch, position, offset = self._block_start
    return {"epoch": epoch, "position": position, "offset": offset, "block": self._block_number,
            "index": self._index, "layout": list(self._stream.layout)}

  def set_state(self, state):
    """Resumes at `state`: exactly when it has this stream's layout; else at the start of its
    epoch under this layout (module docstring), with a warning."""
    if list(state["layout"]) == self._stream.layout:
      self._go_to((state["epoch"], state["position"], state["offset"]), state["block"],
                  state["index"])
      return
    logging.warning("webdataset stream: the saved position is of another layout %s (process, "
                    "processes, worker slice, shards' crc32), this one is %s: epoch %d starts "
                    "again from its first shard", state["layout"], self._stream.layout,
                    state["epoch"])
    self._go_to((state["epoch"], 0, 0), block=0, index=0)


class ShardExamples:
  """The examples of some shards read once into memory, with random access: the eval split of a
  webdataset (a few thousand images), with `sources.CaptionsJson`'s interface. Bad examples are
  left out, named in the first warnings and counted (`num_skipped`); under on_bad_example="fail"
  the first stops it."""

  def __init__(self, shards, caption_field="caption", on_bad_example="skip"):
    """Reads every example of the `expand_shards` spec `shards`.

    Raises:
      ValueError as `expand_shards`, or when no example is left; BadExampleError under "fail".
    """
    log = pipeline.BadExampleLog("webdataset eval shards")
    self._examples = []
    for shard in shard_paths.expand_shards(shards):
      for example in iter_examples(shard, caption_field, on_bad_example):
        if "bad_example" in example:
          log.add(example["bad_example"])
        else:
          self._examples.append(example)
    self.num_skipped = log.count
    if not self._examples:
      raise ValueError(f"{shards}: no good example in these shards")

  def __len__(self):
    return len(self._examples)

  def captions(self, index):
    """The captions of example `index` (a new list)."""
    return list(self._examples[index]["captions"])

  def caption_counts(self):
    """int64 [len(self)]: the number of captions of each example."""
    return np.array([len(example["captions"]) for example in self._examples], np.int64)

  def __getitem__(self, index):
    """{"image": the bytes as stored, "name": "SHARD:KEY", "captions", "image_id"}."""
    example = self._examples[index]
    shard, key = example["shard"], example["key"]
    return {"image": example["image"], "name": example_name(shard, key),
            "captions": self.captions(index), "image_id": image_id(shard, key)}
