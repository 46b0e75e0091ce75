"""Scale-out (design §5): the update step and the eval embedders give the same numbers on 8 fake CPU
devices, with a data mesh and with a data x fsdp mesh (queues sharded along K), as on 1 device.

Device counts are fixed per process, so the 8-device work runs in a child
(`python -c "import test_scale ..."`) started before the in-process 1-device reference, to
overlap with it.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from cots_jax import sharding
from cots_jax import state as state_lib
from cots_jax import step as step_lib
from cots_jax import vq_trainer
from cots_jax.data import eval_split
from cots_jax.data import pipeline
from cots_jax.evaluators import common as evaluators_common
from cots_jax.evaluators import retrieval
from support import REPO, subprocess_env, tiny_config

# Children with 8 fake devices against 1: tens of seconds (`-m "not slow"` leaves them out).
pytestmark = pytest.mark.slow

STEPS = 4
TIMEOUT = 400
MESHES = {
    "data": {"mesh": [("data", -1)]},
    # Every array of >= 64 elements split over "fsdp"; queues split along K over "data".
    "data_fsdp": {"mesh": [("data", 2), ("fsdp", 4)], "fsdp_min_size": 64,
                  "sharding_rules": [("^queue/(img|txt|idx|valid)$", ("data",)), (".*", "fsdp")]},
}


def run_steps(config, steps=STEPS):
  """`steps` updates from a fresh state on all devices of this process: the losses, and the final
  queue, EMA params and each leaf's share held by one device."""
  built = state_lib.build(config, state_lib.make_mesh(config),
                          vq_trainer.random_tokenizer(config, jax.random.PRNGKey(1)))
  mesh, state, update = built.mesh, built.fresh_state(), step_lib.jit_update(built)
  batches = pipeline.make_train_iterator(config)
  losses = []
  for _ in range(steps):
    state, metrics = update(state, sharding.global_batch(next(batches), mesh))
    losses.append(float(metrics["train/loss"]))
  # The evaluators' embedders split each eval batch (7 rows: padded to the device count) over
  # the mesh.
  embed_images, embed_texts = evaluators_common.make_embed_fns(built.model, mesh)[:2]
  split = eval_split.make_eval_split(config, batch_size=7)
  eval_img = retrieval.embed_dataset(lambda b: embed_images(state["params"], b["image"]),
                                     split.image_batches())
  eval_txt = retrieval.embed_dataset(
      lambda b: embed_texts(state["params"], b["text_ids"], b["text_mask"]), split.text_batches())
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  share = {jax.tree_util.keystr(path, simple=True, separator="/"):
           leaf.addressable_shards[0].data.size / max(leaf.size, 1) for path, leaf in leaves}
  return {"losses": np.asarray(losses), "queue_img": np.asarray(state["queue"]["img"]),
          "queue_idx": np.asarray(state["queue"]["idx"]),
          "ema": np.concatenate([np.ravel(x) for x in jax.tree.leaves(state["params_ema"])]),
          "eval_img": eval_img, "eval_txt": eval_txt, "share": share}


def write_mesh_runs(out_dir):
  """Child entry: `run_steps` on each mesh of MESHES, saved as OUT_DIR/<mesh>.npz + .json."""
  for name, overrides in MESHES.items():
    result = run_steps(tiny_config(**overrides))
    with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
      json.dump(result.pop("share"), f)
    np.savez(os.path.join(out_dir, f"{name}.npz"), **result)


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
  """(1-device reference, {mesh name: results on 8 devices})."""
  out_dir = tmp_path_factory.mktemp("meshes")
  child = subprocess.Popen(
      [sys.executable, "-c", f"import test_scale as t; t.write_mesh_runs({str(out_dir)!r})"],
      cwd=REPO, env=subprocess_env(8), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  reference = run_steps(tiny_config())
  output, _ = child.communicate(timeout=TIMEOUT)
  assert child.returncode == 0, output[-4000:]
  runs = {}
  for name in MESHES:
    runs[name] = dict(np.load(out_dir / f"{name}.npz"))
    runs[name]["share"] = json.loads((out_dir / f"{name}.json").read_text())
  return reference, runs


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_eight_devices_give_the_losses_queue_and_ema_of_one(mesh_runs, mesh_name):
  reference, runs = mesh_runs
  got = runs[mesh_name]
  np.testing.assert_allclose(got["losses"], reference["losses"], rtol=1e-3)
  np.testing.assert_array_equal(got["queue_idx"], reference["queue_idx"])
  np.testing.assert_allclose(got["queue_img"], reference["queue_img"], atol=1e-4)
  np.testing.assert_allclose(got["ema"], reference["ema"], atol=1e-4)
  for name in ("eval_img", "eval_txt"):
    assert got[name].shape == reference[name].shape == (20 if name == "eval_img" else 100, 16)
    np.testing.assert_allclose(got[name], reference[name], atol=1e-4, err_msg=name)
  assert reference["losses"][-1] != reference["losses"][0]  # the steps did move the state


def test_data_mesh_replicates_the_state_and_fsdp_mesh_splits_it(mesh_runs):
  _, runs = mesh_runs
  assert set(runs["data"]["share"].values()) == {1.0}
  fsdp = runs["data_fsdp"]["share"]
  embedding = "text/embeddings/word_embeddings/embedding"
  for part in ("params/", "params_ema/", "opt/.*/mu/", "opt/.*/nu/"):
    names = [n for n in fsdp if re.fullmatch(part + embedding, n)]
    assert len(names) == 1 and fsdp[names[0]] == 0.25, (part, names)
  assert fsdp["queue/img"] == fsdp["queue/idx"] == 0.5  # along K over "data" (size 2)
  assert fsdp["step"] == 1.0  # small arrays stay whole
  split = [n for n, share in fsdp.items() if share < 1]
  assert len(split) > len(fsdp) // 3
