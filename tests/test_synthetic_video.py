"""The synthetic video data (issue 10; design §8.11): determinism, split disjointness, captions
that agree with the clip and with the motion the pixels show, directions that only the frame
order reveals, and direction twins."""

import collections
import pickle
import re

import numpy as np
import pytest

from configs import common
from cots_jax.data import synthetic
from cots_jax.data import synthetic_video
from cots_jax.data import tokenizer as tokenizer_lib
from cots_jax.data.video import ArrayClip

MAX_LEN = common.base_config("tiny").input.max_len

# ----------------------------------------------------------------------------- test-side readers
# Written from the caption wording and the palette's colours, not from the module's tables.

_COLOUR_WORDS = {"red", "orange", "yellow", "green", "cyan", "blue", "purple", "white"}
_SHAPE_WORDS = {"circle", "square", "triangle", "cross"}
_SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
_DIRECTION_WORDS = {"left": "left", "leftwards": "left", "right": "right", "rightwards": "right",
                    "up": "up", "upwards": "up", "top": "up",
                    "down": "down", "downwards": "down", "bottom": "down"}
_STILL_WORDS = {"still", "static", "motionless", "stationary", "put", "not"}
_CLAUSE_BREAK = re.compile(r",? (?:past|while|and|beside|next to) |; ")
# Unit steps (dx, dy) in pixels; rows grow downwards.
_STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def parse_caption(caption):
  """{"moving": (colour, shape, size or None, direction), "still": (colour, shape, size or
  None)}: the caption holds one clause with a direction word and one with a word of stillness."""
  parsed = {}
  for clause in _CLAUSE_BREAK.split(caption):
    words = clause.replace(":", " ").split()
    colours = [w for w in words if w in _COLOUR_WORDS]
    shapes = [w for w in words if w in _SHAPE_WORDS]
    sizes = [_SIZE_WORDS[w] for w in words if w in _SIZE_WORDS]
    directions = [_DIRECTION_WORDS[w] for w in words if w in _DIRECTION_WORDS]
    still = _STILL_WORDS.intersection(words)
    assert len(colours) == 1 and len(shapes) == 1 and len(sizes) <= 1, caption
    assert bool(still) != bool(directions) and len(directions) <= 1, caption
    thing = (colours[0], shapes[0], sizes[0] if sizes else None)
    role = "still" if still else "moving"
    assert role not in parsed, caption
    parsed[role] = thing if still else thing + (directions[0],)
  assert set(parsed) == {"moving", "still"}, caption
  return parsed


def _chromaticities():
  """(names, float [8, 3]): the palette's colours scaled to a maximum channel of 1."""
  rgb = np.array(list(synthetic.COLOURS.values()), float)
  return list(synthetic.COLOURS), rgb / rgb.max(axis=1, keepdims=True)


def colour_mask(frames, colour):
  """bool [T, H, W]: the pixels of uint8 [T, H, W, 3] `frames` that are far brighter than the
  dark background and whose chromaticity is nearest the palette colour named `colour`."""
  names, palette = _chromaticities()
  pixels = frames.astype(float)
  value = pixels.max(axis=-1)
  unit = pixels / np.maximum(value, 1)[..., None]
  nearest = np.argmin(((unit[..., None, :] - palette) ** 2).sum(-1), axis=-1)
  return (value >= 120) & (nearest == names.index(colour))


def centroids(mask):
  """float [T, 2]: (x, y) in pixels of the True pixels of each frame of bool [T, H, W] `mask`."""
  assert mask.any(axis=(1, 2)).all(), "an object is missing from a frame"
  return np.array([[xs.mean(), ys.mean()] for ys, xs in (np.nonzero(frame) for frame in mask)])


def _cell(x, y):
  """(row, col) of the 3x3 grid cell holding the point (x, y) in image units."""
  return min(int(3 * y), 2), min(int(3 * x), 2)


def _spec_appearance(spec):
  """Everything the captions state of a clip but its direction, read field by field."""
  d = spec.distractor
  return (spec.colour, spec.shape, spec.size, d.colour, d.shape, d.size)


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.load_tokenizer()


