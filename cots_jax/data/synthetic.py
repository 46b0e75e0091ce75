"""The embedded default data: coloured shapes on a dark gradient, 5 captions each (§6, §8.11).

A scene holds 1-3 objects in distinct cells of a 3x3 grid. Each object has a colour (8), a shape
(4), a size (2) and a cell (9), so every single attribute value is shared by many images and
retrieval needs the composition of several words. The background is a smooth gradient between two
dark, low-saturation colours: it spreads a VQ tokenizer's code usage (design §8.12) and never looks
like an object colour.

Train and eval scenes are disjoint by construction: a scene's canonical description is hashed into
`_NUM_SPLIT_BUCKETS` buckets, eval owns bucket 0 and train the rest, and each image is
rejection-sampled until its scene falls in its split. Everything is a pure function of
(seed, split, index), so nothing needs caching.

`single_object_scenes` draws scenes of exactly one object, balanced over colours and shapes, for
the zero-shot evaluator (cots_jax/evaluators/zeroshot.py).
"""

import dataclasses
import functools
import itertools
import math
import zlib

import numpy as np
from PIL import Image, ImageDraw

# Bright colours with hues 25-80 degrees apart (and white); the background is far darker.
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (235, 220, 50),
    "green": (60, 190, 70),
    "cyan": (50, 200, 215),
    "blue": (50, 90, 235),
    "purple": (160, 70, 215),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
# The 3x3 grid in row-major order (row 0 is the top of the image).
CELLS = ("top left", "top", "top right", "left", "center", "right",
         "bottom left", "bottom", "bottom right")
CAPTIONS_PER_IMAGE = 5

# Probabilities of 1, 2, 3 objects. Few single-object scenes: there are only 576 of them, and eval
# scenes should almost all be distinct.
_COUNT_PROBS = (0.1, 0.3, 0.6)
_COUNT_CDF = np.cumsum(_COUNT_PROBS)
_NUM_KINDS = np.array([len(COLOURS), len(SHAPES), len(SIZES)])
# Object radius in image units (half the extent of its bounding box); a cell is 1/3 wide.
RADIUS = {"small": 0.065, "large": 0.125}
# Smallest gap between an object's bounding box and its cell border, in image units, so that
# objects in neighbouring cells never touch.
_CELL_MARGIN = 0.02
SHADE_RANGE = (0.85, 1.0)  # brightness factor of an object's colour
_BACKGROUND_GRAY = (25.0, 85.0)  # background end colours: a dark gray ...
_BACKGROUND_TINT = 10.0  # ... plus a small per-channel tint (low saturation).
_SUPERSAMPLE = 4  # antialiasing: shapes are drawn at 4x and box-filtered down.
_NUM_SPLIT_BUCKETS = 4  # eval owns 1/4 of the scene space, train the rest.
SPLIT_IDS = {"train": 0, "eval": 1}
_SINGLE_OBJECT_STREAM = 1  # seed word of `single_object_scenes`


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One shape. `centre` (x, y) and `radius` are in image units: [0, 1] spans the image side."""
  colour: str
  shape: str
  size: str
  cell: str
  centre: tuple[float, float]
  radius: float
  shade: float  # brightness factor of the colour


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects (in distinct cells) over a linear gradient from `background[0]` to `background[1]`."""
  objects: tuple[SceneObject, ...]
  background: tuple[tuple[float, float, float], tuple[float, float, float]]
  gradient_angle: float  # radians; direction in which the gradient runs.

  def description(self):
    """Canonical text of each object's size, colour, shape and cell, in reading order: two scenes
    with the same description cannot be told apart by their captions."""
    return _describe_layout([(o.colour, o.shape, o.size, o.cell) for o in self.objects])


def _describe_layout(layout):
  """Canonical text of (colour, shape, size, cell) tuples, in reading order."""
  ordered = sorted(layout, key=lambda item: CELLS.index(item[3]))
  return "; ".join(f"{size} {colour} {shape} at {cell}" for colour, shape, size, cell in ordered)


def _sample_layout(rng):
  """What the captions state: a tuple of (colour, shape, size, cell), cells distinct."""
  count = 1 + int(np.searchsorted(_COUNT_CDF, rng.random(), side="right"))
  cells = rng.permutation(len(CELLS))[:count]
  kinds = (rng.random((count, 3)) * _NUM_KINDS).astype(np.int64)
  colours = list(COLOURS)
  return tuple((colours[colour], SHAPES[shape], SIZES[size], CELLS[cell])
               for cell, (colour, shape, size) in zip(cells, kinds))


