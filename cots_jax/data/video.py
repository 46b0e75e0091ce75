"""Video clips and video-caption sources (issue 10; design §6): numpy, PIL and PyAV, no jax.

A clip is any object with
  - `num_frames`: the number of frames it has (an int >= 1, possibly computed on first use),
  - `read(indices) -> uint8 [k, H, W, 3]`: the RGB frames at `indices` (int [k], any order,
    repeats allowed), in the order of `indices`,
both raising BadExampleError(name, reason) for a missing, unreadable, corrupt or empty video
or an index past its last frame. Clips here: `ArrayClip` (frames in memory), `VideoFile` (a
file decoded by PyAV) and `FrameFolder` (a folder of pre-extracted frame images). Clips hold
only paths and small caches, so they pickle cheaply into grain worker processes.

A video source is random-access over videos, picklable and model-free like the image sources;
item i is {"video": clip, "name": str, "captions": list of str, "image_id": the video's position
in the annotations' "videos" list (unique over train and eval)}, and it has
`captions(i)` and `caption_counts()`. `MsrVttSource` and `FramesFolderSource` read the MSR-VTT
annotations (MSRVTT_data.json) with the optional 1k-A test list (see `_select_videos`).
`transforms.sample_frame_indices` picks the frames of a clip that a model sees.
"""

import csv
import os
import re

import numpy as np

from cots_jax.data import sources
from cots_jax.data.transforms import BadExampleError, decode_image

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
# MSR-VTT's own splits that make up the training and eval videos when there is no test list.
_SPLITS_WITHOUT_TEST_LIST = {"train": ("train", "validate"), "eval": ("test",)}
_TEST_LIST_COLUMNS = ("video_id", "sentence")
# The image sources' file reading and checks, shared rather than copied.


def _wanted_indices(indices):
  """int [k] frame indices -> int64 [k]; ValueError unless a non-empty 1-D array of ints >= 0."""
  array = np.asarray(indices)
  if array.ndim != 1 or not array.size or array.dtype.kind not in "iu":
    raise ValueError(f"frame indices must be a non-empty 1-D int array, got {array.dtype} "
                     f"{array.shape}")
  if array.min() < 0:
    raise ValueError(f"frame indices must be >= 0, got {array.min()}")
  return array.astype(np.int64)


def _check_available(indices, num_available, name):
  """BadExampleError(name, ...) when an index of int64 [k] `indices` is >= num_available."""
  if indices.max() >= num_available:
    raise BadExampleError(name, f"frame {indices.max()} asked of a video with {num_available} "
                                "frames")


def _stack_in_order(frames_by_index, indices, name):
  """{frame index: uint8 [H, W, 3]} -> uint8 [k, H, W, 3] in the order of int [k] `indices`;
  BadExampleError(name, ...) when the frames differ in size."""
  shapes = {frame.shape for frame in frames_by_index.values()}
  if len(shapes) > 1:
    raise BadExampleError(name, f"frames of different sizes {sorted(shapes)}")
  return np.stack([frames_by_index[i] for i in indices.tolist()])


