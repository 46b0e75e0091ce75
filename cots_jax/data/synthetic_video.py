"""The embedded video data (issue 10; design §6, §8.11): a shape moving in a straight line past a
static one, with 5 captions that name the colour, shape and direction of the motion.

A clip shows a mover (a colour, shape and size of synthetic.py's palette) that crosses the frames
at constant speed to the left, right, up or down, and a static distractor of another colour, on
synthetic.py's dark gradient background; synthetic.render_scene draws every frame.

Only the order of the frames tells the direction. The path (the points the mover passes) is drawn
independently of the direction, and the direction only sets the order in which they are passed:
the clip moving left is the clip moving right played backwards, so a model blind to frame order
(the mean of per-frame features) cannot tell them apart. Drawing the start point independently of
the direction instead would put the paths of left-moving objects left of those of right-moving
ones, which an order-blind model could read. Start points of the two directions still overlap
(the same start cells occur for both).

Clips come in groups of `DIRECTIONS_PER_GROUP` consecutive indices that share everything but the
direction (appearance, background, distractor, path centre and length), each group taking every
direction once, so every clip has `direction_twins`. Train and eval are disjoint like
synthetic.py's images: an appearance (a description without its direction) is hashed into
buckets and eval owns one, so train and eval never share a description and each eval clip has its
twins in eval. Groups take the appearances of their split in an order drawn from the seed, so no
two groups share one until all have been used (2700 train, 884 eval). Everything is a pure
function of (seed, split, index).
"""

import collections
import dataclasses
import functools
import itertools

import numpy as np

from cots_jax.data import synthetic
from cots_jax.data.synthetic import noun_phrase, pick_one, with_article
from cots_jax.data.video import ArrayClip

# Unit steps (dx, dy) in image coordinates: y grows downwards, so "up" is -y.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DIRECTIONS_PER_GROUP = len(DIRECTIONS)
# Path length (first to last frame centre) in image units: 12-19 px over a 48 px frame.
_TRAVEL_RANGE = (0.25, 0.4)
# Smallest gap between the distractor's bounding box and the boxes the mover sweeps in any
# direction, in image units (2 px at 48 px), so that the two never touch.
_GAP = 0.04


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """What a clip shows. Positions (x, y) and radii are in image units ([0, 1] spans the side,
  y grows downwards), as in synthetic.SceneObject.

  The mover's centre runs at constant speed from `start` (first frame) to `end` (last frame): a
  segment of length `travel` centred on `path_centre`, along `direction`.
  """
  colour: str
  shape: str
  size: str
  direction: str  # a key of DIRECTIONS
  path_centre: tuple[float, float]
  travel: float
  radius: float
  shade: float  # brightness factor of the mover's colour
  distractor: synthetic.SceneObject  # static, of another colour than the mover
  background: tuple[tuple[float, float, float], tuple[float, float, float]]
  gradient_angle: float  # radians, as in synthetic.Scene

  def _kinds(self):
    """((colour, shape, size) of the mover, (colour, shape, size) of the distractor)."""
    d = self.distractor
    return (self.colour, self.shape, self.size), (d.colour, d.shape, d.size)

  def appearance(self):
    """Canonical text of everything the captions state but the direction."""
    return _canonical_text(self._kinds())

  def description(self):
    """Canonical text of everything the captions state: two clips with the same description
    cannot be told apart by their captions."""
    return _canonical_text(self._kinds(), self.direction)

  def mover_centre(self, offset):
    """(x, y) of the mover at `offset` along its path: -1 at the start, 0 mid-way, 1 at the end."""
    dx, dy = DIRECTIONS[self.direction]
    along = 0.5 * self.travel * offset
    return (self.path_centre[0] + dx * along, self.path_centre[1] + dy * along)

  @property
  def start(self):
    """(x, y) of the mover in the first frame."""
    return self.mover_centre(-1.0)

  @property
  def end(self):
    """(x, y) of the mover in the last frame."""
    return self.mover_centre(1.0)

  def frame_scene(self, frame, num_frames):
    """synthetic.Scene of frame `frame` (0-based) of a `num_frames`-frame clip."""
    # An integer numerator: frames k and num_frames - 1 - k get exactly opposite offsets.
    offset = (2 * frame - (num_frames - 1)) / (num_frames - 1)
    x, y = self.mover_centre(offset)
    mover = synthetic.SceneObject(colour=self.colour, shape=self.shape, size=self.size,
                                  cell=_cell_at(x, y), centre=(x, y), radius=self.radius,
                                  shade=self.shade)
    return synthetic.Scene(objects=(self.distractor, mover), background=self.background,
                           gradient_angle=self.gradient_angle)