def uniform_in(low_high, u):
  """Maps u in [0, 1) onto [low, high)."""
  return low_high[0] + (low_high[1] - low_high[0]) * u


def realise_layout(layout, rng):
  """The Scene of `layout`: draws each object's jitter in its cell, its shade and the background."""
  objects = []
  for (colour, shape, size, cell), (jx, jy, shade) in zip(layout, rng.random((len(layout), 3))):
    radius = RADIUS[size]
    row, col = divmod(CELLS.index(cell), 3)
    max_jitter = 1 / 6 - radius - _CELL_MARGIN
    objects.append(SceneObject(
        colour=colour, shape=shape, size=size, cell=cell,
        centre=(float((col + 0.5) / 3 + max_jitter * (2 * jx - 1)),
                float((row + 0.5) / 3 + max_jitter * (2 * jy - 1))),
        radius=radius, shade=float(uniform_in(SHADE_RANGE, shade))))
  gray, tint = rng.random((2, 1)), rng.random((2, 3))
  ends = uniform_in(_BACKGROUND_GRAY, gray) + _BACKGROUND_TINT * (2 * tint - 1)
  return Scene(objects=tuple(objects),
               background=tuple(tuple(float(v) for v in end) for end in ends),
               gradient_angle=float(2 * math.pi * rng.random()))


def sample_scene(rng):
  """Draws a scene of 1-3 objects in distinct cells, each jittered inside its cell."""
  return realise_layout(_sample_layout(rng), rng)


# ----------------------------------------------------------------------------- rendering


def _background(scene, image_size):
  """The gradient, float32 [H, W, 3] in 0..255."""
  coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5
  dx, dy = math.cos(scene.gradient_angle), math.sin(scene.gradient_angle)
  # Projection on the gradient direction, rescaled so the image spans exactly [0, 1].
  t = 0.5 + (coords[None, :] * dx + coords[:, None] * dy) / (abs(dx) + abs(dy))
  start, end = (np.asarray(c, np.float32) for c in scene.background)
  return start + t[..., None] * (end - start)


def _draw_shape(draw, shape, cx, cy, r):
  """Draws `shape` filled with 255, centred at (cx, cy) with bounding half-extent r (pixels)."""
  if shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
  elif shape == "square":
    a = 0.88 * r
    draw.rectangle([cx - a, cy - a, cx + a, cy + a], fill=255)
  elif shape == "triangle":
    half_w, half_h = 0.98 * r, 0.85 * r
    draw.polygon([(cx, cy - half_h), (cx + half_w, cy + half_h), (cx - half_w, cy + half_h)],
                 fill=255)
  elif shape == "cross":
    a = 0.4 * r  # half-width of the arms
    draw.rectangle([cx - r, cy - a, cx + r, cy + a], fill=255)
    draw.rectangle([cx - a, cy - r, cx + a, cy + r], fill=255)
  else:
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _coverage(obj, image_size):
  """Antialiased coverage of `obj`: (top, left, alpha float32 [h, w] in [0, 1]) of its box."""
  cx, cy = (c * image_size for c in obj.centre)
  r = obj.radius * image_size
  left, top = max(0, math.floor(cx - r) - 1), max(0, math.floor(cy - r) - 1)
  right = min(image_size, math.ceil(cx + r) + 1)
  bottom = min(image_size, math.ceil(cy + r) + 1)
  width, height = right - left, bottom - top
  canvas = Image.new("L", (width * _SUPERSAMPLE, height * _SUPERSAMPLE), 0)
  _draw_shape(ImageDraw.Draw(canvas), obj.shape, (cx - left) * _SUPERSAMPLE,
              (cy - top) * _SUPERSAMPLE, r * _SUPERSAMPLE)
  alpha = canvas.resize((width, height), Image.Resampling.BOX)
  return top, left, np.asarray(alpha, np.float32) / 255.0


def render_scene(scene, image_size=48):
  """Draws `scene`: uint8 [image_size, image_size, 3]."""
  image = _background(scene, image_size)
  for obj in scene.objects:
    top, left, alpha = _coverage(obj, image_size)
    region = image[top:top + alpha.shape[0], left:left + alpha.shape[1]]
    colour = np.asarray(COLOURS[obj.colour], np.float32) * obj.shade
    region += alpha[..., None] * (colour - region)
  return np.round(image).astype(np.uint8)


