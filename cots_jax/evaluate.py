"""Eval only: `python -m cots_jax.evaluate --config=configs/X.py[:arg] --workdir=DIR [--step=N]`.

Loads checkpoint N (default the latest) of DIR, runs the config's retrieval evaluator on its eval
split with the online (`retrieval`) and momentum (`retrieval_momentum`) encoders, prints a table
of R@1/5/10 both ways, rsum and median ranks, and writes DIR/eval_results.json as
`{"<evaluator>": {"<metric>": value}}` (metric names of design §4.1). Run it on every host of a
multi-host job like cots_jax.main: each host embeds its share, all get the whole set's metrics.
The work is done by cots_jax/inference.py (`evaluate_checkpoint`), which tests call directly.

With `--zeroshot=FOLDER [--classnames=JSON] [--templates=clip] [--encoder=online]` it classifies
the images of FOLDER (one sub-folder per class, cots_jax/data/class_folder.py) zero-shot by
their class names (cots_jax/zeroshot.py) instead, prints top-1, top-5 (5 classes or more) and
mean per-class recall, writes them under "zeroshot_folder" ("zeroshot_folder_momentum" for the
momentum encoder) and the confusion matrix as DIR/zeroshot_confusion[_momentum].png.

Either way eval_results.json keeps the entries it already holds under other names. A bad input
ends the command with one error line.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
from ml_collections import config_flags

from cots_jax import distributed
from cots_jax import inference
from cots_jax import logs
from cots_jax import zeroshot
from cots_jax.data import class_folder
from cots_jax.data import zeroshot_templates

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the run to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest complete one.")
_ZEROSHOT = flags.DEFINE_string(
    "zeroshot", None, "Folder with one sub-folder of images per class: classify them zero-shot "
    "by their class names instead of running the config's evaluators.")
_CLASSNAMES = flags.DEFINE_string(
    "classnames", None, "With --zeroshot: JSON file {class folder name: class name} naming "
    "every class folder; default: the folder names, underscores as spaces.")
_TEMPLATES = flags.DEFINE_enum("templates", "clip", sorted(zeroshot_templates.TEMPLATE_SETS),
                               "With --zeroshot: the prompt template set.")
_ENCODER = flags.DEFINE_enum("encoder", "online", sorted(inference.ENCODERS),
                             "With --zeroshot: the encoder that classifies.")
flags.mark_flags_as_required(["config", "workdir"])

RESULTS_FILE = "eval_results.json"
ZEROSHOT_ENTRY = "zeroshot_folder"
ZEROSHOT_PNG = "zeroshot_confusion"
_ZEROSHOT_ONLY = ("classnames", "templates", "encoder")


def _write_results(workdir, entries):
  """Writes `entries` ({name: {metric: value}}) into WORKDIR/eval_results.json, keeping the
  entries of other names that it holds; returns its path."""
  path = epath.Path(workdir) / RESULTS_FILE
  results = {}
  if path.exists():
    try:
      results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
      raise ValueError(f"{path} is not JSON ({error}); move it away") from error
  results.update(entries)
  path.write_text(json.dumps(results, indent=2))
  return path


def _evaluate(config, workdir):
  """The config's evaluators on its eval split: prints the tables, writes the results."""
  results, step = inference.evaluate_checkpoint(config, workdir, _STEP.value)
  if jax.process_index() == 0:
    path = _write_results(workdir, results)
    print(f"checkpoint {step} of {workdir}, eval split "
          f"{config.input.data.name}:{config.input.data.eval_split}\n"
          f"{inference.results_table(results, tuple(config.eval.ks))}\nwritten to {path}")
  logging.info("eval results of step %d: %s", step, results)


def _zero_shot(config, workdir):
  """Zero-shot classification of the --zeroshot folder: prints and writes its metrics and
  confusion matrix."""
  templates = zeroshot.template_set(_TEMPLATES.value)
  listing = class_folder.read_class_folder(_ZEROSHOT.value, _CLASSNAMES.value)
  run = inference.TrainedRun.load(workdir, config, _STEP.value)
  encoder = _ENCODER.value
  run.encoder_params(encoder)  # a run without that encoder fails before any image is read
  result = zeroshot.classify_folder(
      lambda images: run.embed_images(images, encoder),
      lambda texts: run.embed_texts(texts, encoder), listing, templates, run.image_transform(),
      run.config.eval.batch_size, run.config.input.on_bad_example)
  logging.info("zero-shot results of step %d on %s: %s", run.step, listing.root, result.metrics)
  if jax.process_index() != 0:
    return
  suffix = "" if encoder == "online" else f"_{encoder}"
  entry = {**result.metrics, "num_classes": len(listing.folders),
           "num_images": result.num_images, "num_skipped": result.num_skipped,
           "folder": listing.root, "templates": _TEMPLATES.value, "step": run.step}
  path = _write_results(workdir, {ZEROSHOT_ENTRY + suffix: entry})
  png = epath.Path(workdir) / f"{ZEROSHOT_PNG}{suffix}.png"
  png.write_bytes(zeroshot.confusion_png(
      result.confusion, listing.classnames,
      f"zero-shot, step {run.step}, {encoder}: top-1 {result.metrics['top1']:.1f}%"))
  top5 = (f"{result.metrics['top5']:.2f}" if "top5" in result.metrics
          else "n/a (fewer than 5 classes)")
  print(f"checkpoint {run.step} of {workdir}, {encoder} encoder, zero-shot on {listing.root}: "
        f"{len(listing.folders)} classes, {result.num_images} images "
        f"({result.num_skipped} skipped), templates {_TEMPLATES.value} "
        f"({len(templates)} a class)\n"
        f"top-1 {result.metrics['top1']:.2f}  top-5 {top5}  "
        f"mean per-class recall {result.metrics['mean_per_class_recall']:.2f}\n"
        f"written to {path} ({ZEROSHOT_ENTRY + suffix}) and {png}")


def main(argv):
  logs.quiet_terminal()
  distributed.initialize(argv)
  config = _CONFIG.value
  workdir = os.path.expanduser(_WORKDIR.value)
  logs.log_to_file(logs.workdir_log(workdir))  # appended to the run's log
  try:
    if _ZEROSHOT.value is None:
      stray = [f"--{name}" for name in _ZEROSHOT_ONLY if flags.FLAGS[name].present]
      if stray:
        raise ValueError(f"{', '.join(stray)}: only with --zeroshot=FOLDER")
      _evaluate(config, workdir)
    else:
      _zero_shot(config, workdir)
  except (ValueError, OSError) as error:
    sys.exit(f"cots_jax.evaluate: error: {error}")


if __name__ == "__main__":
  app.run(main)
