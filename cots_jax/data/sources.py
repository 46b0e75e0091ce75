"""Image-caption sources: a Karpathy-style captions json with an image folder (local or gs://,
read through etils.epath like the workdir), and TFDS.

A source is random-access over images, picklable (grain worker processes receive a copy) and
knows nothing of models or tokenizers. Item i is

  {"image": bytes | uint8 [H, W, 3], "name": str, "captions": list of str, "image_id": int}

where "name" is the image's file path (or a dataset/split[index] id) for messages, and
"image_id" is unique over the whole dataset, the train and eval splits together, and fits int32
(the training queue's multi-positive targets compare ids). The captions json source returns the
file's encoded bytes undecoded (the pipeline decodes them), and reading a missing, empty or
unreadable file raises BadExampleError. The TFDS source returns the image tfds has already
decoded. Every source also has `captions(i)`, the captions of image i without its image, and
`caption_counts()`, the number of captions of every image or None where that would need a pass
over every record. `DecodedImages` wraps an image source to keep its images decoded in memory.
"""

from concurrent import futures
import json
import os
import time

from absl import logging
from etils import epath
import numpy as np
import tqdm

from cots_jax.data import transforms
from cots_jax.data.transforms import BadExampleError

def check_index(index, length):
  """IndexError unless 0 <= index < length (negative indices are not items)."""
  if not 0 <= index < length:
    raise IndexError(f"index {index} out of range [0, {length})")


def required_field(mapping, key, expected_type, where):
  """mapping[key], checked to be an `expected_type`; ValueError naming `where` and `key`."""
  if not isinstance(mapping, dict):
    raise ValueError(f"{where} should be a JSON object, got {type(mapping).__name__}")
  if key not in mapping:
    raise ValueError(f"{where} has no {key!r}")
  value = mapping[key]
  if not isinstance(value, expected_type):
    raise ValueError(f"{where}[{key!r}] should be {expected_type.__name__}, got "
                     f"{type(value).__name__}")
  return value