def _cell_at(x, y):
  """Name of the 3x3 grid cell (synthetic.CELLS) holding the point (x, y) in image units."""
  row, col = (min(int(3 * v), 2) for v in (y, x))
  return synthetic.CELLS[3 * row + col]


def render_clip(spec, num_frames=8, image_size=48):
  """Draws the clip of `spec`: uint8 [num_frames, image_size, image_size, 3]."""
  return np.stack([synthetic.render_scene(spec.frame_scene(k, num_frames), image_size)
                   for k in range(num_frames)])


# ----------------------------------------------------------------------------- drawing a group


def _canonical_text(appearance, direction=""):
  """ "large red square moves left; small green circle stays" of `appearance`, ((colour, shape,
  size) of the mover, (...) of the distractor), and `direction` ("": the appearance's text)."""
  (colour, shape, size), (other_colour, other_shape, other_size) = appearance
  moves = f"moves {direction}" if direction else "moves"
  return f"{size} {colour} {shape} {moves}; {other_size} {other_colour} {other_shape} stays"


@functools.cache
def _split_appearances(split):
  """Every appearance ((colour, shape, size) of the mover, (...) of the distractor) that belongs
  to `split`, in a fixed order. The colours differ, so that a caption's colour word names one
  object."""
  kinds = list(itertools.product(synthetic.COLOURS, synthetic.SHAPES, synthetic.SIZES))
  return tuple((mover, other) for mover in kinds for other in kinds
               if other[0] != mover[0]
               and synthetic.split_of(_canonical_text((mover, other))) == split)


def _distractor_coordinate(path_coordinate, gap, radius, rng):
  """A distractor centre coordinate in [radius, 1 - radius] at least `gap` from
  `path_coordinate`, on a side of it drawn among those with room (one always has)."""
  sides = [(low, high) for low, high in ((radius, path_coordinate - gap),
                                         (path_coordinate + gap, 1 - radius)) if low <= high]
  low, high = sides[int(rng.integers(len(sides)))]
  return float(synthetic.uniform_in((low, high), rng.random()))


def _realise_group(appearance, rng):
  """The ClipSpecs of one group: `appearance` realised once, then one clip per direction in an
  order drawn by `rng`.

  The path centre leaves room for the whole path in every direction; the distractor sits in a
  corner relative to it, clear of the boxes the mover sweeps horizontally and vertically.
  """
  (colour, shape, size), (other_colour, other_shape, other_size) = appearance
  radius, other_radius = synthetic.RADIUS[size], synthetic.RADIUS[other_size]
  travel = float(synthetic.uniform_in(_TRAVEL_RANGE, rng.random()))
  margin = radius + travel / 2
  path_centre = tuple(float(synthetic.uniform_in((margin, 1 - margin), u)) for u in rng.random(2))
  gap = radius + _GAP + other_radius
  x, y = (_distractor_coordinate(c, gap, other_radius, rng) for c in path_centre)
  shade, other_shade = (float(synthetic.uniform_in(synthetic.SHADE_RANGE, u))
                        for u in rng.random(2))
  distractor = synthetic.SceneObject(colour=other_colour, shape=other_shape, size=other_size,
                                     cell=_cell_at(x, y), centre=(x, y), radius=other_radius,
                                     shade=other_shade)
  # A scene without objects: only its background is drawn.
  backdrop = synthetic.realise_layout((), rng)
  names = list(DIRECTIONS)
  return tuple(
      ClipSpec(colour=colour, shape=shape, size=size, direction=names[d],
               path_centre=path_centre, travel=travel, radius=radius, shade=shade,
               distractor=distractor, background=backdrop.background,
               gradient_angle=backdrop.gradient_angle)
      for d in rng.permutation(DIRECTIONS_PER_GROUP))


