"""A quiet terminal and a complete log file, for the entries (main, evaluate, report, search,
export), and the launch of a tool with its own flags (`run_tool`).

The libraries log much at INFO through Python's logging (Orbax a hundred lines per checkpoint,
absl, jax, grain). The terminal shows only warnings and errors of it, beside what the entries
print themselves (the progress bar, the eval lines, tables). Every record from INFO up (absl's
--verbosity) goes to a log file, appended to by every run: WORKDIR/log.txt, or
WORKDIR/log.process_N.txt on process N > 0 of a multi-process job. An object on a bucket cannot
be appended to, so for a gs:// workdir the file lies in absl's log dir (--log_dir, else the temp
dir) under the workdir's name: gs://bucket/runs/x logs to /tmp/x.log.txt.
"""

import logging
from logging import handlers
import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from etils import epath
import jax

from cots_jax import paths

LOG_FILE = "log.txt"
# The records logged between `quiet_terminal` and `log_to_file` (jax.distributed starts there,
# and only then is the process index, part of the file name, known), held for the file.
_held = handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)


def quiet_terminal():
  """From now on the terminal shows warnings and errors only; the records of lower levels are
  held for `log_to_file`. Also turns off transformers' advisory notices ("PyTorch was not
  found ...": it only tokenises here). Call it first in an entry, after absl parsed the flags."""
  # transformers reads it when it is imported: later, by the tokenizer (also in grain workers).
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  absl_logging.get_absl_handler().setLevel(logging.WARNING)
  logging.getLogger().addHandler(_held)


def log_to_file(path):
  """Appends every log record, those held by `quiet_terminal` first, to the local file `path`
  (its folder is made), in absl's format."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  file_handler = logging.FileHandler(path, encoding="utf-8")
  file_handler.setFormatter(absl_logging.PythonFormatter())
  _held.setTarget(file_handler)
  _held.flush()
  logging.getLogger().removeHandler(_held)
  logging.getLogger().addHandler(file_handler)


def workdir_log(workdir):
  """The log file of this process for a run in WORKDIR (see the module docstring); jax.distributed
  must have started."""
  process = jax.process_index()
  name = LOG_FILE if process == 0 else f"log.process_{process}.txt"
  if paths.is_local(workdir):
    return os.path.join(workdir, name)
  return os.path.join(absl_logging.find_log_dir(), f"{epath.Path(workdir).name}.{name}")


def tool_log(tool):
  """The log file of a tool that works on no workdir of its own: cots_jax.TOOL.log.txt in absl's
  log dir."""
  return os.path.join(absl_logging.find_log_dir(), f"cots_jax.{tool}.{LOG_FILE}")


def tool_main(tool, run):
  """The absl main of `python -m cots_jax.TOOL`, a tool that takes flags only: calls `run()`;
  a ValueError or OSError (bad input) exits with one line naming the tool."""

  def main(argv):
    if len(argv) != 1:
      raise app.UsageError(f"cots_jax.{tool} takes flags only; got {argv[1:]}")
    try:
      run()
    except (ValueError, OSError) as error:
      sys.exit(f"cots_jax.{tool}: error: {error}")

  return main


def run_tool(tool, tool_flags, main):
  """Runs `main` as the program `python -m cots_jax.TOOL`, with the tool's own flags
  (`tool_flags`, a FlagValues kept apart from absl's global FLAGS so that tools can import each
  other) parsed and listed by --help, and its logs quiet: warnings and errors on the terminal,
  every record in `tool_log(tool)`."""
  # This process imports no other entry, so absl's global FLAGS can take the tool's flags.
  flags.FLAGS.append_flag_values(tool_flags)
  for flag_name in tool_flags:
    flags.declare_key_flag(flag_name)
  tool_flags.mark_as_parsed()

  def quiet_logs():
    quiet_terminal()
    log_to_file(tool_log(tool))

  app.call_after_init(quiet_logs)
  app.run(main)
