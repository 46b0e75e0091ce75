"""Image decoding and augmentation for real data (design §6): numpy and PIL only, no jax.

`decode_image` turns encoded bytes or a decoded array of any common layout into uint8 RGB
[H, W, 3], or raises `BadExampleError`; a truncated file, or damage the codec detects, is an
error, never a partly decoded image (`ImageFile.LOAD_TRUNCATED_IMAGES` stays off). Conventions:
  - transparency (alpha channel, palette or tRNS transparency) is composited on black, so a
    fully transparent pixel is (0, 0, 0) whatever colour the file stores under it;
  - 16-bit samples map the full range 0..65535 onto 0..255 (x / 257, rounded); PIL's 32-bit
    mode "I" (how some 16-bit files decode) is read the same way, clipped to 0..65535;
  - float samples (mode "F", float arrays) are taken to lie in [0, 1] and are clipped to it;
  - EXIF orientation is applied.
Every resize uses PIL bicubic resampling. `resize_shorter_side` downscales a decoded image once
for the in-memory cache of `input.cache_decoded` (sources.DecodedImages) to
`ImageTransform.min_input_side`, the smallest side from which the training crops are still only
downscaled.
"""

import dataclasses
import io
import math
import struct

import numpy as np
from PIL import Image
from PIL import ImageOps

_CROP_TRIES = 10
# Aspect ratios (w / h) of the random-resized crop (torchvision's default).
CROP_RATIO = (3 / 4, 4 / 3)
_RESAMPLE = Image.Resampling.BICUBIC
# What PIL raises on open / load / EXIF parsing of a damaged file (besides the two handled first).
_CORRUPT_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
                         struct.error)
# Modes whose samples are used as they are: uint16 (either byte order) and float32.
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "F")


class BadExampleError(ValueError):
  """An input example that cannot be used; str(error) is f"{name}: {reason}".

  Attributes:
    name: the file path or example id, str.
    reason: short description of the defect, str.
  """

  def __init__(self, name, reason):
    super().__init__(f"{name}: {reason}")
    self.name = str(name)
    self.reason = reason

  def __reduce__(self):
    # The default pickles only the message; grain worker processes send errors back pickled.
    return type(self), (self.name, self.reason)


def decode_image(data, name):
  """Encoded image bytes (anything PIL opens) or a decoded array -> uint8 [H, W, 3] RGB.

  Arrays may be uint8, uint16 or float, [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (RGBA).
  `name` (file path or example id) only labels the BadExampleError raised for data that cannot
  be used: None, empty, not an image, truncated or corrupt, a decompression bomb, an unsupported
  mode, shape or dtype, zero size or non-finite samples.
  """
  if data is None:
    raise BadExampleError(name, "no image data (None)")
  if isinstance(data, np.ndarray):
    return _array_to_rgb(data, name)
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise BadExampleError(name, f"unsupported image data type {type(data).__name__}")
  if not len(data):
    raise BadExampleError(name, "empty file")
  return _array_to_rgb(_pil_samples(_open_fully(data, name), name), name)


