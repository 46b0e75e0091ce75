"""The report of a grid's finished runs: WORKDIR/results.md (R@K and rsum per variant, mean ±
sample std over seeds; AMF's catch of the injected noisy pairs when the runs log it),
results.png, and for AMF amf_catch.csv and amf_catch.png.
"""

import csv
import dataclasses
import os

import ml_collections
import numpy as np

from cots_jax import config_validation
from cots_jax import metrics_writer
from cots_jax import paths
from cots_jax import plots
from cots_jax.experiments import runner

RESULTS_FILE = "results.md"
RESULTS_PLOT = "results.png"
AMF_CSV = "amf_catch.csv"
AMF_PLOT = "amf_catch.png"
# (column, final_eval.json key under eval/retrieval/), the R@K of both directions and their sum.
RETRIEVAL_COLUMNS = (("i2t R@1", "i2t_r1"), ("i2t R@5", "i2t_r5"), ("i2t R@10", "i2t_r10"),
                     ("t2i R@1", "t2i_r1"), ("t2i R@5", "t2i_r5"), ("t2i R@10", "t2i_r10"),
                     ("rsum", "rsum"))
AMF_NAMES = ("train/amf_kept_noisy", "train/amf_kept_clean", "train/noisy_fraction")
AMF_COLUMNS = ("kept noisy", "kept clean", "recall", "precision")


@dataclasses.dataclass
class AmfSeries:
  """A run's logged AMF catch, one entry per logged step (float64 [n] unless said).

  Attributes:
    steps: int64 [n]; kept_noisy / kept_clean: share of the batch's injected / clean pairs AMF
    kept (1 when the batch holds none); noisy_fraction: the batch's share of injected pairs;
    active: bool [n], AMF enabled and filtering at that step (past its warm-up).
  """
  steps: np.ndarray
  kept_noisy: np.ndarray
  kept_clean: np.ndarray
  noisy_fraction: np.ndarray
  active: np.ndarray


@dataclasses.dataclass
class RunResult:
  """A finished run: its seed, final_eval.json (flat {name: value}), wall seconds (None without
  experiment.json), whether AMF was enabled, and its AmfSeries (None when it logged none)."""
  seed: int
  final: dict
  wall: float | None
  amf_enabled: bool
  amf: AmfSeries | None


def amf_series(path, config):
  """The AmfSeries of run dir `path` whose config.json is `config` (ConfigDict), or None when
  its metrics.jsonl has no train/amf_kept_noisy."""
  if not os.path.exists(os.path.join(path, "metrics.jsonl")):
    return None
  metrics = metrics_writer.read_series(path)
  if AMF_NAMES[0] not in metrics:
    return None
  # The step logs the three together (cots_jax/step.py amf_catch_metrics): one step axis.
  steps = metrics[AMF_NAMES[0]][0]
  kept_noisy, kept_clean, noisy_fraction = (metrics[name][1] for name in AMF_NAMES)
  # Logged step s is the update from state step s - 1; AMF filters from state step `warmup` on
  # (cots_jax/step.py).
  active = (steps > config_validation.amf_warmup_steps(config)) & bool(config.amf.enabled)
  return AmfSeries(steps, kept_noisy, kept_clean, noisy_fraction, active)


def amf_catch(series):
  """What AMF caught over the active steps of `series`: {"kept noisy", "kept clean", "recall",
  "precision": float, or None where undefined}.

  kept noisy / clean: mean over the steps whose batch holds injected / clean pairs; recall =
  1 - kept noisy (share of injected pairs dropped); precision = dropped injected / all dropped,
  from sums over the steps of nf (1 - kn) and (1 - nf) (1 - kc).
  """
  nf, kn, kc = (values[series.active] for values in
                (series.noisy_fraction, series.kept_noisy, series.kept_clean))
  noisy, clean = nf > 0, nf < 1
  kept_noisy = float(np.mean(kn[noisy])) if noisy.any() else None
  kept_clean = float(np.mean(kc[clean])) if clean.any() else None
  dropped_noisy = np.sum(nf[noisy] * (1 - kn[noisy]))
  dropped = dropped_noisy + np.sum((1 - nf[clean]) * (1 - kc[clean]))
  return {"kept noisy": kept_noisy, "kept clean": kept_clean,
          "recall": None if kept_noisy is None else 1 - kept_noisy,
          "precision": float(dropped_noisy / dropped) if dropped > 0 else None}


def load_run(path, seed):
  """The RunResult of run dir `path`, or None when it is unfinished."""
  if not runner.is_finished(path):
    return None
  record_path = os.path.join(path, runner.RUN_FILE)
  wall = runner.read_json(record_path)["wall_seconds"] if os.path.exists(record_path) else None
  config_path = os.path.join(path, "config.json")
  config = ml_collections.ConfigDict(runner.read_json(config_path)) if os.path.exists(
      config_path) else None
  return RunResult(seed, runner.read_json(os.path.join(path, paths.FINAL_EVAL_FILE)), wall,
                   bool(config and config.amf.enabled),
                   amf_series(path, config) if config else None)