def test_items_are_a_function_of_seed_split_and_index():
  a = synthetic_video.SyntheticVideos(12, "train", seed=3)
  b = synthetic_video.SyntheticVideos(12, "train", seed=3)
  copy = pickle.loads(pickle.dumps(a))
  for i in (0, 5, 11):
    item = a[i]
    clip = item["video"]
    assert isinstance(clip, ArrayClip) and clip.num_frames == 8
    frames = clip.read(np.arange(8))
    assert frames.shape == (8, 48, 48, 3) and frames.dtype == np.uint8
    assert item["name"] == f"synthetic_video/train/{i}" and item["image_id"] == i
    assert len(item["captions"]) == 5 and item["captions"] == a.captions(i) == b[i]["captions"]
    assert a.clip_spec(i) == b.clip_spec(i) == copy.clip_spec(i)
    np.testing.assert_array_equal(frames, b[i]["video"].read(np.arange(8)))
    np.testing.assert_array_equal(frames, copy[i]["video"].read(np.arange(8)))
    np.testing.assert_array_equal(frames, synthetic_video.render_clip(a.clip_spec(i), 8, 48))
  specs = [a.clip_spec(i) for i in range(12)]
  assert specs != [synthetic_video.SyntheticVideos(12, "train", 4).clip_spec(i) for i in range(12)]
  assert specs != [synthetic_video.SyntheticVideos(12, "eval", 3).clip_spec(i) for i in range(12)]
  assert len(a) == 12
  np.testing.assert_array_equal(a.caption_counts(), np.full(12, 5))
  assert a.caption_counts().dtype == np.int64


def test_frame_count_and_size_follow_the_arguments():
  ds = synthetic_video.SyntheticVideos(4, "eval", seed=0, image_size=32, num_frames=4)
  frames = ds[3]["video"].read(np.arange(4))
  assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
  np.testing.assert_array_equal(frames, synthetic_video.render_clip(ds.clip_spec(3), 4, 32))


def test_source_rejects_bad_arguments():
  with pytest.raises(ValueError, match="split"):
    synthetic_video.SyntheticVideos(10, "test")
  with pytest.raises(ValueError, match="num_videos"):
    synthetic_video.SyntheticVideos(0)
  with pytest.raises(ValueError, match="num_frames"):
    synthetic_video.SyntheticVideos(10, num_frames=1)
  for index in (10, -1):
    with pytest.raises(IndexError, match="out of range"):
      synthetic_video.SyntheticVideos(10)[index]


def test_train_and_eval_descriptions_are_disjoint_and_attributes_spread():
  train = synthetic_video.SyntheticVideos(1200, "train", seed=0)
  evals = synthetic_video.SyntheticVideos(300, "eval", seed=0)
  train_specs = [train.clip_spec(i) for i in range(len(train))]
  eval_specs = [evals.clip_spec(i) for i in range(len(evals))]
  train_descriptions = {s.description() for s in train_specs}
  eval_descriptions = [s.description() for s in eval_specs]
  assert not train_descriptions & set(eval_descriptions)
  assert not {_spec_appearance(s) for s in train_specs} & {_spec_appearance(s) for s in eval_specs}
  assert not {s.appearance() for s in train_specs} & {s.appearance() for s in eval_specs}
  assert len(set(eval_descriptions)) == len(eval_descriptions)
  other = synthetic_video.SyntheticVideos(300, "eval", seed=1)
  assert not train_descriptions & {other.clip_spec(i).description() for i in range(300)}
  clips_with = collections.Counter()
  for s in train_specs:
    assert s.colour != s.distractor.colour
    clips_with.update({("colour", s.colour), ("shape", s.shape), ("size", s.size),
                       ("direction", s.direction), ("still colour", s.distractor.colour),
                       ("still shape", s.distractor.shape), ("still size", s.distractor.size)})
  expected = ([(k, c) for k in ("colour", "still colour") for c in _COLOUR_WORDS]
              + [(k, s) for k in ("shape", "still shape") for s in _SHAPE_WORDS]
              + [(k, s) for k in ("size", "still size") for s in ("small", "large")]
              + [("direction", d) for d in _STEPS])
  assert set(clips_with) == set(expected)
  for value in expected:
    assert clips_with[value] >= 0.05 * len(train_specs), (value, clips_with[value])


def test_captions_name_colour_shape_and_direction_and_fit_max_len(tokenizer):
  captions = []
  for split, count in (("train", 200), ("eval", 100)):
    ds = synthetic_video.SyntheticVideos(count, split, seed=2)
    for i in range(count):
      spec, five = ds.clip_spec(i), ds.captions(i)
      assert len(set(five)) == 5, five
      for caption in five:
        parsed = parse_caption(caption)
        colour, shape, size, direction = parsed["moving"]
        assert (colour, shape, direction) == (spec.colour, spec.shape, spec.direction), caption
        assert size in (None, spec.size), caption
        d = spec.distractor
        assert parsed["still"][:2] == (d.colour, d.shape), caption
        assert parsed["still"][2] in (None, d.size), caption
      captions += five
  lengths = np.array([len(tokenizer(c)["input_ids"]) for c in captions])  # with [CLS], [SEP]
  assert lengths.max() <= MAX_LEN
  ids = tokenizer(captions)["input_ids"]
  assert tokenizer.unk_token_id not in {t for row in ids for t in row}


