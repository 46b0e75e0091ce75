"""The data sources a config can name (`config.input.data.name`), in one table.

Each entry says how to make the source of a split kind ("train" | "eval"), which fields of
`config.input.data` it cannot do without, and whether its items are clips. Config validation,
the pipeline, the evaluators and the state builder all read this table; a new source is added
here and nowhere else.
"""

import dataclasses
from typing import Callable

from cots_jax.data import array_record
from cots_jax.data import sources
from cots_jax.data import synthetic
from cots_jax.data import synthetic_video
from cots_jax.data import video
from cots_jax.data import webdataset


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """One kind of source.

  Attributes:
    make: (config, train: bool) -> the source of the train or the eval split.
    required: fields of `config.input.data` that must be non-empty.
    video: True when its items hold a clip (`video`) instead of an image.
    stream: None for a source with random access over its training examples; else (config,
      process_index, process_count) -> the grain IterDataset of this process's training items
      (source items, or bad-example markers): the training split is streamed, never listed
      (`make` then gives the eval split only).
  """
  make: Callable
  required: tuple = ()
  video: bool = False
  stream: Callable | None = None


# Sources whose splits are numbered apart get first_id = the train size for the eval split, so
# that image ids are unique over the dataset (design §4.3); the file-backed ones number images
# by their position in the annotations.
def _synthetic(config, train):
  data = config.input.data
  return synthetic.SyntheticCaptions(data.num_train_images if train else data.num_eval_images,
                                     "train" if train else "eval", config.seed,
                                     config.model.image.image_size,
                                     first_id=0 if train else data.num_train_images)


def _synthetic_video(config, train):
  data = config.input.data
  return synthetic_video.SyntheticVideos(
      data.num_train_images if train else data.num_eval_images, "train" if train else "eval",
      config.seed, config.model.image.image_size, data.clip_frames or config.model.num_frames,
      first_id=0 if train else data.num_train_images)


def _captions_json(config, train):
  data = config.input.data
  return sources.CaptionsJson(data.annotations, data.images_dir,
                              data.train_splits if train else (data.eval_split,))


def _tfds(config, train):
  data = config.input.data

  def split_source(split, first_id=0):
    return sources.TfdsCaptions(
        data.tfds_name, split, data.tfds_data_dir or None, image_key=data.image_key,
        captions_key=data.captions_key, caption_text_key=data.caption_text_key or None,
        first_id=first_id)
  train_source = split_source(data.tfds_train_split)
  # Records without `image/id` are numbered by index: eval's follow train's.
  return train_source if train else split_source(data.tfds_eval_split, len(train_source))


def _array_record(config, train):
  data = config.input.data
  return array_record.ArrayRecordCaptions(data.paths if train else data.eval_paths)


def _webdataset(config, train):
  data = config.input.data
  if train:
    raise ValueError("input.data.name='webdataset' streams its training shards, which gives no "
                     "list of the training examples (cached features, input.cache_decoded, "
                     "caption noise need one): convert them to ArrayRecord with python -m "
                     "cots_jax.data.convert --from=webdataset (docs/data.md)")
  return webdataset.ShardExamples(data.eval_paths, data.json_caption_key,
                                  config.input.on_bad_example)


def _webdataset_stream(config, process_index, process_count):
  data = config.input.data
  return webdataset.WebDatasetShards(
      data.paths, seed=config.seed, shuffle_buffer=data.shuffle_buffer,
      process_index=process_index, process_count=process_count,
      caption_field=data.json_caption_key, on_bad_example=config.input.on_bad_example)


def _msrvtt(config, train):
  data = config.input.data
  return video.MsrVttSource(data.annotations, data.videos_dir, "train" if train else "eval",
                            data.test_list, data.video_extension)


def _frames_folder(config, train):
  data = config.input.data
  return video.FramesFolderSource(data.annotations, data.videos_dir,
                                  "train" if train else "eval", data.test_list)


SOURCES = {
    "synthetic": SourceKind(_synthetic),
    "captions_json": SourceKind(_captions_json, required=("annotations", "images_dir")),
    "tfds": SourceKind(_tfds, required=("tfds_name",)),
    "array_record": SourceKind(_array_record, required=("paths", "eval_paths")),
    "webdataset": SourceKind(_webdataset, required=("paths", "eval_paths"),
                             stream=_webdataset_stream),
    "synthetic_video": SourceKind(_synthetic_video, video=True),
    "msrvtt": SourceKind(_msrvtt, required=("annotations", "videos_dir"), video=True),
    "frames_folder": SourceKind(_frames_folder, required=("annotations", "videos_dir"),
                                video=True),
}


def check_config(config):
  """Raises ValueError naming the field when `input.data.name` is unknown or one of the fields
  its source needs is empty."""
  data = config.input.data
  if data.name not in SOURCES:
    raise ValueError(f"config.input.data.name={data.name!r} is not a source; known: "
                     f"{', '.join(SOURCES)}")
  for field in SOURCES[data.name].required:
    if not data[field]:
      raise ValueError(f"config.input.data.{field}={data[field]!r} must be set for "
                       f"input.data.name={data.name!r}")


def make_source(config, split_kind):
  """The source of `split_kind` ("train" | "eval") named by `config.input.data.name`.

  Raises:
    ValueError when split_kind is unknown, or as `check_config`.
  """
  if split_kind not in ("train", "eval"):
    raise ValueError(f"split_kind must be 'train' or 'eval', got {split_kind!r}")
  check_config(config)
  return SOURCES[config.input.data.name].make(config, split_kind == "train")


def training_stream(config, process_index, process_count):
  """The IterDataset of this process's training items of a streamed source (`is_streamed`)."""
  check_config(config)
  return SOURCES[config.input.data.name].stream(config, process_index, process_count)


def is_streamed(config):
  """True when the config's training split is streamed (`SourceKind.stream`), not listed.

  Raises:
    ValueError as `check_config`.
  """
  check_config(config)
  return SOURCES[config.input.data.name].stream is not None


def is_video(config):
  """True when the config's source yields clips (batches carry `video` [B, T, H, W, 3]).

  Raises:
    ValueError as `check_config`.
  """
  check_config(config)
  return SOURCES[config.input.data.name].video