def mean_std(values, digits=2):
  """"mean ± std" (sample std, ddof=1) of the non-None `values`; the mean alone for one value;
  "-" for none."""
  values = [value for value in values if value is not None]
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _markdown_table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _retrieval(run, key, encoder="retrieval"):
  return run.final.get(f"eval/{encoder}/{key}")


def plot_rsum(variants, results):
  """PNG bytes: rsum per variant, mean with sample-std error bars, online and (where any run
  has one) momentum side by side. `results` is {variant: [RunResult]}."""
  encoders = [("online", "retrieval")]
  if any(_retrieval(run, "rsum", "retrieval_momentum") is not None
         for runs in results.values() for run in runs):
    encoders.append(("momentum", "retrieval_momentum"))
  figure, axes = plots.subplots(figsize=(max(6, 1.2 * len(variants)), 4), dpi=100)
  width = 0.8 / len(encoders)
  positions = np.arange(len(variants))
  for index, (label, encoder) in enumerate(encoders):
    stats = []
    for variant in variants:
      values = [v for v in (_retrieval(run, "rsum", encoder) for run in results[variant])
                if v is not None]
      # NaN draws no bar (no finished seed) and no error bar (fewer than 2 seeds).
      stats.append((np.mean(values) if values else np.nan,
                    np.std(values, ddof=1) if len(values) > 1 else np.nan))
    means, stds = np.array(stats).T
    axes.bar(positions + (index - (len(encoders) - 1) / 2) * width, means, width, yerr=stds,
             capsize=3, label=label)
  axes.set_xticks(positions, variants, rotation=20, ha="right")
  axes.set(xlabel="variant", ylabel="rsum (%, mean ± sample std over seeds)",
           title="Retrieval rsum per variant")
  axes.grid(axis="y", alpha=0.3)
  axes.legend(fontsize="small")
  figure.tight_layout()
  return plots.figure_png(figure)


def plot_amf(variants, results):
  """PNG bytes: per logged step, the share of injected (solid) and clean (dashed) pairs that AMF
  kept, mean over seeds, for each variant whose runs filter with AMF."""
  figure, axes = plots.subplots(figsize=(7, 4), dpi=100)
  plotted = False
  for index, variant in enumerate(variants):
    series = [run.amf for run in results[variant] if run.amf_enabled and run.amf is not None]
    if not series:
      continue
    plotted = True
    steps = np.unique(np.concatenate([s.steps for s in series]))
    colour = f"C{index % 10}"
    for field, style in (("kept_noisy", "-"), ("kept_clean", "--")):
      means = [np.mean([getattr(s, field)[s.steps == step][0] for s in series
                        if step in s.steps]) for step in steps]
      axes.plot(steps, means, style, color=colour,
                label=f"{variant} {field.replace('_', ' ')}")
  axes.set(xlabel="step", ylabel="share of pairs kept (mean over seeds)",
           title="AMF: injected (solid) and clean (dashed) pairs kept")
  axes.grid(alpha=0.3)
  if plotted:
    axes.legend(fontsize="small")
  else:
    axes.text(0.5, 0.5, "AMF is off in every finished run", ha="center",
              transform=axes.transAxes)
  figure.tight_layout()
  return plots.figure_png(figure)


def load_results(workdir, held):
  """{variant: [RunResult of each finished seed]} of the grid recorded as `held` (grid.json)."""
  return {variant: [run for run in (load_run(runner.run_dir(workdir, variant, seed), seed)
                                    for seed in range(held["seeds"])) if run is not None]
          for variant in held["definition"]["variants"]}


