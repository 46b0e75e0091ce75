"""Image decoding (every PIL mode, arrays, damaged files) and the crop / resize transforms."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image
from PIL import ImageFile

from cots_jax.data import transforms
from cots_jax.data.transforms import BadExampleError

# 2 x 3 blocks of 8 x 8 pixels, each a flat colour: survives lossy formats with small errors.
BLOCK_COLOURS = np.array([[[200, 30, 30], [30, 200, 30], [30, 30, 200]],
                          [[220, 220, 40], [40, 220, 220], [120, 120, 120]]], np.uint8)


def _blocks():
  """uint8 [16, 24, 3]: BLOCK_COLOURS, each repeated over 8 x 8 pixels."""
  return np.repeat(np.repeat(BLOCK_COLOURS, 8, axis=0), 8, axis=1)


def _block_centres(image):
  """uint8 [16, 24, 3] -> float [2, 3, 3]: mean colour of the inner 4 x 4 pixels of each block
  (lossy codecs subsample colour, which bleeds across block edges)."""
  return image.reshape(2, 8, 3, 8, 3)[:, 2:6, :, 2:6].mean(axis=(1, 3))


def _noise(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(image, fmt, **save_args):
  buffer = io.BytesIO()
  image.save(buffer, fmt, **save_args)
  return buffer.getvalue()


def _decode(data, expected_mode=None):
  """decode_image(data), first checking that PIL really opens `data` in `expected_mode`."""
  if expected_mode is not None:
    assert Image.open(io.BytesIO(data)).mode == expected_mode
  image = transforms.decode_image(data, "example")
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
  return image


def _bad_example(data, name="example"):
  with pytest.raises(BadExampleError) as info:
    transforms.decode_image(data, name)
  assert info.value.name == str(name)
  assert str(info.value) == f"{name}: {info.value.reason}"
  return info.value.reason


def test_bad_example_error_formats_and_pickles():
  error = BadExampleError("imgs/a.jpg", "empty file")
  assert isinstance(error, ValueError)
  assert (error.name, error.reason, str(error)) == ("imgs/a.jpg", "empty file",
                                                   "imgs/a.jpg: empty file")
  restored = pickle.loads(pickle.dumps(error))  # as grain worker processes send it back
  assert (type(restored), restored.name, restored.reason, str(restored)) == (
      BadExampleError, "imgs/a.jpg", "empty file", "imgs/a.jpg: empty file")
  assert BadExampleError(7, "x").name == "7"


@pytest.mark.parametrize("fmt, save_args", [("PNG", {}), ("BMP", {}), ("TIFF", {}),
                                            ("WEBP", {"lossless": True})])
def test_rgb_is_exact_through_lossless_formats(fmt, save_args):
  image = _noise(5, 7)
  np.testing.assert_array_equal(
      _decode(_encode(Image.fromarray(image), fmt, **save_args), "RGB"), image)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_rgb_is_close_through_lossy_formats(fmt):
  decoded = _decode(_encode(Image.fromarray(_blocks()), fmt, quality=95), "RGB")
  np.testing.assert_allclose(_block_centres(decoded), BLOCK_COLOURS, atol=3)


def test_grayscale_becomes_three_equal_channels():
  gray = np.arange(0, 256, 17, dtype=np.uint8).reshape(4, 4)
  decoded = _decode(_encode(Image.fromarray(gray), "PNG"), "L")
  np.testing.assert_array_equal(decoded, np.stack([gray] * 3, axis=-1))


def test_one_bit_image_becomes_black_and_white():
  bits = np.array([[1, 0, 0], [0, 1, 1]], bool)
  decoded = _decode(_encode(Image.fromarray(bits), "PNG"), "1")
  np.testing.assert_array_equal(decoded, np.where(bits, 255, 0)[..., None].repeat(3, axis=-1))


def _on_black(colour, alpha):
  """Independent reference: colour [..., C] times alpha [...] / 255, rounded, uint8."""
  return np.round(colour * (alpha[..., None] / 255.0)).astype(np.uint8)


def test_alpha_is_composited_on_black():
  rng = np.random.default_rng(1)
  rgb = _noise(4, 6, seed=2)
  alpha = rng.integers(0, 256, (4, 6), dtype=np.uint8)
  alpha[0, :3] = [0, 255, 128]
  rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
  decoded = _decode(_encode(Image.fromarray(rgba), "PNG"), "RGBA")
  np.testing.assert_array_equal(decoded, _on_black(rgb, alpha))
  np.testing.assert_array_equal(decoded[0, 0], 0)
  np.testing.assert_array_equal(decoded[0, 1], rgb[0, 1])

  gray = rgb[..., 0]
  la = Image.fromarray(np.stack([gray, alpha], axis=-1), "LA")
  expected = _on_black(np.stack([gray] * 3, axis=-1), alpha)
  np.testing.assert_array_equal(_decode(_encode(la, "PNG"), "LA"), expected)


def _palette_image(indices, palette):
  """P-mode PIL image with palette (uint8 [K, 3]) and indices (uint8 [H, W])."""
  image = Image.fromarray(indices, "P")
  image.putpalette(palette.flatten().tolist())
  return image


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP"])
def test_palette_image_decodes_to_its_palette_colours(fmt):
  palette = np.array([[255, 0, 0], [0, 128, 0], [10, 20, 250], [90, 90, 90]], np.uint8)
  indices = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 3, 3]], np.uint8)
  decoded = _decode(_encode(_palette_image(indices, palette), fmt), "P")
  np.testing.assert_array_equal(decoded, palette[indices])


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_transparent_palette_entry_becomes_black(fmt):
  palette = np.array([[255, 0, 0], [0, 128, 0], [10, 20, 250]], np.uint8)
  indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
  data = _encode(_palette_image(indices, palette), fmt, transparency=1)
  expected = np.where(indices[..., None] == 1, 0, palette[indices])
  np.testing.assert_array_equal(_decode(data, "P"), expected)


def test_cmyk_jpeg_decodes_close_to_the_rgb_it_was_made_from():
  data = _encode(Image.fromarray(_blocks()).convert("CMYK"), "JPEG", quality=95)
  np.testing.assert_allclose(_block_centres(_decode(data, "CMYK")), BLOCK_COLOURS, atol=3)


SAMPLES_16 = np.array([[0, 32768, 65535], [257, 25700, 128]], np.uint16)
EXPECTED_16 = np.array([[0, 128, 255], [1, 100, 0]], np.uint8)  # round(v / 257)


@pytest.mark.parametrize("byte_order, fmt, mode", [("<", "PNG", "I;16"), ("<", "TIFF", "I;16"),
                                                   (">", "TIFF", "I;16B")])
def test_16_bit_files_use_the_full_range(byte_order, fmt, mode):
  image = Image.fromarray(SAMPLES_16.astype(byte_order + "u2"))
  decoded = _decode(_encode(image, fmt), mode)
  np.testing.assert_array_equal(decoded, np.stack([EXPECTED_16] * 3, axis=-1))


def test_32_bit_integer_files_are_read_as_16_bit_and_clipped():
  samples = np.array([[0, 32768, 65535, -5, 70000]], np.int32)
  decoded = _decode(_encode(Image.fromarray(samples), "TIFF"), "I")
  np.testing.assert_array_equal(decoded[..., 0], [[0, 128, 255, 0, 255]])


def test_float_files_are_read_as_unit_range_and_clipped():
  samples = np.array([[0.0, 0.2, 0.6, 1.0, 1.5, -0.5]], np.float32)
  decoded = _decode(_encode(Image.fromarray(samples), "TIFF"), "F")
  np.testing.assert_array_equal(decoded, np.stack([[[0, 51, 153, 255, 255, 0]]] * 3, axis=-1))


@pytest.mark.parametrize("byte_order", ["<", ">"])
@pytest.mark.parametrize("layout", ["HW", "HW1", "HW3", "HW4"])
def test_16_bit_arrays_use_the_full_range(layout, byte_order):
  rgb = np.stack([EXPECTED_16] * 3, axis=-1)
  samples = {"HW": SAMPLES_16, "HW1": SAMPLES_16[..., None],
             "HW3": np.stack([SAMPLES_16] * 3, axis=-1),
             "HW4": np.stack([SAMPLES_16] * 3 + [np.full_like(SAMPLES_16, 65535)], axis=-1)}
  decoded = transforms.decode_image(samples[layout].astype(byte_order + "u2"), "example")
  np.testing.assert_array_equal(decoded, rgb)


def test_uint8_and_float_arrays_of_every_layout():
  rgb = _noise(3, 5)
  alpha = np.random.default_rng(3).integers(0, 256, (3, 5), dtype=np.uint8)
  gray = rgb[..., 1]
  cases = [(gray, np.stack([gray] * 3, axis=-1)), (gray[..., None], np.stack([gray] * 3, -1)),
           (rgb, rgb), (np.concatenate([rgb, alpha[..., None]], -1), _on_black(rgb, alpha)),
           (np.array([[[0.0, 0.2, 1.0]]]), np.array([[[0, 51, 255]]]))]
  for array, expected in cases:
    decoded = transforms.decode_image(array, "example")
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, expected)


# Displayed image for each EXIF orientation of the stored array `a` (EXIF 2.3, tag 0x0112).
EXIF_DISPLAY = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),  # 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(EXIF_DISPLAY))
def test_exif_orientation_is_applied(orientation):
  stored = _noise(4, 6)
  exif = Image.Exif()
  exif[0x0112] = orientation
  data = _encode(Image.fromarray(stored), "PNG", exif=exif)
  np.testing.assert_array_equal(_decode(data), EXIF_DISPLAY[orientation](stored))


def test_exif_orientation_is_applied_to_jpeg_photos():
  photo = Image.fromarray(_blocks())
  exif = Image.Exif()
  exif[0x0112] = 6
  upright = _decode(_encode(photo, "JPEG", quality=90))
  rotated = _decode(_encode(photo, "JPEG", quality=90, exif=exif))
  np.testing.assert_array_equal(rotated, np.rot90(upright, -1))


def _jpeg():
  return _encode(Image.fromarray(_noise(32, 48)), "JPEG", quality=90)


def _png():
  return _encode(Image.fromarray(_noise(32, 48)), "PNG")


def _corrupt_png():
  """A PNG with bytes in the middle of its compressed pixel data overwritten."""
  data = bytearray(_png())
  middle = len(data) // 2
  data[middle:middle + 16] = bytes(16)
  return bytes(data)


@pytest.mark.parametrize("make_data, reason", [
    (lambda: None, "no image data (None)"),
    (lambda: b"", "empty file"),
    (lambda: bytearray(), "empty file"),
    (lambda: "photo.jpg", "unsupported image data type str"),
    (lambda: b"a caption, not an image\n", "not an image (cannot identify image file)"),
    (lambda: _png()[:8] + b"\0" * 40, "not an image (cannot identify image file)"),
])
def test_unusable_data_is_a_bad_example_with_its_reason(make_data, reason):
  assert _bad_example(make_data()) == reason


@pytest.mark.parametrize("make_data", [lambda: _jpeg()[:len(_jpeg()) // 2],
                                       lambda: _png()[:len(_png()) // 2],
                                       _corrupt_png])
def test_truncated_or_corrupt_files_are_bad_examples(tmp_path, make_data):
  path = tmp_path / "photo.jpg"
  path.write_bytes(make_data())
  reason = _bad_example(path.read_bytes(), name=path)
  assert reason.startswith("truncated or corrupt image (")
  assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_decompression_bomb_is_a_bad_example(monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 * 48 pixels > 2 * 100: an error
  assert _bad_example(_png()).startswith("decompression bomb (")


def test_mode_without_rgb_conversion_is_a_bad_example(monkeypatch):
  # No file format decodes to "La" (premultiplied LA): PIL cannot convert it to RGB.
  monkeypatch.setattr(transforms.ImageOps, "exif_transpose", lambda _: Image.new("La", (2, 2)))
  assert _bad_example(_png()) == "unsupported image mode La"


@pytest.mark.parametrize("array, reason", [
    (np.zeros((0, 4, 3), np.uint8), "zero-size image (0, 4, 3)"),
    (np.zeros((4, 0), np.uint8), "zero-size image (4, 0, 1)"),
    (np.zeros((5,), np.uint8), "unsupported image array shape (5,)"),
    (np.zeros((4, 4, 2), np.uint8), "unsupported image array shape (4, 4, 2)"),
    (np.zeros((1, 4, 4, 3), np.uint8), "unsupported image array shape (1, 4, 4, 3)"),
    (np.zeros((4, 4, 3), np.int64), "unsupported image dtype int64"),
    (np.zeros((4, 4, 3), bool), "unsupported image dtype bool"),
    (np.array([[0.5, np.nan]], np.float32), "non-finite pixel values"),
])
def test_unusable_arrays_are_bad_examples(array, reason):
  assert _bad_example(array, name=12) == reason


def test_random_resized_crop_shape_and_determinism():
  image = _noise(30, 50)
  crop = lambda seed: transforms.random_resized_crop(image, np.random.default_rng(seed), 16)
  out = crop(0)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(crop(0), out)
  assert len({crop(seed).tobytes() for seed in range(5)}) == 5


def test_random_resized_crop_flip_mirrors_the_same_crop():
  image = _noise(30, 50)
  crop = lambda flip_prob: transforms.random_resized_crop(
      image, np.random.default_rng(4), 16, flip_prob=flip_prob)
  np.testing.assert_array_equal(crop(1.0), crop(0.0)[:, ::-1])
  assert crop(1.0).flags.c_contiguous


def test_random_resized_crop_of_the_whole_image_is_a_plain_resize():
  image = _noise(24, 24)
  resized = np.asarray(Image.fromarray(image).resize((10, 10), Image.Resampling.BICUBIC))
  crop = lambda flip_prob, seed=0: transforms.random_resized_crop(
      image, np.random.default_rng(seed), 10, scale=(1, 1), ratio=(1, 1), flip_prob=flip_prob)
  np.testing.assert_array_equal(crop(0.0), resized)
  np.testing.assert_array_equal(crop(1.0), resized[:, ::-1])
  flipped = [np.array_equal(crop(0.5, seed), resized[:, ::-1]) for seed in range(200)]
  assert 70 < sum(flipped) < 130


def test_random_resized_crop_takes_windows_of_the_drawn_size_everywhere():
  image = _noise(40, 40)
  corners = set()
  for seed in range(100):
    out = transforms.random_resized_crop(image, np.random.default_rng(seed), 20,
                                         scale=(0.25, 0.25), ratio=(1, 1), flip_prob=0.0)
    # A 20 x 20 window resized to 20 x 20 is copied exactly: find where it came from.
    found = [(top, left) for top in range(21) for left in range(21)
             if np.array_equal(out, image[top:top + 20, left:left + 20])]
    assert len(found) == 1
    corners |= set(found)
  assert len(corners) > 50
  for offsets in zip(*corners):  # tops, then lefts: both reach near 0 and near 20
    assert min(offsets) <= 2 and max(offsets) >= 18


def test_random_resized_crop_falls_back_to_the_centre():
  image = _noise(10, 40)  # no square box of the full area fits: the centre square is used
  out = transforms.random_resized_crop(image, np.random.default_rng(0), 10, scale=(1, 1),
                                       ratio=(1, 1), flip_prob=0.0)
  np.testing.assert_array_equal(out, image[:, 15:25])


def test_resize_center_crop_keeps_the_centre():
  tall = np.zeros((40, 20, 3), np.uint8)
  tall[20:] = 255  # top half black, bottom half white
  out = transforms.resize_center_crop(tall, 20)
  assert out.shape == (20, 20, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, tall[10:30])

  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, :10, 0] = wide[:, 10:30, 1] = wide[:, 30:, 2] = 255  # red | green | blue
  np.testing.assert_array_equal(transforms.resize_center_crop(wide, 20), wide[:, 10:30])
  small = transforms.resize_center_crop(wide, 10)
  assert small.shape == (10, 10, 3)
  np.testing.assert_allclose(small[:, 2:8], np.broadcast_to([0, 255, 0], (10, 6, 3)), atol=1)

  square = _noise(12, 12)
  np.testing.assert_array_equal(transforms.resize_center_crop(square, 12), square)


def _smooth(height, width, seed=0):
  """uint8 [height, width, 3]: 6 x 8 noise blown up bicubic, detail as smooth as a photo's."""
  return np.asarray(Image.fromarray(_noise(6, 8, seed)).resize((width, height),
                                                               Image.Resampling.BICUBIC))


