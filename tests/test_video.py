"""Video through the pipeline and the trainer: clip batches, the eval split of clips, and
video runs end to end on the synthetic clips and on an MSR-VTT layout the test writes."""

import json

import chex
import jax
import numpy as np
import pytest

from configs import video_retrieval
from cots_jax import checkpoint
from cots_jax import config_validation
from cots_jax import inference
from cots_jax import train
from cots_jax.data import eval_split
from cots_jax.data import grouped
from cots_jax.data import pipeline
from cots_jax.data import registry
from cots_jax.data import transforms
from cots_jax.data import video
from cots_jax.evaluators import common as evaluators_common
from support import build, tiny_config, write_video

VIDEO_TINY = {"input.batch_size": 8, "queue.size": 32, "total_steps": 6, "log_every": 3,
              "checkpoint_every": 0, "model.num_frames": 3, "input.data.num_train_images": 24,
              "input.data.num_eval_images": 12}


def video_config(arg="runlocal", **overrides):
  """configs/video_retrieval.py with the suite's tiny towers and 3 frames per clip."""
  return tiny_config(video_retrieval.get_config(arg), **{**VIDEO_TINY, **overrides})


def test_training_batches_carry_clips_instead_of_images():
  config = video_config()
  batch = next(pipeline.make_train_iterator(config))
  size = config.model.image.image_size
  assert "image" not in batch and batch["video"].shape == (8, 3, size, size, 3)
  assert batch["video"].dtype == np.float32
  assert batch["video"].min() >= -1 and batch["video"].max() <= 1
  # Consecutive frames of a moving object differ (the clip is a clip, not one frame repeated).
  assert np.abs(batch["video"][:, 0] - batch["video"][:, -1]).max() > 0.1
  assert batch["text_ids"].shape == (8, config.input.max_len)


def test_a_clip_gets_one_augmentation_for_all_its_frames():
  still = np.random.default_rng(0).integers(0, 255, (1, 40, 40, 3), dtype=np.uint8)
  clip = video.ArrayClip(np.repeat(still, 6, axis=0), "still")
  transform = transforms.ImageTransform(24, "crop_flip", (0.3, 0.6), 0.5)
  frames = transform.clip_pixels(clip, "still", 4, np.random.default_rng(1))
  assert frames.shape == (4, 24, 24, 3)
  assert all(np.array_equal(frame, frames[0]) for frame in frames)
  other = transform.clip_pixels(clip, "still", 4, np.random.default_rng(2))
  assert not np.array_equal(other[0], frames[0])  # another draw, another crop
  # Eval (no rng): the segment centres, resized and centre-cropped.
  numbered = video.ArrayClip(np.arange(8, dtype=np.uint8)[:, None, None, None]
                             * np.ones((1, 24, 24, 3), np.uint8), "numbered")
  centres = transforms.ImageTransform(24).clip_pixels(numbered, "numbered", 4)
  np.testing.assert_array_equal(centres[:, 0, 0, 0], [1, 3, 5, 7])


def test_the_eval_split_of_clips_yields_video_batches_and_no_image_views():
  config = video_config()
  split = eval_split.make_eval_split(config, batch_size=5)
  batches = list(split.image_batches())
  assert [b["video"].shape[:2] for b in batches] == [(5, 3), (5, 3), (5, 3)]
  assert sum(int(b["valid"].sum()) for b in batches) == split.num_images == 12
  with pytest.raises(ValueError, match="holds video clips, not images"):
    next(split.view_batches(0))
  assert set(evaluators_common.from_config(config, split)) == {"retrieval", "direction",
                                                              "text_matching"}


@pytest.mark.parametrize("overrides, message", [
    ({"loss.mvm": 0.1}, r"config.loss.mvm=0.1 must be 0 with video data"),
    ({"input.augment": "crop_flip"}, r"config.input.flip_prob=0.5 must be 0 for synthetic_video"),
])
def test_video_config_checks(overrides, message):
  with pytest.raises(ValueError, match=message):
    config_validation.validate(video_config(**overrides))


def test_video_config_variants():
  for arg in ("", "runlocal", "agg=transformer", "model=base"):
    config_validation.validate(video_retrieval.get_config(arg))
  assert video_retrieval.get_config("model=base").model.num_frames == 8
  assert video_retrieval.get_config("data=msrvtt").input.data.name == "msrvtt"
  with pytest.raises(ValueError, match="config arg agg='max' is unknown"):
    video_retrieval.get_config("agg=max")