class ArrayClip:
  """A clip held in memory: uint8 [T, H, W, 3] frames and the name used in messages."""

  def __init__(self, frames, name):
    """Raises ValueError naming `name` when `frames` is not a uint8 [T, H, W, 3] array."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
      raise ValueError(f"{name}: clip frames must be uint8 [T, H, W, 3], got {frames.dtype} "
                       f"{frames.shape}")
    self.frames = frames
    self.name = str(name)

  @property
  def num_frames(self):
    """T; BadExampleError when the clip has no frames."""
    if not len(self.frames):
      raise BadExampleError(self.name, "no frames")
    return len(self.frames)

  def read(self, indices):
    """uint8 [k, H, W, 3]: the frames at int [k] `indices`, in that order (a copy)."""
    indices = _wanted_indices(indices)
    _check_available(indices, self.num_frames, self.name)
    return self.frames[indices]


def _pyav():
  """The PyAV module (the `video` extra), imported on first use so that image-only installs
  need no FFmpeg; ImportError naming the extra when it is missing."""
  try:
    import av  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError("reading video files needs PyAV: pip install -e '.[video]'") from error
  return av


class VideoFile:
  """A video file (any container and codec FFmpeg reads), decoded by PyAV when read.

  Frames are numbered in presentation order from 0. Reading decodes from the start of the
  stream (seeking is unreliable across codecs) and stops after the last frame asked for.
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    self._num_frames = None

  @property
  def num_frames(self):
    """Frames in the video stream: the count the container reports, else counted by decoding
    the whole stream once (cached). BadExampleError when the file cannot be read or has none."""
    if self._num_frames is None:
      self._num_frames = self._decode(self._count_frames)
    return self._num_frames

  def read(self, indices):
    """uint8 [k, H, W, 3] RGB: the frames at int [k] `indices`, in that order.

    Raises:
      BadExampleError(path, reason) when the file is missing or cannot be decoded, has no
      video stream, or ends before the largest index.
    """
    indices = _wanted_indices(indices)
    return _stack_in_order(self._decode(self._frames_up_to, indices), indices, self.path)

  def _decode(self, reader, *args):
    """reader(video stream, container, *args) with the file open; PyAV's and the file system's
    errors, and a file without a video stream, become BadExampleError(path, reason)."""
    av = _pyav()
    try:
      with av.open(self.path) as container:
        if not container.streams.video:
          raise BadExampleError(self.path, "no video stream")
        return reader(container.streams.video[0], container, *args)
    except FileNotFoundError:
      raise BadExampleError(self.path, "missing file") from None
    except (av.FFmpegError, OSError) as error:
      # strerror leaves out the path that str(error) repeats.
      reason = getattr(error, "strerror", None) or error
      raise BadExampleError(self.path, f"cannot decode video ({reason})") from error

  def _count_frames(self, stream, container):
    """The stream's frame count (reported, else decoded); BadExampleError when it is 0."""
    count = stream.frames or sum(1 for _ in container.decode(stream))
    if not count:
      raise BadExampleError(self.path, "no frames")
    return count

  def _frames_up_to(self, stream, container, indices):
    """{index: uint8 [H, W, 3]} of the frames at int64 [k] `indices`, decoded in order."""
    wanted, last = set(indices.tolist()), int(indices.max())
    frames, decoded = {}, 0
    for frame in container.decode(stream):
      if decoded in wanted:
        frames[decoded] = frame.to_ndarray(format="rgb24")
      if decoded == last:
        return frames
      decoded += 1
    raise BadExampleError(self.path, f"frame {last} asked, the video has {decoded} frames")


def _natural_key(name):
  """Sort key that orders the digit runs of `name` by value: "frame_9" before "frame_10"."""
  return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)], name


class FrameFolder:
  """A clip stored as a folder of frame images (jpg, jpeg, png), frames in natural name order
  ("frame_2.jpg" before "frame_10.jpg"); other files are ignored. The folder is listed on first
  use and the listing cached."""

  def __init__(self, path):
    self.path = os.fspath(path)
    self._frame_paths = None

  def frame_paths(self):
    """The frame files' paths in frame order (a new list).

    Raises:
      BadExampleError(path, reason) when the folder is missing, not a folder or has no frames.
    """
    if self._frame_paths is None:
      try:
        names = os.listdir(self.path)
      except FileNotFoundError:
        raise BadExampleError(self.path, "missing frames folder") from None
      except OSError as error:
        raise BadExampleError(self.path, f"unreadable frames folder ({error})") from error
      names = [n for n in names if os.path.splitext(n)[1].lower() in FRAME_EXTENSIONS]
      if not names:
        raise BadExampleError(self.path, f"no frames ({', '.join(FRAME_EXTENSIONS)}) in folder")
      self._frame_paths = [os.path.join(self.path, n) for n in sorted(names, key=_natural_key)]
    return list(self._frame_paths)

  @property
  def num_frames(self):
    """The number of frame files; BadExampleError as in `frame_paths`."""
    return len(self.frame_paths())

  def read(self, indices):
    """uint8 [k, H, W, 3] RGB: the frames at int [k] `indices`, in that order, each file read
    once. BadExampleError naming the folder, or the frame file that cannot be decoded."""
    indices = _wanted_indices(indices)
    paths = self.frame_paths()
    _check_available(indices, len(paths), self.path)
    frames = {i: decode_image(sources.read_image_file(paths[i]), paths[i])
              for i in set(indices.tolist())}
    return _stack_in_order(frames, indices, self.path)