# ----------------------------------------------------------------------------- captions

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_VERTICAL_SYNONYMS = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}
_CENTER_PHRASES = ("in the center", "in the middle", "at the center")
_COUNT_WORDS = ("one", "two", "three")


def pick_one(rng, options):
  """One of `options`, uniformly."""
  return options[int(rng.random() * len(options))]


def _where(cell, rng):
  """A prepositional phrase for `cell`: "in the upper left corner", "on the right side" ..."""
  if cell == "center":
    return pick_one(rng, _CENTER_PHRASES)
  vertical, _, horizontal = cell.rpartition(" ")
  if vertical:  # a corner
    v = pick_one(rng, _VERTICAL_SYNONYMS[vertical])
    return pick_one(rng, (f"in the {v} {horizontal}", f"at the {v} {horizontal}",
                       f"in the {v} {horizontal} corner"))
  if cell in ("top", "bottom"):
    return pick_one(rng, (f"at the {cell}", f"near the {cell}", f"along the {cell} edge"))
  return pick_one(rng, (f"on the {cell}", f"at the {cell}", f"on the {cell} side"))


def _place_name(cell, rng):
  """A bare name of `cell`: "upper left", "middle", "right" ..."""
  if cell == "center":
    return pick_one(rng, ("center", "middle"))
  vertical, _, horizontal = cell.rpartition(" ")
  if vertical:
    return f"{pick_one(rng, _VERTICAL_SYNONYMS[vertical])} {horizontal}"
  return cell


def noun_phrase(obj, rng, with_size=True):
  """ "big red circle" (or "red circle" without the size)."""
  words = [pick_one(rng, _SIZE_WORDS[obj.size])] if with_size else []
  return " ".join(words + [obj.colour, obj.shape])


def with_article(phrase):
  """ "a red circle", "an orange cross"."""
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(clauses):
  """ "x", "x and y", "x, y and z"."""
  return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


def _count_phrase(n, rng):
  """ "one shape", "three objects" ..."""
  noun = pick_one(rng, ("shape", "object"))
  return f"{_COUNT_WORDS[n - 1]} {noun}{'s' if n > 1 else ''}"


def _list_caption(objs, rng):
  """ "a big red circle in the top left and a small blue cross on the right"."""
  return _join([f"{with_article(noun_phrase(o, rng))} {_where(o.cell, rng)}" for o in objs])


def _counted_caption(objs, rng):
  """ "two shapes: a big red circle in the top left and a small blue cross on the right"."""
  return f"{_count_phrase(len(objs), rng)}: {_list_caption(objs, rng)}"


def _there_is_caption(objs, rng):
  """ "there is a big red circle in the top left; a small blue cross sits on the right"."""
  first, rest = objs[0], objs[1:]
  clauses = [f"there is {with_article(noun_phrase(first, rng))} {_where(first.cell, rng)}"]
  clauses += [f"{with_article(noun_phrase(o, rng))} {pick_one(rng, ('sits', 'is', 'lies'))} "
              f"{_where(o.cell, rng)}"
              for o in rest]
  return "; ".join(clauses)


def _labelled_caption(objs, rng):
  """ "upper left: big red circle. right: small blue cross"."""
  return ". ".join(f"{_place_name(o.cell, rng)}: {noun_phrase(o, rng)}" for o in objs)


def _inverted_caption(objs, rng):
  """ "in the top left is a big red circle and on the right is a small blue cross"."""
  return _join([f"{_where(o.cell, rng)} is {with_article(noun_phrase(o, rng))}" for o in objs])


def _sizeless_caption(objs, rng):
  """ "an image with two shapes, a red circle in the top left and a blue cross on the right"."""
  clauses = [f"{with_article(noun_phrase(o, rng, with_size=False))} {_where(o.cell, rng)}"
             for o in objs]
  return f"an image with {_count_phrase(len(objs), rng)}, {_join(clauses)}"


# Each template gives a structurally different sentence, so 5 different templates give 5
# different captions.
_TEMPLATES = (_list_caption, _counted_caption, _there_is_caption, _labelled_caption,
              _inverted_caption, _sizeless_caption)


