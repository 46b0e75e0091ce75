"""Workdirs, init_from and vq.init on gs:// (cots_jax/paths.py), against a local stand-in bucket.

The `bucket` fixture serves gs:// from a local folder through etils.epath's real fsspec backend
(the one gcsfs plugs into on a TPU VM), so cots_jax's own code runs exactly as on GCS. Like GCS,
the stand-in refuses to append to an object (gcsfs would silently overwrite it) and has no
directories to create first. It cannot take Orbax arrays: tensorstore talks to GCS itself.
"""

import json
import logging
import os
import shutil

from etils import epath
from etils.epath import backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint._src.path import gcs_utils
import pytest
import safetensors.numpy
from tensorboardX import record_writer

from configs import common
from cots_jax import checkpoint
from cots_jax import paths
from cots_jax import pretrained
from cots_jax import search
from cots_jax import vq_trainer
from cots_jax.data import sources
from cots_jax.data.transforms import BadExampleError
from cots_jax.metrics_writer import MetricWriter, read_metrics
from support import tiny_config
from test_pretrained import VIT_CONFIG, as_big_vision, as_timm, random_hf_vit, save_hf_dir

READ_ONLY_BUCKET = "locked"


class FakeGcs(DirFileSystem):
  """gs://BUCKET/KEY as ROOT/BUCKET/KEY. Writes under gs://locked/ fail as GCS's 403 does."""

  protocol = ("gs", "gcs")

  def __init__(self, root):
    super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True))

  def open(self, path, mode="rb", *args, **kwargs):
    if "a" in mode:
      raise OSError(f"{path}: GCS objects cannot be appended to")
    if "r" not in mode and self._strip_protocol(path).startswith(f"{READ_ONLY_BUCKET}/"):
      raise OSError(f"Forbidden: {path}")
    return super().open(path, mode, *args, **kwargs)


class EventFileFactory:
  """tensorboardX's writer factory for gs:// (its own one needs GCS credentials), on `store`."""

  def __init__(self, store):
    self._store = store

  def open(self, path):
    return self._store.open(path, "wb")

  def directory_check(self, path):
    del path  # objects need no directory


@pytest.fixture(name="bucket_root")
def fixture_bucket_root(tmp_path, monkeypatch):
  """The local folder that holds the stand-in's buckets; gs:// paths land under it."""
  root = tmp_path / "gcs"
  root.mkdir()
  store = FakeGcs(str(root))
  monkeypatch.setattr(backend.fsspec_backend, "fs", lambda path: store)
  monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", EventFileFactory(store))
  # Orbax asks the GCS API itself whether a bucket has hierarchical namespaces.
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  return root


def tree(directory):
  """{relative path: bytes} of every file under `directory` (a pathlib.Path)."""
  return {str(path.relative_to(directory)): path.read_bytes()
          for path in directory.rglob("*") if path.is_file()}