@pytest.mark.parametrize("split", ["train", "eval"])
def test_the_pixels_move_as_the_captions_say(split):
  """The mover (found by its caption colour) advances every frame along the stated direction,
  with the stated size, inside the frame; the still object (its colour) stays put."""
  ds = synthetic_video.SyntheticVideos(16, split, seed=5)
  for i in range(len(ds)):
    item = ds[i]
    frames = item["video"].read(np.arange(8))
    for caption in item["captions"]:
      parsed = parse_caption(caption)
      colour, _, size, direction = parsed["moving"]
      mover = colour_mask(frames, colour)
      path = centroids(mover)
      along = path @ np.array(_STEPS[direction])
      across = path @ np.array(_STEPS[direction][::-1])
      assert (np.diff(along) > 0.5).all(), (caption, along)  # pixels per frame
      assert along[-1] - along[0] > 0.2 * 48, (caption, along)
      assert np.ptp(across) < 1, (caption, across)
      assert not (mover[:, 0].any() or mover[:, -1].any() or mover[:, :, 0].any()
                  or mover[:, :, -1].any()), caption
      ys, xs = np.nonzero(mover[0])
      width = max(np.ptp(ys), np.ptp(xs)) + 1
      assert size in (None, "large" if width > 0.17 * 48 else "small"), (caption, width)
      still = centroids(colour_mask(frames, parsed["still"][0]))
      assert np.ptp(still, axis=0).max() < 1e-9, caption


def test_only_the_frame_order_tells_opposite_directions_apart():
  """A clip is its opposite twin played backwards (so the frame set, and any order-blind pooling
  of it, is the same), and the same start cells occur for both directions of an axis."""
  ds = synthetic_video.SyntheticVideos(8, "eval", seed=1)
  by_direction = {}
  for group in range(2):
    for i in range(4 * group, 4 * group + 4):
      by_direction[group, ds.clip_spec(i).direction] = ds[i]["video"].read(np.arange(8))
    for first, second in (("left", "right"), ("up", "down")):
      np.testing.assert_array_equal(by_direction[group, first][::-1],
                                    by_direction[group, second])
    assert not np.array_equal(by_direction[group, "left"], by_direction[group, "right"])
  specs = [synthetic_video.SyntheticVideos(800, "train", 0).clip_spec(i) for i in range(800)]
  start_cells = collections.defaultdict(collections.Counter)
  for s in specs:
    start_cells[s.direction][_cell(*s.start)] += 1
  for first, second in (("left", "right"), ("up", "down")):
    shared = set(start_cells[first]) & set(start_cells[second])
    for direction in (first, second):
      cells = start_cells[direction]
      assert sum(cells[c] for c in shared) >= 0.3 * sum(cells.values()), (direction, cells)


def test_objects_stay_inside_the_frame_and_apart():
  ds = synthetic_video.SyntheticVideos(1000, "train", seed=3)
  for i in range(len(ds)):
    s = ds.clip_spec(i)
    d = s.distractor
    for x, y in (s.start, s.end):
      assert s.radius <= min(x, y) and max(x, y) <= 1 - s.radius
    assert d.radius <= min(d.centre) and max(d.centre) <= 1 - d.radius
    # The box the mover sweeps and the still object's box are at least 2 px (of 48) apart.
    low = np.minimum(s.start, s.end) - s.radius
    high = np.maximum(s.start, s.end) + s.radius
    gaps = np.maximum(low - (np.array(d.centre) + d.radius), (np.array(d.centre) - d.radius) - high)
    assert gaps.max() >= 0.04 - 1e-9, (i, s)
    assert np.isclose(np.hypot(*np.subtract(s.end, s.start)), s.travel)


def test_direction_twins_differ_only_in_direction():
  ds = synthetic_video.SyntheticVideos(302, "eval", seed=0)
  twins = synthetic_video.direction_twins(ds)
  specs = [ds.clip_spec(i) for i in range(len(ds))]
  expected = [[j for j, other in enumerate(specs)
               if _spec_appearance(other) == _spec_appearance(s) and other.direction != s.direction]
              for s in specs]
  assert [t.tolist() for t in twins] == expected
  assert all(t.dtype == np.int64 for t in twins)
  opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
  with_opposite = sum(opposite[s.direction] in {specs[j].direction for j in t}
                      for s, t in zip(specs, twins))
  assert with_opposite >= 300  # every clip of the 75 complete groups of four
  assert all(len(t) for t in twins)


def test_appearance_groups_label_each_clip_with_its_direction_twins():
  ds = synthetic_video.SyntheticVideos(42, "eval", seed=1)
  groups = synthetic_video.appearance_groups(ds)
  twins = synthetic_video.direction_twins(ds)
  assert groups.dtype == np.int64 and groups.shape == (42,)
  assert groups[0] == 0 and set(np.diff(np.unique(groups))) == {1}  # first-occurrence numbering
  for i, clip_twins in enumerate(twins):
    assert set(np.flatnonzero(groups == groups[i])) == {i, *clip_twins.tolist()}