def describe_scene(scene, rng):
  """5 distinct captions of `scene`, each naming every object's colour, shape and position.

  All but one template also name the size; two name the count. Every template gets its own
  random object order and word choices.
  """
  templates = rng.choice(len(_TEMPLATES), size=CAPTIONS_PER_IMAGE, replace=False)
  captions = []
  for t in templates:
    order = rng.permutation(len(scene.objects))
    captions.append(_TEMPLATES[t]([scene.objects[i] for i in order], rng))
  return captions


# ----------------------------------------------------------------------------- the source


def split_of(description):
  """"eval" or "train": the split that owns a scene description (a stable hash of it, the same
  for every seed)."""
  bucket = zlib.crc32(description.encode()) % _NUM_SPLIT_BUCKETS
  return "eval" if bucket == 0 else "train"


def scene_split(scene):
  """"eval" or "train": the split that owns `scene`."""
  return split_of(scene.description())


@functools.cache
def _single_object_layouts(split):
  """{(colour, shape): ((size, cell), ...)}: the single-object layouts that `split` owns."""
  owned = {}
  for colour, shape, size, cell in itertools.product(COLOURS, SHAPES, SIZES, CELLS):
    if split_of(_describe_layout([(colour, shape, size, cell)])) == split:
      owned.setdefault((colour, shape), []).append((size, cell))
  return {pair: tuple(layouts) for pair, layouts in owned.items()}


def single_object_scenes(num_images, split="eval", seed=0):
  """`num_images` scenes of exactly one object, for classification by shape and by colour.

  Scene i shows the (colour, shape) pair i mod 32 (colour-major order), so both attributes are
  balanced; its size and cell are drawn among the single-object layouts that `split` owns (no
  scene of the other split has that description), its jitter, shade and background as for any
  scene. A pure function of (seed, split, i), drawn apart from `SyntheticCaptions`' images.

  Returns:
    tuple of `num_images` Scenes, each with one object.
  """
  if split not in SPLIT_IDS:
    raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
  owned = _single_object_layouts(split)
  pairs = list(itertools.product(COLOURS, SHAPES))
  scenes = []
  for index in range(num_images):
    colour, shape = pairs[index % len(pairs)]
    # A fourth seed word keeps these draws apart from SyntheticCaptions' (seed, split, index).
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index, _SINGLE_OBJECT_STREAM])
    size, cell = pick_one(rng, owned[colour, shape])
    scenes.append(realise_layout(((colour, shape, size, cell),), rng))
  return tuple(scenes)


class SyntheticCaptions:
  """Random-access source (grain-compatible) of synthetic images with 5 captions each.

  Item i is {"image": uint8 [H, W, 3], "name": str, "captions": list of 5 str,
  "image_id": first_id + i}, a pure function of (seed, split, i); a train and an eval scene never
  share a description. The registry numbers the eval images after the train images (first_id =
  the train size), so ids are unique over both splits. The interface is that of the real-data
  sources (`data/sources.py`).
  """

  def __init__(self, num_images, split="train", seed=0, image_size=48, first_id=0):
    if split not in SPLIT_IDS:
      raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    if num_images < 1:
      raise ValueError(f"num_images must be positive, got {num_images}")
    self.num_images = int(num_images)
    self.split = split
    self.seed = int(seed)
    self.image_size = int(image_size)
    self.first_id = int(first_id)

  def __len__(self):
    return self.num_images

  def _draw(self, index):
    """(scene, rng) of image `index`; rng continues where the scene's rejection sampling ended."""
    if not 0 <= index < self.num_images:
      raise IndexError(f"image index {index} out of range [0, {self.num_images})")
    rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], int(index)])
    while True:  # rejection sampling; only the cheap discrete layout is redrawn.
      layout = _sample_layout(rng)
      if split_of(_describe_layout(layout)) == self.split:
        return realise_layout(layout, rng), rng

  def scene(self, index):
    """The Scene of image `index`."""
    return self._draw(index)[0]

  def captions(self, index):
    """The 5 captions of image `index`, without drawing the image."""
    scene, rng = self._draw(index)
    return describe_scene(scene, rng)

  def caption_counts(self):
    """int64 [num_images]: 5 captions per image."""
    return np.full(self.num_images, CAPTIONS_PER_IMAGE, np.int64)

  def __getitem__(self, index):
    scene, rng = self._draw(index)
    return {"image": render_scene(scene, self.image_size),
            "name": f"synthetic/{self.split}/{int(index)}",
            "captions": describe_scene(scene, rng),
            "image_id": self.first_id + int(index)}
