"""A quiet terminal (cots_jax/logs.py): progress, eval lines, warnings and errors on the terminal;
the libraries' INFO records (Orbax, absl, ...) in the workdir's log.txt."""

import re
import subprocess
import sys

import pytest

from support import ABSL_INFO, REPO, start_main, subprocess_env, tiny_flags

TIMEOUT = 600


@pytest.mark.slow
def test_a_run_shows_progress_and_evals_and_writes_library_info_to_the_workdir_log(tmp_path):
  workdir, terminal_path = tmp_path / "run", tmp_path / "terminal.txt"
  process = start_main(workdir, terminal_path,
                       *tiny_flags(**{"total_steps": 4, "vq.steps": 2, "checkpoint_every": 2}))
  assert process.wait(timeout=TIMEOUT) == 0, terminal_path.read_text()[-4000:]
  terminal = terminal_path.read_text()
  assert "train: 100%" in terminal and "step 4: retrieval: i2t R@1/5/10" in terminal
  assert not ABSL_INFO.search(terminal), terminal[-4000:]
  assert "PyTorch was not found" not in terminal
  log = (workdir / "log.txt").read_text()
  assert re.search(ABSL_INFO.pattern + r" JAX process 0 / 1, devices", log)  # held until the file
  assert re.search(ABSL_INFO.pattern + r" update step compiled in", log)
  for step in (2, 4):  # Orbax's own INFO lines
    assert re.search(r"I\d{4} .* checkpoint_manager\.py:\d+\] .*Saving checkpoint at step "
                     f"{step}", log)


def test_the_terminal_gets_warnings_and_errors_and_the_file_every_record_in_order(tmp_path):
  script = """
import logging as python_logging, sys
from absl import app, logging
from cots_jax import logs

def main(argv):
  logs.quiet_terminal()
  logging.info("info before the file")
  logging.warning("warning before the file")
  logs.log_to_file(argv[1])
  python_logging.getLogger("some.library").info("library info")
  logging.error("an error")
  import transformers  # its notice "PyTorch was not found" is advice: off

app.run(main)
"""
  path = tmp_path / "logs" / "log.txt"
  result = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)
  assert result.returncode == 0, result.stderr
  terminal = result.stdout + result.stderr
  assert "warning before the file" in terminal and "an error" in terminal
  assert "info" not in terminal and "PyTorch" not in terminal
  messages = [line.split("] ", 1)[1] for line in path.read_text().splitlines()]
  assert messages == ["info before the file", "warning before the file", "library info",
                      "an error"]