def _open_fully(data, name):
  """Encoded bytes -> PIL image, fully decoded (so damage shows here), EXIF orientation applied."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
    return ImageOps.exif_transpose(image)
  except Image.UnidentifiedImageError as error:
    raise BadExampleError(name, "not an image (cannot identify image file)") from error
  except Image.DecompressionBombError as error:
    raise BadExampleError(name, f"decompression bomb ({error})") from error
  except _CORRUPT_IMAGE_ERRORS as error:
    raise BadExampleError(name, f"truncated or corrupt image ({error})") from error


def _pil_samples(image, name):
  """PIL image of any mode -> its samples: uint16 or float32 [H, W] for high-depth modes,
  uint8 [H, W, 4] where it has transparency, else uint8 [H, W, 3]."""
  if image.mode in _HIGH_DEPTH_MODES:
    return np.asarray(image)
  if image.mode == "I":
    return np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
  try:
    return np.asarray(image.convert("RGBA" if image.has_transparency_data else "RGB"))
  except ValueError as error:
    raise BadExampleError(name, f"unsupported image mode {image.mode}") from error


def _array_to_rgb(array, name):
  """uint8 | uint16 | float [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> uint8 [H, W, 3]."""
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise BadExampleError(name, f"unsupported image array shape {array.shape}")
  if not array.size:
    raise BadExampleError(name, f"zero-size image {array.shape}")
  array = _to_uint8(array, name)
  if array.shape[-1] == 4:
    return _composite_on_black(array)
  if array.shape[-1] == 1:
    return np.repeat(array, 3, axis=-1)
  return array


def _to_uint8(array, name):
  """Samples of any supported dtype -> uint8, same shape (full-range scaling, see module doc)."""
  if array.dtype == np.uint8:
    return array
  if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # either byte order
    return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
  if array.dtype.kind == "f":
    if not np.isfinite(array).all():
      raise BadExampleError(name, "non-finite pixel values")
    return np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
  raise BadExampleError(name, f"unsupported image dtype {array.dtype}")


def _composite_on_black(rgba):
  """uint8 [H, W, 4] -> uint8 [H, W, 3], each colour times alpha / 255, rounded."""
  rgb, alpha = rgba[..., :3].astype(np.uint16), rgba[..., 3:]
  return ((rgb * alpha + 127) // 255).astype(np.uint8)


def _crop_box(height, width, rng, scale, ratio):
  """Inception-style crop (torchvision RandomResizedCrop.get_params) -> (top, left, h, w).

  Draws an area fraction uniform in `scale` and an aspect ratio (w / h) log-uniform in `ratio`
  until the box fits (at most _CROP_TRIES times), else the centre crop of the largest box whose
  aspect ratio lies in `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(_CROP_TRIES):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target_area * aspect))
    h = round(math.sqrt(target_area / aspect))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  if width / height < min(ratio):
    w, h = width, round(width / min(ratio))
  elif width / height > max(ratio):
    w, h = round(height * max(ratio)), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _resize_box(image, size, box):
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: the region box = (left, top, right, bottom), in
  pixels (may be fractional), resampled bicubic; pixels just outside the box feed its edges."""
  return np.asarray(Image.fromarray(image).resize((size, size), _RESAMPLE, box=box))


def random_resized_crop(image, rng, size, scale=(0.5, 1.0), ratio=CROP_RATIO, flip_prob=0.5,
                        full_size=None):
  """Training augmentation: uint8 [H, W, 3] -> uint8 [size, size, 3].

  A random crop (`_crop_box`: area fraction in `scale`, aspect ratio w / h in `ratio`), resized
  bicubic to size x size, then mirrored left-right with probability `flip_prob`. `rng` is a
  np.random.Generator; the flip draw is made whatever `flip_prob`, so one seed gives the same
  crop for every flip_prob. `full_size` (height, width): the size `image` had before it was
  downscaled (`resize_shorter_side`); the crop is drawn for that size and its region taken from
  `image`, so one seed gives the same crop of the downscaled and of the full image.
  """
  height, width = full_size or image.shape[:2]
  top, left, h, w = _crop_box(height, width, rng, scale, ratio)
  box = (left, top, left + w, top + h)
  if full_size is not None:
    scale_x, scale_y = image.shape[1] / width, image.shape[0] / height
    box = (left * scale_x, top * scale_y, (left + w) * scale_x, (top + h) * scale_y)
  crop = _resize_box(image, size, box)
  if rng.random() < flip_prob:
    crop = crop[:, ::-1]
  return np.ascontiguousarray(crop)


def resize_center_crop(image, size):
  """Eval transform: uint8 [H, W, 3] -> uint8 [size, size, 3].

  The result of resizing the shorter side to `size` (aspect kept) and taking the centre
  size x size crop, computed as one bicubic resampling of the centre square of the image.
  """
  height, width = image.shape[:2]
  side = min(height, width)
  left, top = (width - side) / 2, (height - side) / 2
  return _resize_box(image, size, (left, top, left + side, top + side))


def resize_shorter_side(image, side):
  """uint8 [H, W, 3] -> uint8 [h, w, 3] with min(h, w) = `side` and the aspect ratio kept (the
  longer side rounded), resized bicubic; an image whose shorter side is at most `side` is
  returned as it is (upscaling would add no detail)."""
  height, width = image.shape[:2]
  if min(height, width) <= side:
    return image
  if height <= width:
    new_size = (round(width * side / height), side)  # PIL sizes are (width, height)
  else:
    new_size = (side, round(height * side / width))
  return np.asarray(Image.fromarray(image).resize(new_size, _RESAMPLE))


def to_unit_range(image):
  """uint8 [..., 3] -> float32 [..., 3] in [-1, 1] (x / 127.5 - 1)."""
  return image.astype(np.float32) / 127.5 - 1.0


def sample_frame_indices(num_available, num_frames, rng=None):
  """Indices of `num_frames` frames spread uniformly over a clip of `num_available` frames.

  Frame i spans the time [i, i + 1); [0, num_available) is cut into `num_frames` equal segments
  (float boundaries) and each segment gives the frame at one point of it: a point drawn
  uniformly by `rng` (a np.random.Generator; training), so a frame's chance is its overlap with
  the segment, or the segment's centre when `rng` is None (eval). Clips shorter than
  `num_frames` have segments shorter than a frame, so indices repeat.

  Returns:
    int64 [num_frames], non-decreasing, in [0, num_available).
  Raises:
    ValueError when num_available < 1 or num_frames < 1.
  """
  if num_available < 1:
    raise ValueError(f"num_available must be >= 1 (a clip with frames), got {num_available}")
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  # Integer numerators: a boundary or centre that is a whole frame number comes out exact.
  segments = np.arange(int(num_frames))
  if rng is None:
    points = (2 * segments + 1) * num_available / (2 * num_frames)
  else:
    points = rng.uniform(segments * num_available / num_frames,
                         (segments + 1) * num_available / num_frames)
  # uniform() may return its upper bound after rounding: keep the last index in range.
  return np.minimum(np.floor(points).astype(np.int64), num_available - 1)


# Training augmentations of `input.augment`.
AUGMENTATIONS = ("none", "crop_flip")


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """Encoded bytes or a decoded array -> float32 [size, size, 3] in [-1, 1].

  augment "crop_flip": random-resized crop (area fraction in `crop_scale`) + horizontal flip with
  probability `flip_prob` (training on photos); "none": resize the shorter side + centre crop
  (eval, and the synthetic data whose captions name positions). An image already of the target
  size is not resampled.
  """
  size: int
  augment: str = "none"  # one of AUGMENTATIONS
  crop_scale: tuple[float, float] = (0.5, 1.0)
  flip_prob: float = 0.5

  @classmethod
  def for_training(cls, config):
    inp = config.input
    return cls(config.model.image.image_size, inp.augment, tuple(inp.crop_scale), inp.flip_prob)

  @classmethod
  def for_views(cls, config):
    """The second-view augmentation (input.view_crop_scale, input.view_flip_prob): the train
    pairs' `image_view` and the eval split's `view_batches`."""
    inp = config.input
    return cls(config.model.image.image_size, "crop_flip", tuple(inp.view_crop_scale),
               inp.view_flip_prob)

  def min_input_side(self):
    """The shorter side (px) from which this transform only ever downscales: `size` for the
    centre crop; for "crop_flip", size / sqrt(crop_scale[0] * min(CROP_RATIO[0], 1 /
    CROP_RATIO[1])) rounded up (1.63 x size at crop_scale (0.5, 1)), since a crop of at least
    crop_scale[0] of an image's area, at an aspect ratio in CROP_RATIO, has both sides at least
    sqrt(crop_scale[0] * 3 / 4) times the image's shorter side."""
    if self.augment != "crop_flip":
      return self.size
    return math.ceil(self.size / math.sqrt(self.crop_scale[0] * min(CROP_RATIO[0],
                                                                    1 / CROP_RATIO[1])))

  def pixels(self, image, name, rng=None, full_size=None):
    """-> uint8 [size, size, 3]; raises BadExampleError(name, reason) when `image` does not
    decode. `rng` (np.random.Generator) is needed by "crop_flip" only, and so is `full_size`:
    the (height, width) of `image` before it was downscaled, if it was (`random_resized_crop`)."""
    pixels = decode_image(image, name)
    if self.augment == "crop_flip":
      return random_resized_crop(pixels, rng, self.size, scale=self.crop_scale,
                                 flip_prob=self.flip_prob, full_size=full_size)
    if pixels.shape[:2] != (self.size, self.size):
      return resize_center_crop(pixels, self.size)
    return pixels

  def __call__(self, image, name, rng=None, full_size=None):
    """-> float32 [size, size, 3] in [-1, 1]; see `pixels`."""
    return to_unit_range(self.pixels(image, name, rng, full_size))

  def clip_pixels(self, clip, name, num_frames, rng=None):
    """`num_frames` frames of a clip (video.py's clip contract) -> uint8 [T, size, size, 3].

    The frames are sampled by `sample_frame_indices` (a random frame of each segment with
    `rng`, the segment centres without) and all get the same augmentation (one crop and flip
    draw for the whole clip). Raises BadExampleError(name, reason) for an unreadable clip.
    """
    frames = clip.read(sample_frame_indices(clip.num_frames, num_frames, rng))
    seed = None if rng is None else int(rng.integers(2**63))
    return np.stack([self.pixels(frame, name, None if seed is None else np.random.default_rng(seed))
                     for frame in frames])