def load_json(path, what):
  """The parsed json file at `path`; ValueError naming `path` and `what` it is otherwise."""
  try:
    return json.loads(epath.Path(path).read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise ValueError(f"{path}: {what} not found") from None
  except (OSError, UnicodeDecodeError) as error:
    raise ValueError(f"{path}: cannot read the {what} ({error})") from error
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: {what} is not JSON ({error})") from error


def _load_images_list(path):
  """The `images` list of the annotations json at `path`; ValueError naming `path` otherwise."""
  annotations = load_json(path, "annotations file")
  if not isinstance(annotations, dict) or not isinstance(annotations.get("images"), list):
    raise ValueError(f"{path}: top-level 'images' list missing")
  return annotations["images"]


def _parse_entry(entry, where):
  """(split, relative image path, captions) of one `images[i]` entry of a Karpathy json."""
  filename = required_field(entry, "filename", str, where)
  split = required_field(entry, "split", str, where)
  # COCO's Karpathy json keeps the image's subfolder ("val2014") in `filepath`.
  subfolder = required_field(entry, "filepath", str, where) if "filepath" in entry else ""
  sentences = required_field(entry, "sentences", list, where)
  captions = [required_field(sentence, "raw", str, f"{where}.sentences[{j}]")
              for j, sentence in enumerate(sentences)]
  return split, os.path.join(subfolder, filename), captions


class CaptionsJson:
  """Images of the chosen splits of a Karpathy-style captions json (Flickr8k/30k, COCO).

  The json holds {"images": [{"filename", "split", "sentences": [{"raw"}, ...],
  optional "filepath"}]}; image i is the i-th entry, in file order, whose split is in `splits`,
  read from images_dir/[filepath/]filename. Its image_id is the entry's position in the whole
  `images` list, so the ids of different splits never collide and an image keeps its id
  whichever splits are chosen. Captions are the `raw` strings as given. The whole json is checked
  at construction; image files are only opened when read.
  """

  def __init__(self, annotations, images_dir, splits):
    """Parses `annotations`, keeping the images of `splits` (a split name or a tuple of them;
    Karpathy's "restval" is train data only where it is asked for, e.g. ("train", "restval")).

    Raises:
      ValueError naming the annotations path and the field when the file is missing, is not
      JSON or lacks a required field, and naming the splits found when `splits` selects nothing.
    """
    self.annotations = os.fspath(annotations)
    self.images_dir = os.fspath(images_dir)
    self.splits = (splits,) if isinstance(splits, str) else tuple(splits)
    self._paths, self._captions, self._ids, splits_found = [], [], [], set()
    for i, entry in enumerate(_load_images_list(self.annotations)):
      split, relative_path, captions = _parse_entry(entry, f"{self.annotations}: images[{i}]")
      splits_found.add(split)
      if split in self.splits:
        self._paths.append(os.path.join(self.images_dir, relative_path))
        self._captions.append(captions)
        self._ids.append(i)
    if not self._paths:
      raise ValueError(f"{self.annotations}: no image in splits {list(self.splits)}; "
                       f"splits found: {sorted(splits_found)}")
    self._caption_counts = np.array([len(c) for c in self._captions], np.int64)

  def __len__(self):
    return len(self._paths)

  def path(self, index):
    """File path of image `index` (not checked to exist)."""
    check_index(index, len(self))
    return self._paths[index]

  def captions(self, index):
    """The captions of image `index` (a new list), without opening the image."""
    check_index(index, len(self))
    return list(self._captions[index])

  def caption_counts(self):
    """int64 [len(self)]: the number of captions of each image."""
    return self._caption_counts.copy()

  def __getitem__(self, index):
    """{"image": the file's bytes (not decoded), "name": its path, "captions", "image_id": the
    entry's position in the annotations' `images` list}.

    Raises:
      BadExampleError(path, reason) when the file is missing, empty or unreadable.
    """
    path = self.path(index)
    return {"image": read_image_file(path), "name": path, "captions": self.captions(index),
            "image_id": self._ids[index]}


def read_image_file(path):
  """The bytes of the file at `path`; BadExampleError(path, reason) when there are none."""
  try:
    data = epath.Path(path).read_bytes()
  except FileNotFoundError:
    raise BadExampleError(path, "missing file") from None
  except OSError as e:
    raise BadExampleError(path, f"unreadable: {e}") from e
  if not data:
    raise BadExampleError(path, "empty file")
  return data


def _record_field(record, key, where):
  """record[key]; ValueError naming `where` and the keys there are otherwise."""
  if key not in record:
    raise ValueError(f"{where} has no {key!r}; it has {sorted(record)}")
  return record[key]


class TfdsCaptions:
  """Images of one split of a prepared TFDS image-caption dataset, read by `tfds.data_source`.

  The data source is opened on first use in each process (and dropped when pickled), so the
  object pickles cheaply into grain workers. Nothing is downloaded: the dataset must already be
  prepared under `data_dir`.
  """

  def __init__(self, name, split, data_dir, image_key="image", captions_key="captions",
               caption_text_key=None, first_id=0):
    """Args:
      name: registered or prepared TFDS name, e.g. "coco_captions" or "coco_captions:1.1.0".
      split: TFDS split, e.g. "train" or "val[:1000]".
      data_dir: the TFDS data dir (None: tfds's default).
      image_key: feature holding the image.
      captions_key: feature holding the captions, a Sequence of Text or of dicts.
      caption_text_key: key of the text in each caption dict (coco_captions: "text"); None when
        the captions are plain Text.
      first_id: image_id of record 0 of a dataset without `image/id` (record i: first_id + i),
        so that another split's records can be numbered after this one's.
    """
    self.name = name
    self.split = split
    self.data_dir = data_dir
    self.image_key = image_key
    self.captions_key = captions_key
    self.caption_text_key = caption_text_key
    self.first_id = first_id
    self._data_source = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_data_source"] = None  # reopened in the receiving process
    return state

  def _records(self):
    """The tfds data source, opened on first use in this process."""
    if self._data_source is None:
      # Imported here: only this source needs tfds, and importing it takes about half a second.
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      self._data_source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                           download=False)
    return self._data_source

  def _where(self, index):
    return f"{self.name}/{self.split}[{index}]"

  def _record(self, index):
    check_index(index, len(self))
    return self._records()[int(index)]

  def _caption_texts(self, record, index):
    """The record's captions as str (tfds gives Text as utf-8 bytes)."""
    where = self._where(index)
    captions = _record_field(record, self.captions_key, where)
    # tfds decodes a Sequence of dicts as a dict of sequences.
    if self.caption_text_key is not None:
      captions = _record_field(captions, self.caption_text_key, f"{where}[{self.captions_key!r}]")
    elif isinstance(captions, dict):
      raise ValueError(f"{where}[{self.captions_key!r}] holds dicts with keys {sorted(captions)}; "
                       "caption_text_key must name the text")
    return [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in captions]

  def __len__(self):
    return len(self._records())

  def captions(self, index):
    """The captions of image `index` (reads and decodes its whole record)."""
    return self._caption_texts(self._record(index), index)

  def caption_counts(self):
    """None: the counts are only known by reading every record."""
    return None

  def __getitem__(self, index):
    """{"image": uint8 [H, W, C] as decoded by tfds, "name": "name/split[index]", "captions",
    "image_id": the record's `image/id` if it has one, else first_id + index}.

    Raises:
      ValueError when the image_id is not a non-negative int32 (the queue marks empty slots -1).
    """
    record = self._record(index)
    image_id = int(record.get("image/id", self.first_id + index))
    if not 0 <= image_id <= np.iinfo(np.int32).max:
      raise ValueError(f"{self._where(index)}: image_id {image_id} is not a non-negative int32")
    return {"image": _record_field(record, self.image_key, self._where(index)),
            "name": self._where(index),
            "captions": self._caption_texts(record, index),
            "image_id": image_id}