@pytest.mark.slow
def test_a_synthetic_video_run_with_the_temporal_transformer_trains_and_evaluates(tmp_path):
  """(The MSR-VTT run below takes the mean aggregation.)"""
  config = video_config("runlocal,agg=transformer", **{"model.temporal_layers": 1})
  results = train.train_and_evaluate(config, str(tmp_path))
  for key in ("eval/retrieval/t2v_r1", "eval/retrieval/v2t_meanr",
              "eval/retrieval_momentum/v2t_r10", "eval/text_matching/r1",
              "eval/direction/t2v_r1", "eval/direction_momentum/v2t_r1"):
    assert np.isfinite(results[key]), key
  assert not any("image_instance" in key or "i2t" in key for key in results)


def _msrvtt_layout(root, num_videos=6):
  """An MSR-VTT folder: num_videos short H.264 clips of a square moving across a flat colour,
  MSRVTT_data.json (train / validate / test splits) and a 1k-A style test list of 2 videos."""
  (root / "videos").mkdir(parents=True)
  rng = np.random.default_rng(0)
  videos, sentences = [], []
  for number in range(num_videos):
    frames = np.full((10, 32, 32, 3), rng.integers(0, 255, 3), np.uint8)
    for t in range(10):
      frames[t, 12:20, 2 + 2 * t:10 + 2 * t] = 255
    write_video(root / "videos" / f"video{number}.mp4", frames)
    split = ("train", "validate", "test")[number % 3]
    videos.append({"video_id": f"video{number}", "split": split})
    sentences += [{"video_id": f"video{number}", "caption": f"clip {number} caption {k}"}
                  for k in range(2)]
  (root / "MSRVTT_data.json").write_text(json.dumps({"videos": videos, "sentences": sentences}))
  (root / "test.csv").write_text("key,vid_key,video_id,sentence\n"
                                 "ret0,msr2,video2,a square moves right\n"
                                 "ret1,msr5,video5,a white square slides\n")
  return root


@pytest.mark.slow
def test_an_msrvtt_layout_runs_end_to_end(tmp_path):
  root = _msrvtt_layout(tmp_path / "msrvtt")
  config = video_config("runlocal,data=msrvtt", **{
      "input.data.annotations": str(root / "MSRVTT_data.json"),
      "input.data.videos_dir": str(root / "videos"), "input.data.test_list": str(root / "test.csv"),
      "input.batch_size": 2, "queue.size": 8, "eval.batch_size": 2})
  config_validation.validate(config)
  assert len(registry.make_source(config, "train")) == 4
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(results["eval/retrieval/t2v_medr"])
  # 2 test videos with one caption each: no text matching, and t2v R@10 finds every clip.
  assert results["eval/retrieval/t2v_r10"] == 100.0
  assert not any("text_matching" in key for key in results)


def test_an_unreadable_video_is_skipped_and_counted_or_stops_the_run(tmp_path):
  root = _msrvtt_layout(tmp_path / "msrvtt")
  (root / "videos" / "video0.mp4").write_bytes(b"not a video at all")
  overrides = {"input.data.annotations": str(root / "MSRVTT_data.json"),
               "input.data.videos_dir": str(root / "videos"),
               "input.data.test_list": str(root / "test.csv"), "input.batch_size": 2,
               "queue.size": 8}
  config = video_config("runlocal,data=msrvtt", **overrides)
  iterator = pipeline.make_train_iterator(config)
  batches = [next(iterator) for _ in range(8)]  # 16 pairs: two passes over the 8 of 4 videos
  assert sum(int(b["skipped"].sum()) for b in batches) >= 2  # video0's 2 captions, each pass
  assert all(b["video"].shape[:2] == (2, 3) for b in batches)
  failing = video_config("runlocal,data=msrvtt", **overrides, **{"input.on_bad_example": "fail"})
  failing_iterator = pipeline.make_train_iterator(failing)
  with pytest.raises(Exception, match=r"video0.mp4: cannot decode video"):
    for _ in range(8):
      next(failing_iterator)


# -------------------------------------------------------------------- batches of whole groups