def _parse_annotations(path):
  """MSRVTT_data.json -> (video ids in file order, {video id: split}, {video id: captions}).

  The file holds {"videos": [{"video_id", "split", ...}], "sentences": [{"video_id", "caption",
  ...}]}; captions keep the order of "sentences". ValueError naming the path and the field for
  a missing or mistyped field, a repeated video id or a sentence of an unknown video.
  """
  annotations = sources.load_json(path, "annotations file")
  video_ids, splits = [], {}
  for i, video in enumerate(sources.required_field(annotations, "videos", list, path)):
    video_id = sources.required_field(video, "video_id", str, f"{path}: videos[{i}]")
    if video_id in splits:
      raise ValueError(f"{path}: videos[{i}] repeats video_id {video_id!r}")
    splits[video_id] = sources.required_field(video, "split", str, f"{path}: videos[{i}]")
    video_ids.append(video_id)
  captions = {video_id: [] for video_id in video_ids}
  for j, sentence in enumerate(sources.required_field(annotations, "sentences", list, path)):
    where = f"{path}: sentences[{j}]"
    video_id = sources.required_field(sentence, "video_id", str, where)
    if video_id not in captions:
      raise ValueError(f"{where} names video_id {video_id!r}, which is not in 'videos'")
    captions[video_id].append(sources.required_field(sentence, "caption", str, where))
  return video_ids, splits, captions


def _read_test_list(path, known_video_ids):
  """The 1k-A test list csv (header with at least video_id and sentence, as MSR-VTT's
  key,vid_key,video_id,sentence) -> [(video id, sentence)] in file order.

  Raises:
    ValueError naming `path` when it is missing, lacks a column or rows, or a row names a video
    id not in `known_video_ids` or one already listed.
  """
  try:
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f)
      missing = [c for c in _TEST_LIST_COLUMNS if c not in (reader.fieldnames or ())]
      if missing:
        raise ValueError(f"{path}: test list header lacks column(s) {missing}; it has "
                         f"{reader.fieldnames}")
      rows = [(row["video_id"], row["sentence"]) for row in reader]
  except FileNotFoundError:
    raise ValueError(f"{path}: test list not found") from None
  except (OSError, UnicodeDecodeError, csv.Error) as error:
    raise ValueError(f"{path}: cannot read the test list ({error})") from error
  if not rows:
    raise ValueError(f"{path}: test list has no rows")
  seen = set()
  for line, (video_id, _) in enumerate(rows, start=2):
    if video_id not in known_video_ids:
      raise ValueError(f"{path}: line {line} names video_id {video_id!r}, which is not in the "
                       "annotations")
    if video_id in seen:
      raise ValueError(f"{path}: line {line} repeats video_id {video_id!r}")
    seen.add(video_id)
  return rows


