"""Multi-process runs (design §5, §7): two processes joined by jax.distributed on 127.0.0.1, with
2 fake CPU devices each, log the losses of one process, write metrics once, take part in every
checkpoint together, and survive SIGTERM (preemption) with an exact resume.

The 1-process reference runs after the pair, not beside it: CPU collectives give up when peers
reach a collective far apart, and a loaded machine makes that likelier.
"""

import json
import os
import re
import signal
import time

import numpy as np
import pytest

from cots_jax.metrics_writer import read_metrics
from support import free_port, start_main, tiny_flags

# Multi-process runs of the trainer: minutes each (`-m "not slow"` leaves them out).
pytestmark = pytest.mark.slow

TIMEOUT = 400
STEPS = 8


def start_run(workdir, log_path, devices, *extra):
  """`cots_jax.main` on runlocal + TINY: STEPS steps, no MVM so no VQ tokenizer to train, saves
  only on preemption and at the end."""
  return start_main(workdir, log_path, *tiny_flags(total_steps=STEPS, checkpoint_every=0,
                                                   **{"loss.mvm": 0.0}), *extra, devices=devices)


def start_two_processes(workdir, logs):
  port = free_port()
  return [start_run(workdir, log, 2, f"--coordinator_address=127.0.0.1:{port}",
                     "--num_processes=2", f"--process_id={i}") for i, log in enumerate(logs)]


def wait_all(children, logs):
  """Waits for every child; kills the rest and shows a log when one fails."""
  try:
    for child, log in zip(children, logs):
      child.wait(timeout=TIMEOUT)
      assert child.returncode == 0, open(log, encoding="utf-8").read()[-4000:]
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()


def wait_for_step(workdir, children, step=1):
  """Polls WORKDIR/metrics.jsonl until it logs `step` or a child exits."""
  deadline = time.monotonic() + TIMEOUT
  while time.monotonic() < deadline and all(c.poll() is None for c in children):
    if os.path.exists(workdir / "metrics.jsonl") and any(
        r.get("step", 0) >= step and "train/loss" in r for r in read_metrics(workdir)):
      return
    time.sleep(0.1)
  raise AssertionError(f"{workdir} never logged step {step}")


def test_two_processes_log_the_losses_of_one_and_resume_after_sigterm(tmp_path):
  """Two processes of 2 devices each are preempted (SIGTERM to both, as SLURM does) after step 1,
  save together at one step and stop; started again they resume, and every step logs the loss of
  an uninterrupted 1-process run."""
  two, logs = tmp_path / "two", [tmp_path / "two.0.log", tmp_path / "two.1.log"]
  children = start_two_processes(two, logs)
  wait_for_step(two, children)
  for child in children:
    child.send_signal(signal.SIGTERM)
  wait_all(children, logs)
  saved = [re.findall(r"saved checkpoint (\d+) in", open(log).read()) for log in logs]
  assert saved[0] and saved[0] == saved[1], saved  # both processes stop at the same step
  preempted_at = int(saved[0][0])
  assert 1 <= preempted_at < STEPS
  assert os.listdir(two / "checkpoints") == [str(preempted_at)]
  wait_all(start_two_processes(two, logs), logs)
  wait_all([start_run(tmp_path / "one", tmp_path / "one.log", None)], [tmp_path / "one.log"])

  def losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}

  expected, got = losses(tmp_path / "one"), losses(two)
  assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                             [expected[s] for s in range(1, STEPS + 1)],
                             rtol=1e-5)
  # Only process 0 writes metrics: each step once over both starts, one TensorBoard file each.
  records = [json.loads(line) for line in open(two / "metrics.jsonl", encoding="utf-8")]
  assert [r["step"] for r in records if "train/loss" in r] == list(range(1, STEPS + 1))
  assert len(os.listdir(two / "tensorboard")) == 2
  # Both processes write their part of every checkpoint.
  for step in (preempted_at, STEPS):
    state_dir = two / "checkpoints" / str(step) / "state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))
  final_one = json.loads((tmp_path / "one" / "final_eval.json").read_text())
  final_two = json.loads((two / "final_eval.json").read_text())
  assert final_two == pytest.approx(final_one, abs=1e-6)