def test_group_pair_blocks_take_one_caption_of_every_item_of_a_group():
  pairs = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1], [2, 2], [3, 0], [3, 1],
                    [3, 2]])
  np.testing.assert_array_equal(grouped.group_pair_blocks(pairs, 2),
                                [[0, 2], [1, 3], [4, 7], [5, 8], [6, 9]])
  with pytest.raises(ValueError, match="group 0 have different caption counts \\[1, 2\\]"):
    grouped.group_pair_blocks(pairs[1:], 2)
  with pytest.raises(ValueError, match="3 source items do not split into groups of 2"):
    grouped.group_pair_blocks(pairs[:7], 2)


def pair_keys(batch):
  """(clip, caption tokens) of every row: the identity of a training pair."""
  return [(int(i), tuple(ids)) for i, ids in zip(batch["image_id"], batch["text_ids"])]


@pytest.mark.parametrize("process_count", [1, 2])
def test_grouped_batches_hold_whole_direction_groups_and_cover_every_pair_once(process_count):
  """24 clips = 6 groups x 5 captions = 120 pairs: 15 batches of 8 make one epoch, whatever the
  number of processes; every batch is whole groups, each clip once."""
  config = video_config()
  assert config.input.group_batches
  epoch = []
  for index in range(process_count):
    iterator = pipeline.make_train_iterator(config, process_index=index,
                                            process_count=process_count)
    for _ in range(15):  # per process: 15 batches of 8 // process_count pairs
      batch = next(iterator)
      ids = batch["image_id"].reshape(-1, 4)
      np.testing.assert_array_equal(ids - ids[:, :1], np.tile(np.arange(4), (len(ids), 1)))
      assert (ids[:, 0] % 4 == 0).all()
      epoch += pair_keys(batch)
  assert len(epoch) == len(set(epoch)) == 120
  assert len({clip for clip, _ in epoch}) == 24


def test_group_batches_errors():
  with pytest.raises(ValueError, match="SyntheticCaptions source has no groups"):
    next(pipeline.make_train_iterator(tiny_config(**{"input.group_batches": True})))
  with pytest.raises(ValueError, match="a batch of 6 pairs per process does not hold whole "
                                       "groups of 4"):
    next(pipeline.make_train_iterator(video_config(**{"input.batch_size": 6})))


def test_a_temporal_transformer_fine_tunes_from_an_image_text_run(trained_run):
  """Towers and heads come from the run; the temporal transformer, which the run lacks, keeps
  its fresh initialisation, in the online and (copied) momentum parameters."""
  state, _, _ = build(video_config("runlocal,agg=transformer", **{"model.image.posemb": "learn"}))
  loaded = checkpoint.load_towers(trained_run, state)
  run = inference.TrainedRun.load(trained_run).params["params"]
  assert set(loaded["params"]) == set(run) | {"temporal"}
  for name in run:
    chex.assert_trees_all_equal(jax.device_get(loaded["params"][name]), jax.device_get(run[name]))
  chex.assert_trees_all_equal(loaded["params"]["temporal"], state["params"]["temporal"])
  chex.assert_trees_all_equal(loaded["params_ema"], loaded["params"])


def test_grouped_batches_of_two_processes_draw_their_own_random_numbers():
  """Each process maps only its own rows; seeded alike, the k-th pair of every process would get
  the same random draws (crops, frame offsets). No field of a video batch is drawn apart from
  its content (MVM, whose mask was, is off for video), so the processes' seeds are compared."""
  config = video_config()
  first, second = (next(pipeline.make_train_iterator(config, process_index=index,
                                                     process_count=2)) for index in (0, 1))
  assert first["image_id"].tolist() != second["image_id"].tolist()
  assert pipeline._process_seed(config.seed, 0) != pipeline._process_seed(config.seed, 1)


def test_fixed_patch_positions_refuse_a_run_of_learned_ones_and_name_the_parameter(trained_run):
  """The synthetic video default has sincos2d patch positions; the image-text run learned its
  own, which this model has no place for."""
  config = video_config("runlocal,agg=transformer")
  assert config.model.image.posemb == "sincos2d"
  state, _, _ = build(config)
  with pytest.raises(ValueError,
                     match="does not fit the configured state:\n  unexpected: params/image/"
                                       "pos_embed"):
    checkpoint.load_towers(trained_run, state)