def _select_videos(annotations, split_kind, test_list):
  """(video ids, captions per video, positions of the videos in the annotations' "videos" list)
  of `split_kind` ("train" | "eval") under MSR-VTT's protocols.

  With a `test_list` csv (1k-A): "eval" is its videos in csv order, each with its csv sentence
  as its only caption; "train" is every other annotated video with all its captions. Without:
  "train" is the videos of split train or validate, "eval" those of split test, all captions.
  Annotation order otherwise.

  Raises:
    ValueError for an unknown split_kind, a bad annotations file or test list (see the
    parsers) or when nothing is selected.
  """
  if split_kind not in _SPLITS_WITHOUT_TEST_LIST:
    raise ValueError(f"split_kind must be 'train' or 'eval', got {split_kind!r}")
  video_ids, splits, captions = _parse_annotations(annotations)
  position = {video_id: i for i, video_id in enumerate(video_ids)}
  if test_list:
    rows = _read_test_list(test_list, splits)
    if split_kind == "eval":
      selected = [video_id for video_id, _ in rows]
      captions = {video_id: [sentence] for video_id, sentence in rows}
    else:
      held_out = {video_id for video_id, _ in rows}
      selected = [v for v in video_ids if v not in held_out]
      if not selected:
        raise ValueError(f"{annotations}: no training videos: {test_list} lists all of them")
  else:
    kept_splits = _SPLITS_WITHOUT_TEST_LIST[split_kind]
    selected = [v for v in video_ids if splits[v] in kept_splits]
    if not selected:
      raise ValueError(f"{annotations}: no videos in splits {list(kept_splits)} for "
                       f"split_kind {split_kind!r}; splits found: {sorted(set(splits.values()))}")
  return selected, [captions[v] for v in selected], [position[v] for v in selected]


class _MsrVttVideos:
  """The videos of one split_kind of MSR-VTT annotations (`_select_videos`); subclasses say
  where a video is stored by `clip_path` and how it is read by `clip`."""

  def __init__(self, annotations, split_kind, test_list):
    self.annotations = os.fspath(annotations)
    self.split_kind = split_kind
    self.test_list = os.fspath(test_list) if test_list else ""
    self._video_ids, self._captions, self._positions = _select_videos(
        self.annotations, split_kind, self.test_list)
    self._caption_counts = np.array([len(c) for c in self._captions], np.int64)

  def __len__(self):
    return len(self._video_ids)

  def video_id(self, index):
    """The MSR-VTT id ("video7") of video `index`."""
    sources.check_index(index, len(self))
    return self._video_ids[index]

  def captions(self, index):
    """The captions of video `index` (a new list), without opening the video."""
    sources.check_index(index, len(self))
    return list(self._captions[index])

  def caption_counts(self):
    """int64 [len(self)]: the number of captions of each video."""
    return self._caption_counts.copy()

  def __getitem__(self, index):
    """{"video": the clip (read lazily), "name": its path, "captions", "image_id": the video's
    position in the annotations' "videos" list}."""
    clip = self.clip(index)
    return {"video": clip, "name": clip.path, "captions": self.captions(index),
            "image_id": self._positions[index]}


class MsrVttSource(_MsrVttVideos):
  """MSR-VTT videos as files: video `video_id` is videos_dir/<video_id><extension>."""

  def __init__(self, annotations, videos_dir, split_kind, test_list="", extension=".mp4"):
    """Args:
      annotations: path of MSRVTT_data.json ({"videos": [...], "sentences": [...]}).
      videos_dir: the folder of the video files.
      split_kind: "train" | "eval" (see `_select_videos` for the protocols).
      test_list: path of the 1k-A test list csv, or "" for MSR-VTT's own splits.
      extension: file name suffix of the videos.

    Raises:
      ValueError with one line naming the bad file and field (see `_select_videos`).
    """
    self.videos_dir = os.fspath(videos_dir)
    self.extension = extension
    super().__init__(annotations, split_kind, test_list)

  def clip(self, index):
    """VideoFile of video `index` (the file is not opened here)."""
    return VideoFile(os.path.join(self.videos_dir, self.video_id(index) + self.extension))


class FramesFolderSource(_MsrVttVideos):
  """MSR-VTT videos as pre-extracted frames: video `video_id` is the folder
  frames_dir/<video_id>/ of frame images (see FrameFolder)."""

  def __init__(self, annotations, frames_dir, split_kind, test_list=""):
    """Args as MsrVttSource, with `frames_dir` the folder holding one frames folder per video."""
    self.frames_dir = os.fspath(frames_dir)
    super().__init__(annotations, split_kind, test_list)

  def clip(self, index):
    """FrameFolder of video `index` (the folder is not listed here)."""
    return FrameFolder(os.path.join(self.frames_dir, self.video_id(index)))
