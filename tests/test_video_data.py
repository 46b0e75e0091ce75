"""Video data: frame sampling, clips (in memory, PyAV-decoded files that the tests write, frame
folders) and the MSR-VTT sources on a tiny layout built here, with both test protocols."""

import csv
import json
import os
import pickle

import av
import numpy as np
import pytest
from PIL import Image

from cots_jax.data import transforms
from cots_jax.data import video
from cots_jax.data.transforms import BadExampleError
from support import write_video

# Codec round trip (RGB -> yuv420p -> RGB) of a flat colour; distinct test colours differ by >= 20.
_CODEC_TOLERANCE = 8


def _flat_frames(colours, size):
  """uint8 [n, size, size, 3]: frame i filled with colours[i] (uint8 [n, 3])."""
  return np.broadcast_to(colours[:, None, None, :], (len(colours), size, size, 3)).copy()


def _distinct_colours(count, offset=0):
  """uint8 [count, 3] (count + offset <= 12): any two rows differ by >= 20 in the first two
  channels."""
  steps = np.arange(count) + offset
  return np.stack([10 + 20 * steps, 240 - 20 * steps, (60 + 60 * steps) % 240], 1).astype(np.uint8)


def _write_png(path, frame):
  Image.fromarray(frame).save(path, format="PNG")


# ------------------------------------------------------------------------------ frame sampling