# ----------------------------------------------------------------------------- captions

_DIRECTION_PHRASES = {
    "left": ("to the left", "leftwards", "towards the left"),
    "right": ("to the right", "rightwards", "towards the right"),
    "up": ("up", "upwards", "towards the top"),
    "down": ("down", "downwards", "towards the bottom"),
}
_VERBS = (("moves", "moving"), ("slides", "sliding"), ("travels", "travelling"),
          ("glides", "gliding"), ("drifts", "drifting"))
_STILL_PHRASES = ("stays still", "does not move", "stands still", "stays put")
_STILL_ADJECTIVES = ("static", "motionless", "stationary")


def _towards(spec, rng):
  """ "to the left", "upwards" ..."""
  return pick_one(rng, _DIRECTION_PHRASES[spec.direction])


def _past_caption(spec, rng):
  """ "a big red square slides to the left past a small green circle that stays still"."""
  return (f"{with_article(noun_phrase(spec, rng))} {pick_one(rng, _VERBS)[0]} "
          f"{_towards(spec, rng)} past "
          f"{with_article(noun_phrase(spec.distractor, rng))} that {pick_one(rng, _STILL_PHRASES)}")


def _labelled_caption(spec, rng):
  """ "moving left: a big red square, beside a motionless small green circle"."""
  still = pick_one(rng, _STILL_ADJECTIVES)
  return (f"moving {spec.direction}: {with_article(noun_phrase(spec, rng))}, beside "
          f"{with_article(still + ' ' + noun_phrase(spec.distractor, rng))}")


def _while_caption(spec, rng):
  """ "a small green circle stays put while a big red square drifts upwards"."""
  return (f"{with_article(noun_phrase(spec.distractor, rng))} "
          f"{pick_one(rng, _STILL_PHRASES)} while {with_article(noun_phrase(spec, rng))} "
          f"{pick_one(rng, _VERBS)[0]} {_towards(spec, rng)}")


def _heading_caption(spec, rng):
  """ "a big red square heading towards the top and a stationary small green circle"."""
  still = pick_one(rng, _STILL_ADJECTIVES)
  return (f"{with_article(noun_phrase(spec, rng))} heading {_towards(spec, rng)} and "
          f"{with_article(still + ' ' + noun_phrase(spec.distractor, rng))}")


def _video_of_caption(spec, rng):
  """ "a video of a big red square sliding down next to a small green circle that does not
  move"."""
  return (f"a video of {with_article(noun_phrase(spec, rng))} {pick_one(rng, _VERBS)[1]} "
          f"{_towards(spec, rng)} next to {with_article(noun_phrase(spec.distractor, rng))} "
          f"that {pick_one(rng, _STILL_PHRASES)}")


def _sizeless_caption(spec, rng):
  """ "the red square travels rightwards and the green circle stands still"."""
  return (f"the {noun_phrase(spec, rng, with_size=False)} {pick_one(rng, _VERBS)[0]} "
          f"{_towards(spec, rng)} and the {noun_phrase(spec.distractor, rng, with_size=False)} "
          f"{pick_one(rng, _STILL_PHRASES)}")


# Structurally different sentences: 5 different templates give 5 different captions.
_TEMPLATES = (_past_caption, _labelled_caption, _while_caption, _heading_caption,
              _video_of_caption, _sizeless_caption)


def describe_clip(spec, rng):
  """5 distinct captions of the clip of `spec`, each naming the colour, shape and direction of
  the mover and the colour and shape of the static distractor; all but one template also name
  both sizes."""
  templates = rng.choice(len(_TEMPLATES), size=synthetic.CAPTIONS_PER_IMAGE, replace=False)
  return [_TEMPLATES[t](spec, rng) for t in templates]


# ----------------------------------------------------------------------------- the source