@pytest.mark.parametrize("shape, expected", [((90, 120), (30, 40)), ((120, 90), (40, 30)),
                                             ((45, 100), (30, 67)), ((30, 50), (30, 50)),
                                             ((20, 50), (20, 50))])
def test_resize_shorter_side_keeps_the_aspect_and_never_upscales(shape, expected):
  image = _smooth(*shape)
  out = transforms.resize_shorter_side(image, 30)
  assert out.shape == (*expected, 3) and out.dtype == np.uint8
  if expected == shape:
    assert out is image
  else:
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(image).resize(
        expected[::-1], Image.Resampling.BICUBIC)))


@pytest.mark.parametrize("crop_scale", [(0.5, 1.0), (0.6, 1.0), (0.08, 1.0)])
def test_min_input_side_is_the_least_side_whose_crops_are_all_downscales(crop_scale):
  """Every crop box drawn in an image whose shorter side is min_input_side has both sides at
  least the output size, whatever the aspect of the image; at 90% of that side some do not."""
  size = 24
  side = transforms.ImageTransform(size, "crop_flip", crop_scale).min_input_side()
  assert transforms.ImageTransform(size, "none", crop_scale).min_input_side() == size
  rng = np.random.default_rng(0)
  crop_box = transforms._crop_box  # pylint: disable=protected-access

  def smallest_crop_side(height, width):
    boxes = [crop_box(height, width, rng, crop_scale, transforms.CROP_RATIO)
             for _ in range(20_000)]
    return min(min(h, w) for _, _, h, w in boxes)
  for height, width in ((side, side), (side, side * 4 // 3), (side * 2, side)):
    assert smallest_crop_side(height, width) >= size
  assert smallest_crop_side(side * 9 // 10, side * 9 // 10) < size


def test_a_crop_drawn_for_the_full_size_takes_the_same_region_of_a_downscaled_image():
  full = _smooth(90, 120)
  small = transforms.resize_shorter_side(full, 40)

  def crop(image, seed, full_size=None):
    return transforms.random_resized_crop(image, np.random.default_rng(seed), 24,
                                          full_size=full_size).astype(np.float64)
  same_region = [np.abs(crop(small, seed, (90, 120)) - crop(full, seed)).mean()
                 for seed in range(20)]
  drawn_for_small = [np.abs(crop(small, seed) - crop(full, seed)).mean() for seed in range(20)]
  assert max(same_region) < 1.0 < min(drawn_for_small)  # uint8 levels
  for seed in range(3):
    np.testing.assert_array_equal(crop(full, seed, (90, 120)), crop(full, seed))


def test_to_unit_range():
  image = np.array([[[0, 51, 255]]], np.uint8)
  out = transforms.to_unit_range(image)
  assert out.dtype == np.float32 and out.shape == (1, 1, 3)
  np.testing.assert_allclose(out, [[[-1.0, -0.6, 1.0]]], atol=1e-6)