def _reference_segments(num_available, num_frames):
  """[(first, last)] per segment: the frames overlapping [j N / T, (j + 1) N / T), integers only."""
  return [(j * num_available // num_frames,
           -(-(j + 1) * num_available // num_frames) - 1) for j in range(num_frames)]


@pytest.mark.parametrize("num_available,num_frames", [
    (12, 4), (10, 3), (100, 8), (7, 7), (9, 2), (5, 8), (3, 8), (1, 4), (13, 1)])
def test_uniform_indices_are_the_segment_centres(num_available, num_frames):
  centres = [((2 * j + 1) * num_available) // (2 * num_frames) for j in range(num_frames)]
  indices = transforms.sample_frame_indices(num_available, num_frames)
  assert indices.dtype == np.int64
  np.testing.assert_array_equal(indices, centres)


@pytest.mark.parametrize("num_available,num_frames", [(12, 4), (10, 3), (5, 8), (3, 8), (9, 2)])
def test_random_indices_stay_in_and_cover_their_segments(num_available, num_frames):
  rng = np.random.default_rng(0)
  draws = np.stack([transforms.sample_frame_indices(num_available, num_frames, rng)
                    for _ in range(2000)])
  assert draws.dtype == np.int64
  assert (np.diff(draws, axis=1) >= 0).all()
  for j, (first, last) in enumerate(_reference_segments(num_available, num_frames)):
    assert set(draws[:, j].tolist()) == set(range(first, last + 1)), f"segment {j}"


def test_random_indices_are_uniform_over_whole_frame_segments():
  draws = np.stack([transforms.sample_frame_indices(12, 4, np.random.default_rng(seed))
                    for seed in range(3000)])
  for j in range(4):
    frequencies = np.bincount(draws[:, j] - 3 * j, minlength=3) / len(draws)
    np.testing.assert_allclose(frequencies, 1 / 3, atol=0.04)


def test_random_indices_are_deterministic_given_the_rng_state():
  first = transforms.sample_frame_indices(50, 8, np.random.default_rng(7))
  np.testing.assert_array_equal(
      first, transforms.sample_frame_indices(50, 8, np.random.default_rng(7)))
  rng = np.random.default_rng(7)
  draws = {tuple(transforms.sample_frame_indices(50, 8, rng)) for _ in range(20)}
  assert len(draws) > 1


def test_short_and_exact_length_clips():
  for rng in (None, np.random.default_rng(1)):
    np.testing.assert_array_equal(transforms.sample_frame_indices(6, 6, rng), np.arange(6))
    np.testing.assert_array_equal(transforms.sample_frame_indices(1, 5, rng), np.zeros(5))
    # Two frames, four segments of half a frame: two of each.
    np.testing.assert_array_equal(transforms.sample_frame_indices(2, 4, rng), [0, 0, 1, 1])


def test_sampling_errors():
  with pytest.raises(ValueError, match="num_available must be >= 1.*got 0"):
    transforms.sample_frame_indices(0, 4)
  with pytest.raises(ValueError, match="num_frames must be >= 1, got 0"):
    transforms.sample_frame_indices(10, 0)


# ------------------------------------------------------------------------------ ArrayClip

def test_array_clip_reads_in_index_order_with_repeats():
  frames = np.random.default_rng(0).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
  clip = video.ArrayClip(frames, "mem/0")
  assert clip.num_frames == 5
  np.testing.assert_array_equal(clip.read(np.array([4, 0, 2, 2])), frames[[4, 0, 2, 2]])
  with pytest.raises(BadExampleError, match=r"mem/0: frame 5 asked of a video with 5 frames"):
    clip.read([1, 5])
  with pytest.raises(BadExampleError, match="mem/empty: no frames"):
    video.ArrayClip(frames[:0], "mem/empty").num_frames  # pylint: disable=expression-not-assigned


def test_array_clip_rejects_bad_frames_and_indices():
  with pytest.raises(ValueError, match=r"mem/f: clip frames must be uint8 \[T, H, W, 3\], got "
                                       r"float32 \(2, 4, 4, 3\)"):
    video.ArrayClip(np.zeros((2, 4, 4, 3), np.float32), "mem/f")
  with pytest.raises(ValueError, match=r"got uint8 \(4, 4, 3\)"):
    video.ArrayClip(np.zeros((4, 4, 3), np.uint8), "mem/f")
  clip = video.ArrayClip(np.zeros((3, 2, 2, 3), np.uint8), "mem/ok")
  for bad in ([], [[0, 1]], [0.0, 1.0]):
    with pytest.raises(ValueError, match="frame indices must be a non-empty 1-D int array"):
      clip.read(bad)
  with pytest.raises(ValueError, match="frame indices must be >= 0, got -1"):
    clip.read([0, -1])


# ------------------------------------------------------------------------------ VideoFile

_NUM_VIDEO_FRAMES = 12


@pytest.fixture(name="videos", scope="module")
def _videos(tmp_path_factory):
  """{kind: path} of 12 flat-colour 32x32 frames (`_distinct_colours`) as .mp4 (frame count
  in the container) and .mkv (none), and broken files: garbage bytes, the mp4 cut in half, an
  audio-only wav."""
  folder = tmp_path_factory.mktemp("videos")
  frames = _flat_frames(_distinct_colours(_NUM_VIDEO_FRAMES), 32)
  paths = {kind: str(folder / f"clip.{kind}") for kind in ("mp4", "mkv")}
  for path in paths.values():
    write_video(path, frames)
  paths["garbage"] = str(folder / "garbage.mp4")
  with open(paths["garbage"], "wb") as f:
    f.write(b"not a video " * 50)
  paths["truncated"] = str(folder / "truncated.mp4")
  with open(paths["mp4"], "rb") as f:
    data = f.read()
  with open(paths["truncated"], "wb") as f:
    f.write(data[:len(data) // 2])
  paths["audio"] = str(folder / "audio.wav")
  with av.open(paths["audio"], "w") as container:
    stream = container.add_stream("pcm_s16le", rate=8000)
    samples = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    samples.sample_rate = 8000
    container.mux(stream.encode(samples))
    container.mux(stream.encode(None))
  return paths


def _nearest_colour_index(frames):
  """int [k]: for uint8 [k, H, W, 3] frames, the row of `_distinct_colours` nearest each mean."""
  means = frames.reshape(len(frames), -1, 3).mean(1)
  colours = _distinct_colours(_NUM_VIDEO_FRAMES).astype(float)
  return np.abs(means[:, None] - colours[None]).sum(-1).argmin(1)


@pytest.mark.parametrize("kind", ["mp4", "mkv"])
def test_video_file_counts_and_reads_frames(videos, kind):
  with av.open(videos[kind]) as container:  # mp4 reports its frame count, mkv does not
    assert container.streams.video[0].frames == (_NUM_VIDEO_FRAMES if kind == "mp4" else 0)
  clip = video.VideoFile(videos[kind])
  assert clip.num_frames == _NUM_VIDEO_FRAMES
  frames = clip.read(np.array([0, 5, 11]))
  assert frames.dtype == np.uint8 and frames.shape == (3, 32, 32, 3)
  expected = _flat_frames(_distinct_colours(_NUM_VIDEO_FRAMES)[[0, 5, 11]], 32)
  assert np.abs(frames.astype(int) - expected).max() <= _CODEC_TOLERANCE
  order = [11, 0, 5, 5, 3]
  np.testing.assert_array_equal(_nearest_colour_index(clip.read(order)), order)


def test_video_file_caches_a_decoded_count(videos, tmp_path):
  path = tmp_path / "counted.mkv"
  path.write_bytes(open(videos["mkv"], "rb").read())
  clip = video.VideoFile(path)
  assert clip.num_frames == _NUM_VIDEO_FRAMES
  path.unlink()
  assert clip.num_frames == _NUM_VIDEO_FRAMES
  assert pickle.loads(pickle.dumps(clip)).num_frames == _NUM_VIDEO_FRAMES


def test_video_file_index_past_the_end(videos):
  with pytest.raises(BadExampleError, match="frame 12 asked, the video has 12 frames"):
    video.VideoFile(videos["mp4"]).read([3, 12])


@pytest.mark.parametrize("kind,reason", [
    ("garbage", r"cannot decode video \(Invalid data found"),
    ("truncated", r"cannot decode video \("),
    ("audio", "no video stream"),
    ("missing", "missing file")])
def test_video_file_unreadable(videos, tmp_path, kind, reason):
  path = videos.get(kind, str(tmp_path / "missing.mp4"))
  for use in (lambda clip: clip.num_frames, lambda clip: clip.read([0])):
    with pytest.raises(BadExampleError, match=reason) as error:
      use(video.VideoFile(path))
    assert error.value.name == path
    assert str(error.value).startswith(f"{path}: ")


# ------------------------------------------------------------------------------ FrameFolder

def test_frame_folder_natural_order(tmp_path):
  colours = _distinct_colours(12)
  frames = _flat_frames(colours, 8)
  for i in np.random.default_rng(0).permutation(11):  # written in shuffled order
    _write_png(tmp_path / f"frame_{i}.png", frames[i])
  Image.fromarray(frames[11]).save(tmp_path / "frame_11.JPG", format="JPEG", quality=95)
  (tmp_path / "notes.txt").write_text("not a frame")
  clip = video.FrameFolder(tmp_path)
  assert clip.num_frames == 12
  assert [os.path.basename(p) for p in clip.frame_paths()][:4] == [
      "frame_0.png", "frame_1.png", "frame_2.png", "frame_3.png"]
  assert os.path.basename(clip.frame_paths()[10]) == "frame_10.png"
  np.testing.assert_array_equal(clip.read(np.array([10, 2, 9, 2])), frames[[10, 2, 9, 2]])
  assert np.abs(clip.read([11]).astype(int) - frames[11]).max() <= _CODEC_TOLERANCE
  with pytest.raises(BadExampleError, match="frame 12 asked of a video with 12 frames"):
    clip.read([12])


def test_frame_folder_errors(tmp_path):
  for name, reason in (("missing", "missing frames folder"),
                       ("empty", r"no frames \(.jpg, .jpeg, .png\) in folder")):
    if name == "empty":
      (tmp_path / name).mkdir()
    with pytest.raises(BadExampleError, match=reason) as error:
      video.FrameFolder(tmp_path / name).num_frames  # pylint: disable=expression-not-assigned
    assert error.value.name == str(tmp_path / name)
  (tmp_path / "file").write_text("x")
  with pytest.raises(BadExampleError, match="unreadable frames folder"):
    video.FrameFolder(tmp_path / "file").read([0])
  broken = tmp_path / "broken"
  broken.mkdir()
  _write_png(broken / "0.png", np.zeros((4, 4, 3), np.uint8))
  (broken / "1.png").write_bytes(b"not a png")
  _write_png(broken / "2.png", np.zeros((4, 6, 3), np.uint8))
  clip = video.FrameFolder(broken)
  with pytest.raises(BadExampleError, match="not an image") as error:
    clip.read([0, 1])
  assert error.value.name == str(broken / "1.png")
  with pytest.raises(BadExampleError, match=r"different sizes \[\(4, 4, 3\), \(4, 6, 3\)\]"):
    clip.read([0, 2])


# ------------------------------------------------------------------------------ MSR-VTT sources

_FRAMES_PER_CLIP = 3
_ANNOTATIONS = {
    "info": {"year": 2016},
    "videos": [
        {"video_id": "video0", "split": "train", "category": 3, "id": 0},
        {"video_id": "video1", "split": "validate", "category": 1, "id": 1},
        {"video_id": "video2", "split": "test", "category": 4, "id": 2},
        {"video_id": "video3", "split": "test", "category": 9, "id": 3},
    ],
    "sentences": [
        {"video_id": "video2", "caption": "two a", "sen_id": 0},
        {"video_id": "video0", "caption": "zero a", "sen_id": 1},
        {"video_id": "video3", "caption": "three a", "sen_id": 2},
        {"video_id": "video2", "caption": "two b", "sen_id": 3},
        {"video_id": "video0", "caption": "zero b", "sen_id": 4},
        {"video_id": "video1", "caption": "one a", "sen_id": 5},
        {"video_id": "video2", "caption": "two c", "sen_id": 6},
        {"video_id": "video3", "caption": "three b", "sen_id": 7},
    ],
}
_TEST_LIST = [("ret0", "msr7k0", "video3", "three, as listed"), ("ret1", "msr7k1", "video1", "one")]
# (test list?, split_kind) -> [(video id, captions)] in source order.
_EXPECTED = {
    (False, "train"): [("video0", ["zero a", "zero b"]), ("video1", ["one a"])],
    (False, "eval"): [("video2", ["two a", "two b", "two c"]), ("video3", ["three a", "three b"])],
    (True, "train"): [("video0", ["zero a", "zero b"]), ("video2", ["two a", "two b", "two c"])],
    (True, "eval"): [("video3", ["three, as listed"]), ("video1", ["one"])],
}


def _write_test_list(path, rows, header=("key", "vid_key", "video_id", "sentence")):
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def _write_json(path, value):
  path.write_text(json.dumps(value))
  return str(path)


@pytest.fixture(name="msrvtt", scope="module")
def _msrvtt(tmp_path_factory):
  """Paths of a 4-video MSR-VTT layout: {"annotations", "test_list", "videos", "frames"}; video
  k's 3 frames have the flat colours `_distinct_colours(3, offset=3 * k)`, as mp4 and pngs."""
  root = tmp_path_factory.mktemp("msrvtt")
  (root / "videos").mkdir()
  for k, entry in enumerate(_ANNOTATIONS["videos"]):
    frames = _flat_frames(_distinct_colours(_FRAMES_PER_CLIP, offset=3 * k), 16)
    write_video(root / "videos" / f"{entry['video_id']}.mp4", frames)
    frames_dir = root / "frames" / entry["video_id"]
    frames_dir.mkdir(parents=True)
    for i, frame in enumerate(frames):
      _write_png(frames_dir / f"{i:05d}.png", frame)
  return {"annotations": _write_json(root / "MSRVTT_data.json", _ANNOTATIONS),
          "test_list": _write_test_list(root / "MSRVTT_JSFUSION_test.csv", _TEST_LIST),
          "videos": str(root / "videos"), "frames": str(root / "frames")}


def _make_source(kind, msrvtt, split_kind, test_list):
  if kind == "files":
    return video.MsrVttSource(msrvtt["annotations"], msrvtt["videos"], split_kind, test_list)
  return video.FramesFolderSource(msrvtt["annotations"], msrvtt["frames"], split_kind, test_list)


@pytest.mark.parametrize("kind", ["files", "frames"])
@pytest.mark.parametrize("with_test_list", [False, True])
@pytest.mark.parametrize("split_kind", ["train", "eval"])
def test_msrvtt_sources(msrvtt, kind, with_test_list, split_kind):
  source = _make_source(kind, msrvtt, split_kind, msrvtt["test_list"] if with_test_list else "")
  source = pickle.loads(pickle.dumps(source))  # grain workers get a pickled copy
  expected = _EXPECTED[with_test_list, split_kind]
  assert len(source) == len(expected)
  np.testing.assert_array_equal(source.caption_counts(), [len(c) for _, c in expected])
  for i, (video_id, captions) in enumerate(expected):
    assert source.video_id(i) == video_id
    assert source.captions(i) == captions
    item = source[i]
    # The id is the video's position in the annotations' "videos" list: train and eval apart.
    assert item["captions"] == captions and item["image_id"] == [
        v["video_id"] for v in _ANNOTATIONS["videos"]].index(video_id)
    folder = msrvtt["videos"] if kind == "files" else msrvtt["frames"]
    assert item["name"] == os.path.join(folder, video_id + (".mp4" if kind == "files" else ""))
    clip = item["video"]
    assert clip.num_frames == _FRAMES_PER_CLIP
    k = int(video_id[len("video"):])
    colours = _distinct_colours(_FRAMES_PER_CLIP, offset=3 * k).astype(int)
    means = clip.read([2, 0]).reshape(2, -1, 3).mean(1)
    assert np.abs(means - colours[[2, 0]]).max() <= _CODEC_TOLERANCE
  with pytest.raises(IndexError, match=rf"{len(expected)} out of range"):
    source.captions(len(expected))


def test_msrvtt_missing_video_is_a_bad_example(msrvtt, tmp_path):
  source = video.MsrVttSource(msrvtt["annotations"], tmp_path, "train", extension=".webm")
  with pytest.raises(BadExampleError, match="missing file") as error:
    source[0]["video"].num_frames  # pylint: disable=expression-not-assigned
  assert error.value.name == str(tmp_path / "video0.webm")
  with pytest.raises(BadExampleError, match="missing frames folder"):
    video.FramesFolderSource(msrvtt["annotations"], tmp_path, "eval")[1]["video"].read([0])


def _annotations_with(tmp_path, change):
  """Path of a copy of _ANNOTATIONS after `change(copy)`."""
  annotations = json.loads(json.dumps(_ANNOTATIONS))
  change(annotations)
  return _write_json(tmp_path / "changed.json", annotations)


def _set(container, key, value):
  container[key] = value


@pytest.mark.parametrize("change,message", [
    (lambda a: a.pop("videos"), r"changed.json has no 'videos'"),
    (lambda a: _set(a, "sentences", {}), r"changed.json\['sentences'\] should be list, got dict"),
    (lambda a: a["videos"][1].pop("split"), r"changed.json: videos\[1\] has no 'split'"),
    (lambda a: a["videos"].append({"video_id": "video0", "split": "test"}),
     r"changed.json: videos\[4\] repeats video_id 'video0'"),
    (lambda a: _set(a["sentences"][2], "caption", 7),
     r"changed.json: sentences\[2\]\['caption'\] should be str, got int"),
    (lambda a: _set(a["sentences"][5], "video_id", "video9"),
     r"changed.json: sentences\[5\] names video_id 'video9', which is not in 'videos'"),
])
def test_annotation_errors(tmp_path, change, message):
  with pytest.raises(ValueError, match=message):
    video.MsrVttSource(_annotations_with(tmp_path, change), tmp_path, "train")


def test_annotation_file_errors(msrvtt, tmp_path):
  with pytest.raises(ValueError, match="nope.json: annotations file not found"):
    video.MsrVttSource(tmp_path / "nope.json", tmp_path, "train")
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="bad.json: annotations file is not JSON"):
    video.FramesFolderSource(tmp_path / "bad.json", tmp_path, "train")
  with pytest.raises(ValueError, match="split_kind must be 'train' or 'eval', got 'test'"):
    video.MsrVttSource(msrvtt["annotations"], tmp_path, "test")
  def without_test_videos(annotations):
    for entry in annotations["videos"]:
      entry["split"] = entry["split"].replace("test", "train")
  only_train = _annotations_with(tmp_path, without_test_videos)
  with pytest.raises(ValueError, match=r"no videos in splits \['test'\] for split_kind 'eval'; "
                                       r"splits found: \['train', 'validate'\]"):
    video.MsrVttSource(only_train, tmp_path, "eval")


@pytest.mark.parametrize("rows,header,message", [
    ([("r", "m", "video7", "gone")], None,
     r"line 2 names video_id 'video7', which is not in the annotations"),
    ([("r", "m", "video1", "a"), ("r", "m", "video1", "b")], None,
     r"line 3 repeats video_id 'video1'"),
    ([("r", "m", "video1")], ("key", "vid_key", "video_id"),
     r"test list header lacks column\(s\) \['sentence'\]; it has \['key', 'vid_key', 'video_id'\]"),
    ([], None, "test list has no rows"),
    ([(str(i), "m", f"video{i}", "s") for i in range(4)], None,
     r"no training videos: .*test.csv lists all of them"),
])
def test_test_list_errors(msrvtt, tmp_path, rows, header, message):
  header = header or ("key", "vid_key", "video_id", "sentence")
  test_list = _write_test_list(tmp_path / "test.csv", rows, header)
  with pytest.raises(ValueError, match=message):
    video.MsrVttSource(msrvtt["annotations"], tmp_path, "train", test_list)


def test_missing_test_list(msrvtt, tmp_path):
  with pytest.raises(ValueError, match="absent.csv: test list not found"):
    video.FramesFolderSource(msrvtt["annotations"], tmp_path, "eval", tmp_path / "absent.csv")