class SyntheticVideos:
  """Random-access source (grain-compatible, picklable) of synthetic clips with 5 captions each.

  Item i is {"video": ArrayClip(uint8 [num_frames, image_size, image_size, 3]),
  "name": "synthetic_video/<split>/<i>", "captions": list of 5 str, "image_id": first_id + i}, a
  pure function of (seed, split, i); the registry numbers the eval clips after the train clips.
  Clips 4g .. 4g + 3 form group g (see the module docstring).
  """

  def __init__(self, num_videos, split="train", seed=0, image_size=48, num_frames=8, first_id=0):
    if split not in synthetic.SPLIT_IDS:
      raise ValueError(f"split must be one of {sorted(synthetic.SPLIT_IDS)}, got {split!r}")
    if num_videos < 1:
      raise ValueError(f"num_videos must be positive, got {num_videos}")
    if num_frames < 2:
      raise ValueError(f"num_frames must be >= 2 (a motion needs two frames), got {num_frames}")
    self.num_videos = int(num_videos)
    self.split = split
    self.seed = int(seed)
    self.image_size = int(image_size)
    self.num_frames = int(num_frames)
    self.first_id = int(first_id)
    # Group g has appearance _split_appearances(split)[order[g % len(order)]].
    self._order = self._rng().permutation(len(_split_appearances(split)))

  def __len__(self):
    return self.num_videos

  def _rng(self, *stream):
    """The generator of `stream` (none, or group or clip numbers) of this seed and split."""
    return np.random.default_rng([self.seed, synthetic.SPLIT_IDS[self.split], *stream])

  def clip_spec(self, index):
    """The ClipSpec of clip `index`."""
    if not 0 <= index < self.num_videos:
      raise IndexError(f"video index {index} out of range [0, {self.num_videos})")
    group, slot = divmod(int(index), DIRECTIONS_PER_GROUP)
    appearance = _split_appearances(self.split)[self._order[group % len(self._order)]]
    return _realise_group(appearance, self._rng(group, 0))[slot]

  def _describe(self, index, spec):
    """The 5 captions of clip `index`, whose ClipSpec is `spec`."""
    return describe_clip(spec, self._rng(int(index), 1))

  def captions(self, index):
    """The 5 captions of clip `index`, without drawing its frames."""
    return self._describe(index, self.clip_spec(index))

  # Clips 4g .. 4g + 3 differ only in direction: `input.group_batches` keeps them in one batch.
  batch_group_size = DIRECTIONS_PER_GROUP

  def caption_counts(self):
    """int64 [num_videos]: 5 captions per clip."""
    return np.full(self.num_videos, synthetic.CAPTIONS_PER_IMAGE, np.int64)

  def __getitem__(self, index):
    spec = self.clip_spec(index)
    name = f"synthetic_video/{self.split}/{int(index)}"
    frames = render_clip(spec, self.num_frames, self.image_size)
    return {"video": ArrayClip(frames, name), "name": name,
            "captions": self._describe(index, spec), "image_id": self.first_id + int(index)}


def direction_twins(source):
  """The clips that differ from each clip only in direction, for recall restricted to them.

  Args:
    source: anything with len() and clip_spec(i) -> ClipSpec, e.g. a SyntheticVideos.
  Returns:
    list of len(source) int64 arrays: twins[i] holds, ascending, every j of `source` whose clip
    has the same appearance (ClipSpec.appearance: mover and distractor colour, shape and size)
    and another direction. In SyntheticVideos these include the rest of i's group.
  """
  specs = [source.clip_spec(i) for i in range(len(source))]
  by_appearance = collections.defaultdict(list)
  for i, spec in enumerate(specs):
    by_appearance[spec.appearance()].append(i)
  return [np.array([j for j in by_appearance[spec.appearance()]
                    if specs[j].direction != spec.direction], np.int64) for spec in specs]


def appearance_groups(source):
  """int64 [len(source)]: one label per appearance (ClipSpec.appearance), numbered in order of
  first occurrence, so clips share a label exactly when they differ at most in direction (the
  groups of the direction-restricted recall, evaluators/retrieval.WithinGroupEvaluator)."""
  labels = {}
  return np.array([labels.setdefault(source.clip_spec(i).appearance(), len(labels))
                   for i in range(len(source))], np.int64)
