"""The synthetic captions data (design §6, §8.11): determinism, split disjointness, attribute
spread, caption length, and captions that agree with what the pixels show."""

import colorsys
import collections
import dataclasses
import re

import numpy as np
import pytest
from scipy import ndimage

from configs import common
from cots_jax.data import synthetic
from cots_jax.data import tokenizer as tokenizer_lib

MAX_LEN = common.base_config("tiny").input.max_len

# ----------------------------------------------------------------------------- test-side readers
# Written from the caption wording and what a colour looks like, not from the module's tables.

_HUES = {"red": 0, "orange": 30, "yellow": 55, "green": 125, "cyan": 187, "blue": 225,
         "purple": 275}
_COLOUR_WORDS = set(_HUES) | {"white"}
_SHAPE_WORDS = {"circle", "square", "triangle", "cross"}
_SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
_COUNT_PREFIX = re.compile(r"^(?:an image with )?(one|two|three) (?:shapes?|objects?)[:,] ")


def _cell_of_words(words):
  """(row, col) in the 3x3 grid named by position words such as "upper left corner"."""
  words = set(words)
  row = 0 if words & {"top", "upper"} else 2 if words & {"bottom", "lower"} else 1
  col = 0 if "left" in words else 2 if "right" in words else 1
  if (row, col) == (1, 1):
    assert words & {"center", "middle"}, words
  else:
    assert not words & {"center", "middle"}, words
  return row, col


def parse_caption(caption):
  """(stated count or None, sorted list of (cell, colour, shape, size or None)), one object per
  clause; clauses are separated by , ; . or "and"."""
  match = _COUNT_PREFIX.match(caption)
  stated = ("one", "two", "three").index(match.group(1)) + 1 if match else None
  body = caption[match.end():] if match else caption
  objects = []
  for clause in filter(None, (c.strip() for c in re.split(r"[;,.]| and ", body))):
    words = clause.replace(":", " ").split()
    colours = [w for w in words if w in _COLOUR_WORDS]
    shapes = [w for w in words if w in _SHAPE_WORDS]
    sizes = [_SIZE_WORDS[w] for w in words if w in _SIZE_WORDS]
    assert len(colours) == 1 and len(shapes) == 1 and len(sizes) <= 1, caption
    objects.append((_cell_of_words(words), colours[0], shapes[0], sizes[0] if sizes else None))
  return stated, sorted(objects)


def _colour_name(rgb):
  hue, saturation, _ = colorsys.rgb_to_hsv(*(np.asarray(rgb) / 255.0))
  if saturation < 0.25:
    return "white"
  hue = hue * 360
  return min(_HUES, key=lambda name: min(abs(hue - _HUES[name]), 360 - abs(hue - _HUES[name])))


def _shape_name(mask):
  """Shape of a bool [h, w] object mask cut to its bounding box, from how much of the rows near
  its top and bottom it fills: a triangle (apex up) fills far more at the bottom, a cross only its
  arm's width (~40%), a circle a chord (~75%), a square everything."""
  height = mask.shape[0]

  def band(start, stop):
    first = int(round(start * height))
    return mask[first:max(int(round(stop * height)), first + 1)].mean()

  top, bottom = band(0.08, 0.25), band(0.75, 0.92)
  if bottom - top > 0.25:
    return "triangle"
  fill = (top + bottom) / 2
  return "cross" if fill < 0.6 else "circle" if fill < 0.93 else "square"


