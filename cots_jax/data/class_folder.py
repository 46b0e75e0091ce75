"""A labelled image folder for zero-shot classification (cots_jax/zeroshot.py): one sub-folder
per class, holding that class's image files.

  FOLDER/red_panda/0001.jpg   -> class "red panda"
  FOLDER/tabby_cat/x.png      -> class "tabby cat"

Only one level is read: the files directly inside a class folder (folders nested deeper, files
directly in FOLDER and names starting with "." are ignored). Classes are the class folders in
sorted order; a class's name is its folder's name with underscores as spaces, or the value a
classnames file gives it: a JSON object {folder name: class name} naming every class folder,
no other, and no class name twice. Every file is tried as an image; one that does not decode is
skipped and counted (`input.on_bad_example` "fail": it stops the run), as in the eval split.
Local folders only.
"""

import dataclasses
import json
import pathlib

import numpy as np

from cots_jax.data import pipeline
from cots_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class ClassFolder:
  """The listing of a class folder.

  Attributes:
    root: the folder, absolute.
    folders: the C class folder names, sorted.
    classnames: the C class names, in the order of `folders`.
    files: the N image files (absolute path str), class by class, sorted within a class.
    labels: int64 [N], the class index of each file.
  """
  root: str
  folders: tuple
  classnames: tuple
  files: tuple
  labels: np.ndarray


def read_class_folder(root, classnames_file=None):
  """Lists FOLDER's classes and files (the layout of the module docstring).

  Args:
    root: the folder of class folders.
    classnames_file: None, or a JSON file {folder name: class name}.

  Raises:
    NotADirectoryError when ROOT is no folder; ValueError when it has no class folder, a class
    folder holds no file (naming it), or the classnames file does not fit (`read_classnames`).
  """
  path = pathlib.Path(root).expanduser().absolute()
  if not path.is_dir():
    raise NotADirectoryError(f"zero-shot folder {root!r} is not a folder")
  folders = tuple(sorted(child.name for child in path.iterdir()
                         if child.is_dir() and not child.name.startswith(".")))
  if not folders:
    raise ValueError(f"zero-shot folder {root!r} has no class folder (one sub-folder per class)")
  files, labels, empty = [], [], []
  for label, folder in enumerate(folders):
    in_class = sorted(str(child) for child in (path / folder).iterdir()
                      if child.is_file() and not child.name.startswith("."))
    if not in_class:
      empty.append(folder)
    files += in_class
    labels += [label] * len(in_class)
  if empty:
    raise ValueError(f"zero-shot folder {root!r}: class folder(s) {empty} hold no file")
  classnames = (read_classnames(classnames_file, folders) if classnames_file
                else tuple(folder.replace("_", " ") for folder in folders))
  return ClassFolder(str(path), folders, classnames, tuple(files), np.asarray(labels, np.int64))


def read_classnames(path, folders):
  """The class names that the JSON file PATH ({folder name: class name}) gives `folders`.

  Raises:
    ValueError when the file is no such JSON object, names a folder that is not there or leaves
    one out (naming them), or gives a class name that is empty or taken twice.
  """
  try:
    names = json.loads(pathlib.Path(path).expanduser().read_text(encoding="utf-8"))
  except json.JSONDecodeError as error:
    raise ValueError(f"classnames file {path!r} is not JSON: {error}") from error
  if not isinstance(names, dict) or not all(isinstance(v, str) and v.strip()
                                            for v in names.values()):
    raise ValueError(f"classnames file {path!r} must hold a JSON object "
                     "{folder name: non-empty class name}")
  unknown, missing = sorted(set(names) - set(folders)), sorted(set(folders) - set(names))
  if unknown or missing:
    raise ValueError(f"classnames file {path!r} does not fit the class folders: "
                     f"names no folder {unknown}, misses the folder(s) {missing}")
  classnames = tuple(names[folder].strip() for folder in folders)
  repeated = sorted({name for name in classnames if classnames.count(name) > 1})
  if repeated:
    raise ValueError(f"classnames file {path!r} gives two folders the class name(s) {repeated}")
  return classnames


def pixel_batches(listing, transform, batch_size, bad_examples, on_bad_example="skip"):
  """Yields (uint8 [b, S, S, 3], int64 labels [b]) of the listing's files that decode, in
  listing order, b = batch_size but in the last batch.

  Args:
    listing: a `ClassFolder`.
    transform: a transforms.ImageTransform (the model's eval resize + centre crop).
    batch_size: images per batch.
    bad_examples: a pipeline.BadExampleLog; each file that does not decode is added to it.
    on_bad_example: "skip", or "fail": raise the file's BadExampleError.
  """
  pixels, labels = [], []
  for path, label in zip(listing.files, listing.labels):
    try:
      pixels.append(transform.pixels(pathlib.Path(path).read_bytes(), path))
      labels.append(label)
    except transforms.BadExampleError as error:
      bad_examples.add(pipeline.bad_example(error, on_bad_example)["bad_example"])
    if len(pixels) == batch_size:
      yield np.stack(pixels), np.asarray(labels, np.int64)
      pixels, labels = [], []
  if pixels:
    yield np.stack(pixels), np.asarray(labels, np.int64)