def test_is_local_and_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.is_local("runs/a") and paths.is_local("/abs/b") and paths.is_local(tmp_path)
  assert not paths.is_local("gs://bucket/run") and not paths.is_local(epath.Path("gs://b/x"))
  assert paths.absolute("runs/a") == epath.Path(os.path.join(os.getcwd(), "runs", "a"))
  assert str(paths.absolute("gs://bucket/run/")) == "gs://bucket/run"
  assert str(paths.absolute("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"


def test_stand_in_refuses_appends_and_locked_writes_like_gcs(bucket_root):
  with pytest.raises(OSError, match="cannot be appended"):
    epath.Path("gs://bucket/log.txt").open("a")
  with pytest.raises(OSError, match="Forbidden"):
    epath.Path(f"gs://{READ_ONLY_BUCKET}/x").write_text("x")
  epath.Path("gs://bucket/deep/key.txt").write_text("x")
  assert (bucket_root / "bucket" / "deep" / "key.txt").read_text() == "x"


def test_prepare_workdir_on_a_bucket_writes_what_a_local_workdir_gets(tmp_path, bucket_root):
  local = tmp_path / "local"
  for workdir in (str(local), "gs://bucket/run"):
    assert checkpoint.prepare_workdir(workdir) is None
    checkpoint.write_config(workdir, tiny_config())
  remote = tree(bucket_root / "bucket" / "run")
  assert list(remote) == ["config.json"]  # the write probe and the staged file are gone
  assert remote == tree(local)
  checkpoint.write_config("gs://bucket/run", tiny_config(**{"model.text.width": 64}))
  assert checkpoint.prepare_workdir("gs://bucket/run")["model"]["text"]["width"] == 64


def test_a_bucket_that_refuses_writes_fails_at_start(bucket_root):
  del bucket_root
  with pytest.raises(OSError, match="workdir 'gs://locked/run' is not writable: Forbidden"):
    checkpoint.prepare_workdir(f"gs://{READ_ONLY_BUCKET}/run")


def test_free_space_is_checked_on_local_disks_only(caplog):
  caplog.set_level(logging.INFO)
  checkpoint.check_free_space("gs://bucket/run/checkpoints", 1 << 62)
  assert [r.getMessage() for r in caplog.records] == [
      "gs://bucket/run/checkpoints is not on a local disk: not checking its free space"]


def test_checkpoint_manager_and_init_from_keep_the_bucket_url(bucket_root):
  manager = checkpoint.checkpoint_manager("gs://bucket/run", tiny_config())
  try:
    assert str(manager.directory) == "gs://bucket/run/checkpoints"
    assert manager.latest_step() is None
  finally:
    manager.close()
  assert (bucket_root / "bucket" / "run" / "checkpoints").is_dir()
  state = {"params": {"w": jnp.zeros(2)}}
  with pytest.raises(FileNotFoundError,
                     match="no complete checkpoint in gs://bucket/run/checkpoints$"):
    checkpoint.load_towers("gs://bucket/run", state)
  with pytest.raises(FileNotFoundError, match="no complete checkpoint in gs://bucket/nothing$"):
    checkpoint.load_towers("gs://bucket/nothing", state)


def test_metrics_on_a_bucket_match_a_local_workdir_also_after_a_restart(tmp_path, bucket_root):
  expected = [{"step": 1, "train/loss": 2.5}, {"step": 2, "train/loss": 2.0},
              {"step": 2, "train/loss": 2.0, "eval/r1": 40.0}]
  local = tmp_path / "local"
  local.mkdir()
  for workdir in (str(local), "gs://bucket/run"):
    writer = MetricWriter(workdir)
    writer.write(1, {"train/loss": 2.5})
    assert read_metrics(workdir) == expected[:1]  # readable while the run goes on
    writer.write(2, {"train/loss": 2.0})
    writer.close()
    restarted = MetricWriter(workdir)
    restarted.write(2, {"train/loss": 2.0, "eval/r1": 40.0})
    restarted.close()
    assert read_metrics(workdir) == expected
  remote = bucket_root / "bucket" / "run"
  assert (remote / "metrics.jsonl").read_bytes() == (local / "metrics.jsonl").read_bytes()
  events = os.listdir(remote / "tensorboard")  # named by the second: the restart may reuse one
  assert events and all(name.startswith("events.out.tfevents") for name in events)
  assert all(os.path.getsize(remote / "tensorboard" / name) > 100 for name in events)


def test_metrics_on_a_bucket_are_uploaded_first_then_by_the_flush_interval_and_at_close(
    bucket_root):
  writer = MetricWriter("gs://bucket/run")
  for step in range(1, 5):  # far faster than FLUSH_SECS
    writer.write(step, {"train/loss": 1.0 / step})
  assert [m["step"] for m in read_metrics("gs://bucket/run")] == [1]
  events = bucket_root / "bucket" / "run" / "tensorboard"
  sizes_before_close = {name: os.path.getsize(events / name) for name in os.listdir(events)}
  writer.close()
  assert [m["step"] for m in read_metrics("gs://bucket/run")] == [1, 2, 3, 4]
  assert all(os.path.getsize(events / name) > size for name, size in sizes_before_close.items())


def test_a_tokenizer_on_a_bucket_is_found_and_checked(bucket_root):
  config = common.base_config("tiny")
  record = {"patch_size": config.model.image.patch_size, "codebook_size": 7,
            "code_dim": config.vq.code_dim, "hidden": config.vq.hidden}
  (bucket_root / "bucket" / "run" / "vq").mkdir(parents=True)
  (bucket_root / "bucket" / "run" / "vq" / "tokenizer.json").write_text(json.dumps(record))
  for path in ("gs://bucket/run", "gs://bucket/run/vq"):
    assert vq_trainer.find_tokenizer_dir(path) == epath.Path("gs://bucket/run/vq")
  message = (r"the tokenizer in gs://bucket/run/vq does not match the config .*"
             rf"'codebook_size': \(7, {config.vq.codebook_size}\)")
  with pytest.raises(ValueError, match=message):
    vq_trainer.load_tokenizer("gs://bucket/run", config)
  assert vq_trainer.find_tokenizer_dir("gs://bucket/elsewhere") is None
  with pytest.raises(FileNotFoundError, match="config.vq.init='gs://bucket/elsewhere'"):
    vq_trainer.load_tokenizer("gs://bucket/elsewhere", config)


def test_vit_weights_on_a_bucket_read_as_their_local_copy_in_each_layout(tmp_path, bucket_root):
  local = tmp_path / "vit"
  weights = random_hf_vit(np.random.default_rng(5), VIT_CONFIG)
  save_hf_dir(local / "hf", weights, VIT_CONFIG)
  names = sorted(weights)
  shards = {"model-1.safetensors": names[::2], "model-2.safetensors": names[1::2]}
  save_hf_dir(local / "sharded", {}, VIT_CONFIG)
  os.remove(local / "sharded" / "model.safetensors")
  for shard, keys in shards.items():
    safetensors.numpy.save_file({k: weights[k] for k in keys}, str(local / "sharded" / shard))
  (local / "sharded" / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
  safetensors.numpy.save_file(as_timm(weights, VIT_CONFIG), str(local / "timm.safetensors"))
  np.savez(local / "augreg.npz", **as_big_vision(weights, VIT_CONFIG))
  shutil.copytree(local, bucket_root / "bucket" / "vit")
  for name in ("hf", "sharded", "timm.safetensors", "augreg.npz"):
    want_sizes, want, want_keys = pretrained.read_vit_checkpoint(str(local / name), heads=4)
    sizes, got, keys = pretrained.read_vit_checkpoint(f"gs://bucket/vit/{name}", heads=4)
    assert (sizes, sorted(keys), sorted(got)) == (want_sizes, sorted(want_keys), sorted(want))
    for path, (key, array) in want.items():
      assert got[path][0] == key
      np.testing.assert_array_equal(got[path][1], array)
  config = tiny_config(**{"model.image.init": "gs://bucket/vit/hf"})
  resolved = pretrained.resolve_pretrained(config)
  assert resolved.model.image.init == "gs://bucket/vit/hf"  # not made a local path
  assert (resolved.model.image.width, resolved.model.image.depth) == (32, 2)


def test_a_captions_json_on_a_bucket_reads_as_its_local_copy(tmp_path, bucket_root):
  local = tmp_path / "data"
  (local / "images").mkdir(parents=True)
  (local / "images" / "a.png").write_bytes(b"png bytes")
  (local / "ann.json").write_text(json.dumps({"images": [
      {"filename": "a.png", "split": "train", "sentences": [{"raw": "a red square"}]},
      {"filename": "gone.png", "split": "train", "sentences": [{"raw": "nothing"}]}]}))
  shutil.copytree(local, bucket_root / "bucket" / "data")
  source = sources.CaptionsJson("gs://bucket/data/ann.json", "gs://bucket/data/images", "train")
  assert source[0] == {"image": b"png bytes", "name": "gs://bucket/data/images/a.png",
                       "captions": ["a red square"], "image_id": 0}
  with pytest.raises(BadExampleError, match="gs://bucket/data/images/gone.png: missing file"):
    source[1]  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match="gs://bucket/data/none.json: annotations file not found"):
    sources.CaptionsJson("gs://bucket/data/none.json", "gs://bucket/data/images", "train")


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_a_search_index_on_a_bucket_reads_back_and_is_a_plain_file_of_its_format(bucket_root,
                                                                                   suffix):
  embeddings = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
  items, meta = ["/a.png", "b c", "ü"], {"kind": "image", "step": 2}
  search.save_index(f"gs://bucket/index{suffix}", embeddings, items, meta)
  got, got_items, got_meta = search.load_index(f"gs://bucket/index{suffix}")
  np.testing.assert_array_equal(got, embeddings)
  assert (got_items, got_meta) == (items, meta)
  stored = str(bucket_root / "bucket" / f"index{suffix}")
  if suffix == ".safetensors":
    with safetensors.safe_open(stored, framework="numpy") as file:
      np.testing.assert_array_equal(file.get_tensor("embeddings"), embeddings)
      assert file.metadata() == {"items": json.dumps(items), "meta": json.dumps(meta)}
  else:
    with np.load(stored, allow_pickle=False) as file:
      np.testing.assert_array_equal(file["embeddings"], embeddings)
      assert file["items"].tolist() == items and json.loads(file["meta"].item()) == meta
  (bucket_root / "bucket" / "captions.txt").write_text("one\n\n two \n")
  assert search.read_captions("gs://bucket/captions.txt") == ["one", "two"]