def read_pixels(image):
  """Objects seen in a uint8 [H, W, 3] image: sorted list of (cell, colour, shape, size).

  Foreground is what is much brighter than the dark background; objects are its connected
  components; the cell is the bounding box centre's; large objects are about twice as wide as
  small ones.
  """
  height = image.shape[0]
  value = image.max(axis=-1)
  labels, _ = ndimage.label(value >= 120)
  objects = []
  for index, box in enumerate(ndimage.find_objects(labels), start=1):
    mask = labels[box] == index
    ys, xs = np.nonzero(mask)
    ys, xs = ys + box[0].start, xs + box[1].start
    centre_y, centre_x = (box[0].start + box[0].stop) / 2, (box[1].start + box[1].stop) / 2
    cell = (int(3 * centre_y // height), int(3 * centre_x // height))
    core = value[ys, xs] >= 0.9 * value[ys, xs].max()
    colour = _colour_name(image[ys[core], xs[core]].mean(axis=0))
    size = "large" if max(mask.shape) > 0.17 * height else "small"
    objects.append((cell, colour, _shape_name(mask), size))
  return sorted(objects)


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.load_tokenizer()


def test_items_are_a_function_of_seed_split_and_index():
  a = synthetic.SyntheticCaptions(20, "train", seed=3)
  b = synthetic.SyntheticCaptions(20, "train", seed=3)
  other_seed = synthetic.SyntheticCaptions(20, "train", seed=4)
  for i in (0, 7, 19):
    item = a[i]
    assert item["image"].shape == (48, 48, 3) and item["image"].dtype == np.uint8
    assert item["image_id"] == i and len(item["captions"]) == 5
    np.testing.assert_array_equal(item["image"], b[i]["image"])
    assert item["captions"] == b[i]["captions"] == a.captions(i)
    assert a.scene(i) == b.scene(i)
    np.testing.assert_array_equal(item["image"], synthetic.render_scene(a.scene(i), 48))
  assert [a.scene(i) for i in range(20)] != [other_seed.scene(i) for i in range(20)]
  assert [a.scene(i) for i in range(20)] != [synthetic.SyntheticCaptions(20, "eval", 3).scene(i)
                                             for i in range(20)]
  assert len(a) == 20


def _scene_attributes(scene):
  return sorted((divmod(synthetic.CELLS.index(o.cell), 3), o.colour, o.shape, o.size)
                for o in scene.objects)


@pytest.mark.parametrize("image_size", [40, 96])
def test_any_image_size_draws_the_scene(image_size):
  ds = synthetic.SyntheticCaptions(20, "train", seed=0, image_size=image_size)
  for i in range(len(ds)):
    image = ds[i]["image"]
    assert image.shape == (image_size, image_size, 3)
    seen, drawn = read_pixels(image), _scene_attributes(ds.scene(i))
    if image_size >= 96:
      assert seen == drawn
    else:  # too few pixels to tell small shapes apart reliably
      assert [o[:2] + o[3:] for o in seen] == [o[:2] + o[3:] for o in drawn]


def test_source_rejects_bad_arguments():
  with pytest.raises(ValueError, match="split"):
    synthetic.SyntheticCaptions(10, "test")
  with pytest.raises(ValueError, match="num_images"):
    synthetic.SyntheticCaptions(0)
  with pytest.raises(IndexError):
    synthetic.SyntheticCaptions(10)[10]


def test_train_and_eval_scenes_are_disjoint_and_eval_scenes_nearly_all_distinct():
  train = synthetic.SyntheticCaptions(2000, "train", seed=0)
  evals = synthetic.SyntheticCaptions(500, "eval", seed=0)
  train_scenes = {train.scene(i).description() for i in range(len(train))}
  eval_scenes = [evals.scene(i).description() for i in range(len(evals))]
  assert not train_scenes & set(eval_scenes)
  assert len(set(eval_scenes)) >= 0.95 * len(eval_scenes)
  # A different seed draws other images, but from the same split of the scene space.
  other = synthetic.SyntheticCaptions(500, "eval", seed=1)
  assert not train_scenes & {other.scene(i).description() for i in range(500)}
  assert {synthetic.scene_split(evals.scene(i)) for i in range(500)} == {"eval"}


def test_every_attribute_value_is_shared_by_many_images():
  ds = synthetic.SyntheticCaptions(2000, "train", seed=0)
  images_with = collections.Counter()
  for i in range(len(ds)):
    objects = ds.scene(i).objects
    values = {("count", len(objects))}
    for o in objects:
      values |= {("colour", o.colour), ("shape", o.shape), ("size", o.size), ("cell", o.cell)}
    images_with.update(values)
  expected = ([("colour", c) for c in _COLOUR_WORDS] + [("shape", s) for s in _SHAPE_WORDS]
              + [("size", "small"), ("size", "large"), ("count", 1), ("count", 2), ("count", 3)]
              + [("cell", c) for c in synthetic.CELLS])
  assert set(images_with) == set(expected)
  for value in expected:
    assert images_with[value] >= 0.05 * len(ds), (value, images_with[value])


def test_objects_sit_inside_distinct_cells():
  rng = np.random.default_rng(0)
  for _ in range(300):
    scene = synthetic.sample_scene(rng)
    assert 1 <= len(scene.objects) <= 3
    assert len({o.cell for o in scene.objects}) == len(scene.objects)
    for o in scene.objects:
      row, col = divmod(synthetic.CELLS.index(o.cell), 3)
      x, y = o.centre
      assert col / 3 < x - o.radius and x + o.radius < (col + 1) / 3
      assert row / 3 < y - o.radius and y + o.radius < (row + 1) / 3


def test_background_is_a_dark_low_saturation_gradient():
  rng = np.random.default_rng(1)
  spans = []
  for _ in range(50):
    scene = dataclasses.replace(synthetic.sample_scene(rng), objects=())
    image = synthetic.render_scene(scene, 48).astype(int)
    assert image.max() <= 100
    assert (image.max(axis=-1) - image.min(axis=-1)).max() <= 25
    spans.append(image.sum(-1).max() - image.sum(-1).min())
  assert np.median(spans) > 20  # not uniform


def test_captions_are_five_distinct_and_fit_max_len(tokenizer):
  ds = synthetic.SyntheticCaptions(1000, "train", seed=0)
  captions = []
  for i in range(len(ds)):
    five = ds.captions(i)
    assert len(set(five)) == 5
    captions += five
  lengths = np.array([len(tokenizer(c)["input_ids"]) for c in captions])  # with [CLS], [SEP]
  assert lengths.max() <= MAX_LEN
  ids = tokenizer(captions[:50])["input_ids"]
  assert tokenizer.unk_token_id not in {t for row in ids for t in row}
  print(f"caption tokens: mean {lengths.mean():.1f}, max {lengths.max()}")


@pytest.mark.parametrize("split", ["train", "eval"])
def test_captions_state_what_the_pixels_show(split):
  """Cell, colour, size and count must agree exactly; shapes (hard to read from the pixels of
  small objects at 48 px) in 95% of the objects and in every large one."""
  ds = synthetic.SyntheticCaptions(200, split, seed=5)
  shapes_right, shapes_read, large_shapes_wrong = 0, 0, 0
  for i in range(len(ds)):
    item = ds[i]
    seen = read_pixels(item["image"])
    for caption in item["captions"]:
      stated_count, stated = parse_caption(caption)
      assert stated_count in (None, len(seen)), caption
      assert len(stated) == len(seen), (caption, seen)
      for (cell, colour, shape, size), (s_cell, s_colour, s_shape, s_size) in zip(seen, stated):
        assert (s_cell, s_colour) == (cell, colour), (caption, seen)
        assert s_size in (None, size), (caption, seen)
        shapes_right += s_shape == shape
        shapes_read += 1
        large_shapes_wrong += size == "large" and s_shape != shape
  assert shapes_right >= 0.95 * shapes_read
  assert large_shapes_wrong == 0