class DecodedImages:
  """An image source whose images are decoded and downscaled once, and kept in memory
  (`input.cache_decoded`): for training sets that fit in memory, so that an epoch crops and
  flips from memory instead of decoding every file again.

  Item i is the source's item i with "image" the uint8 [h, w, 3] image decoded by
  `transforms.decode_image` and resized to the shorter side `min_side` by
  `transforms.resize_shorter_side` (smaller images are kept as decoded), plus "full_size": its
  (height, width) before the resize, so that `transforms.random_resized_crop` draws the crop the
  full image would get. An item that does not read or decode is not kept: reading it asks the
  source again, so it fails or is skipped (`input.on_bad_example`) exactly as without the cache.
  Everything is built at construction, in threads (PIL decodes and resizes without the GIL); a
  pickled copy (a grain worker's) carries the images.
  """

  def __init__(self, source, min_side, num_threads=None):
    """Reads and decodes every item of `source` (len(source) items, random access) in
    `num_threads` threads (None: ThreadPoolExecutor's default, which also covers slow reads),
    showing progress, and logs the count, the bad items and the bytes kept."""
    self.source = source
    self.min_side = int(min_side)
    start = time.perf_counter()
    with futures.ThreadPoolExecutor(num_threads) as pool:
      decoded = list(tqdm.tqdm(pool.map(self._decode, range(len(source))), total=len(source),
                               desc="decoding images once", unit="img", dynamic_ncols=True))
    self._items = decoded  # `_decode`'s tuple per item, None for a bad one
    self.num_bad = sum(entry is None for entry in decoded)
    self.nbytes = sum(entry[1].nbytes for entry in decoded if entry is not None)
    logging.info("decoded-once images: %d kept at shorter side %d px (%.1f MB), %d bad, in %.1f s",
                 len(decoded) - self.num_bad, self.min_side, self.nbytes / 2**20, self.num_bad,
                 time.perf_counter() - start)

  def _decode(self, index):
    """(item without "image", uint8 [h, w, 3] downscaled, (H, W) decoded) of item `index`, or
    None when it does not read or decode."""
    try:
      item = self.source[index]
      pixels = transforms.decode_image(item["image"], item["name"])
    except BadExampleError:
      return None
    rest = {key: value for key, value in item.items() if key != "image"}
    return rest, transforms.resize_shorter_side(pixels, self.min_side), pixels.shape[:2]

  def __len__(self):
    return len(self._items)

  def captions(self, index):
    """The source's captions of image `index`."""
    return self.source.captions(index)

  def caption_counts(self):
    """The source's caption counts (None where it cannot count them)."""
    return self.source.caption_counts()

  def __getitem__(self, index):
    """The source's item with "image" uint8 [h, w, 3] from memory and "full_size" (H, W)."""
    check_index(index, len(self))
    entry = self._items[index]
    if entry is None:
      # Read (and decoded by the caller) as without the cache, so it fails the same way.
      return self.source[index]
    rest, pixels, full_size = entry
    return {**rest, "image": pixels, "full_size": full_size}