def results_markdown(workdir, held, results):
  """The text of results.md: header, retrieval table, variants, and the AMF catch section when
  any finished run logged it."""
  definition, seeds = held["definition"], held["seeds"]
  run_line = (f"python -m cots_jax.experiments run --grid={held['grid']} --workdir={workdir} "
              f"--seeds={seeds}" + (f" --base_arg={held['base_arg']}" if held["base_arg"] else ""))
  lines = [
      f"# Grid `{held['grid']}`", "",
      f"Base config `{runner.join_config(definition['base'], held['base_arg'])}`, "
      + (f"schedule `{' '.join(runner.config_flags(definition['schedule']))}`, "
         if definition["schedule"] else "its own schedule, ")
      + (f"seeds 0..{seeds - 1}" if seeds > 1 else "seed 0")
      + (", one VQ tokenizer shared by all runs (`_vq`)." if definition.get("shared_vq") else "."),
      f"Made by `{run_line}`, then `python -m cots_jax.experiments report --workdir={workdir}`; "
      "each run's exact command is in `<variant>/seed_<s>/experiment.json`.", "",
      f"Cells are mean ± sample standard deviation (ddof=1) over the seeds that finished (column "
      f"`seeds`, of {seeds}). R@K and rsum are in percent on the base config's eval split, of the "
      "online encoder; `rsum (momentum)` is the momentum encoder's (`-`: the runs keep none). "
      "Wall: mean over seeds of each run's time summed over invocations.",
  ]
  if any(len(runs) == 1 for runs in results.values()):
    lines.append("Note: a variant with 1 finished seed shows its mean only (a std needs 2+ "
                 "seeds).")
  rows = []
  for variant, runs in results.items():
    walls = [run.wall for run in runs if run.wall is not None]
    rows.append([f"`{variant}`", str(len(runs))]
                + [mean_std([_retrieval(run, key) for run in runs]) for _, key in RETRIEVAL_COLUMNS]
                + [mean_std([_retrieval(run, "rsum", "retrieval_momentum") for run in runs]),
                   runner.format_duration(np.mean(walls)) if walls else "-"])
  header = ["variant", "seeds", *(column for column, _ in RETRIEVAL_COLUMNS), "rsum (momentum)",
            "wall"]
  lines += ["", *_markdown_table(header, rows), "", "Variants:"]
  for variant, spec in definition["variants"].items():
    changes = [f"config arg `{spec['arg']}`"] if spec.get("arg") else []
    changes += [f"`{flag}`" for flag in runner.config_flags(spec["overrides"])]
    lines.append(f"- `{variant}`: {', '.join(changes) or 'the base config as is'}")
  if any(run.amf is not None for runs in results.values() for run in runs):
    lines += ["", *amf_markdown(results)]
  return "\n".join(lines) + "\n"


def amf_markdown(results):
  """The AMF catch section of results.md: explanation and table (lines)."""
  rows = []
  for variant, runs in results.items():
    catches = [amf_catch(run.amf) for run in runs if run.amf_enabled and run.amf is not None]
    rows.append([f"`{variant}`", str(len(catches))]
                + [mean_std([catch[column] for catch in catches], 3) for column in AMF_COLUMNS])
  return [
      "## AMF catch of the injected noisy pairs", "",
      "Over the logged steps after AMF's warm-up, per run: `kept noisy` / `kept clean` = mean "
      "share of the batch's injected / clean pairs that AMF kept (steps whose batch holds some); "
      "`recall` = 1 - kept noisy (share of injected pairs dropped); `precision` = dropped injected "
      "/ all dropped, from sums over the steps. Then mean ± sample std over the seeds (column "
      "`seeds`: runs with AMF on that logged it). `-`: AMF off (it keeps every pair) or "
      f"undefined (no injected pair, nothing dropped). Per step: `{AMF_CSV}`, `{AMF_PLOT}`.", "",
      *_markdown_table(["variant", "seeds", *AMF_COLUMNS], rows)]


def write_amf_csv(path, results):
  """One row per (variant, seed, logged step) of the runs that log AMF's catch."""
  with open(path, "w", newline="", encoding="utf-8") as file:
    writer = csv.writer(file)
    writer.writerow(["variant", "seed", "step", "kept_noisy", "kept_clean", "noisy_fraction",
                     "amf_active"])
    for variant, runs in results.items():
      for run in runs:
        if run.amf is None:
          continue
        series = run.amf
        for row in zip(series.steps, series.kept_noisy, series.kept_clean, series.noisy_fraction,
                       series.active):
          writer.writerow([variant, run.seed, int(row[0]), *map(float, row[1:4]), int(row[4])])


def write_report(workdir):
  """Writes WORKDIR/results.md and results.png (and, when runs log AMF's catch, amf_catch.csv and
  amf_catch.png) from the finished runs of the grid in WORKDIR/grid.json; returns the md path."""
  grid_path = os.path.join(workdir, runner.GRID_FILE)
  if not os.path.exists(grid_path):
    raise runner.GridError(f"{workdir} holds no {runner.GRID_FILE}: no grid was run there "
                    "(python -m cots_jax.experiments run --grid=NAME --workdir=DIR)")
  held = runner.read_json(grid_path)
  results = load_results(workdir, held)
  variants = list(results)
  with open(os.path.join(workdir, RESULTS_PLOT), "wb") as file:
    file.write(plot_rsum(variants, results))
  if any(run.amf is not None for runs in results.values() for run in runs):
    write_amf_csv(os.path.join(workdir, AMF_CSV), results)
    with open(os.path.join(workdir, AMF_PLOT), "wb") as file:
      file.write(plot_amf(variants, results))
  path = os.path.join(workdir, RESULTS_FILE)
  with open(path, "w", encoding="utf-8") as file:
    file.write(results_markdown(workdir, held, results))
  return path
