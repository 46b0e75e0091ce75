"""Run report: `python -m cots_jax.report --workdir=DIR [--num_captions=6] [--encoder=online]
[--step=N] [--seed=0]`.

Writes DIR/report.html and its pictures under DIR/report/: the training curves of
DIR/metrics.jsonl (losses, temperature, AMF kept fraction, R@K of each evaluator over steps) and,
for `num_captions` eval captions drawn with `seed`, the top-5 images that checkpoint N (default the
latest) retrieves from the whole eval gallery, the true image framed in green. The HTML links its
PNGs by relative paths, so DIR can be copied or opened anywhere as one folder.
"""

import dataclasses
import html
import io
import os
import re

from absl import app
from absl import flags
from etils import epath
from matplotlib import ticker
import numpy as np
from PIL import Image
from PIL import ImageDraw

from cots_jax import inference
from cots_jax import logs
from cots_jax import metrics_writer
from cots_jax import plots
from cots_jax.data import eval_split
from cots_jax.evaluators import retrieval

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the run to report on.")
_NUM_CAPTIONS = flags.DEFINE_integer("num_captions", 6, "Eval captions shown with their top 5.")
_ENCODER = flags.DEFINE_enum("encoder", "online", sorted(inference.ENCODERS),
                             "Encoder of the retrieval examples.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest complete one.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the caption pick.")
flags.mark_flags_as_required(["workdir"])

REPORT_FILE = "report.html"
PICTURES_DIR = "report"  # Under the workdir, next to report.html.
TOP_K = 5
LOSS_NAMES = ("train/loss", "train/itc", "train/kl_align", "train/mlm", "train/mvm",
              "train/cookie_cm", "train/cookie_vv", "train/cookie_tt")
# Cross-modal R@K (i2t_r1, t2v_r5, ...) and unimodal R@K (r1, ...: text matching, image instance).
RECALL_PATTERN = re.compile(r"eval/(?P<evaluator>[^/]+)/(?:(?:i2t|t2i|v2t|t2v)_)?r\d+")
FRAME_PX, GAP_PX, LABEL_PX, MIN_TILE_PX = 4, 6, 30, 96
TRUE_COLOUR = (0, 170, 0)


def curve_panels(metrics):
  """The curve panels that `metrics` (of metrics_writer.read_series) can fill, and a note per absent one.

  Returns:
    ([(title, file name, [metric names])], [note str]): losses, temperature, AMF kept fraction,
    one R@K panel per evaluator found under eval/*.
  """
  panels, notes = [], []
  fixed = [("Losses", "losses.png", LOSS_NAMES), ("Temperature", "temperature.png", ["train/temp"]),
           ("AMF kept fraction", "amf_kept.png", ["train/amf_kept"])]
  for title, file_name, names in fixed:
    present = [name for name in names if name in metrics]
    if present:
      panels.append((title, file_name, present))
    else:
      notes.append(f"{title}: no {' / '.join(names)} in metrics.jsonl, panel left out.")
  recalls = {}
  for name in metrics:
    match = RECALL_PATTERN.fullmatch(name)
    if match:
      recalls.setdefault(match["evaluator"], []).append(name)
  for evaluator, names in recalls.items():
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", evaluator)
    panels.append((f"R@K of eval/{evaluator} (%)", f"recall_{safe}.png", names))
  if not recalls:
    notes.append("R@K: no eval/<evaluator>/[i2t_|t2i_]r<k> in metrics.jsonl (no eval has run), "
                 "panel left out.")
  return panels, notes


def plot_panel(metrics, title, names):
  """PNG bytes of one panel: each of `names` against its steps (markers for short series, so a
  single eval shows as a point)."""
  figure, axes = plots.subplots(figsize=(6, 3.5), dpi=100)
  for name in names:
    steps, values = metrics[name]
    axes.plot(steps, values, marker="o" if steps.size < 30 else None, label=name)
  axes.set(title=title, xlabel="step")
  logged = np.unique(np.concatenate([metrics[name][0] for name in names]))
  if logged.size == 1:  # One logged step: a single tick, not the fractional ones around it.
    axes.set_xticks(logged)
  else:
    axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  axes.grid(alpha=0.3)
  axes.legend(fontsize="small")
  figure.tight_layout()
  return plots.figure_png(figure)


def final_eval(metrics):
  """{evaluator: (step, {metric: value})}: each evaluator's eval/* values at its last eval step."""
  series = {}
  for name, steps_values in metrics.items():
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "eval":
      series.setdefault(parts[1], {})[parts[2]] = steps_values
  final = {}
  for evaluator, by_metric in series.items():
    step = max(int(steps[-1]) for steps, _ in by_metric.values())
    final[evaluator] = (step, {metric: float(values[-1]) for metric, (steps, values)
                               in by_metric.items() if steps[-1] == step})
  return final


def to_uint8(images):
  """float [..., 3] in [-1, 1] (the eval pixels) -> uint8 [..., 3] (inverse of to_unit_range)."""
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def pick_captions(num_texts, num_captions, seed):
  """Indices of min(num_captions, num_texts) distinct captions drawn with `seed`, int64 [n]."""
  if num_captions < 1:
    raise ValueError(f"num_captions must be >= 1, got {num_captions}")
  rng = np.random.default_rng(seed)
  return rng.choice(num_texts, size=min(num_captions, num_texts), replace=False).astype(np.int64)


def true_image_rank(scores, true_index, k=TOP_K):
  """(1-based rank of gallery item `true_index` under `scores` [m], whether rank <= k).

  Ties go against the query as in evaluators/retrieval.py: an item scoring equal to the true one,
  or NaN on either side, ranks ahead of it.
  """
  scores = np.asarray(scores, np.float64)
  others = np.arange(scores.shape[0]) != true_index
  rank = 1 + int(np.sum(~(scores[others] < scores[true_index])))
  return rank, rank <= k


@dataclasses.dataclass
class Example:
  """One eval caption and what the encoder retrieves for it.

  Attributes:
    caption: the text; true_index: its image in the gallery; rank: 1-based gallery rank of that
    image (true_image_rank); top_indices int64 [k], top_scores [k]: the best k, best first;
    pixels: uint8 [k, S, S, 3] of those images.
  """
  caption: str
  true_index: int
  rank: int
  top_indices: np.ndarray
  top_scores: np.ndarray
  pixels: np.ndarray


def retrieval_examples(run, split, caption_indices, encoder="online", k=TOP_K):
  """Embeds the whole gallery of `split` (EvalSplit) and the captions `caption_indices` [n] with
  `encoder` of `run` (TrainedRun) -> n Examples, each with the top k of the gallery."""
  images_emb = retrieval.embed_dataset(
      lambda batch: run.embed_images(batch["image"], encoder), split.image_batches())
  captions = [split.captions[i] for i in caption_indices]
  captions_emb = run.embed_texts(captions, encoder)
  top_scores, top_indices = retrieval.top_k_chunked(captions_emb, images_emb, k,
                                                    run.config.eval.chunk)
  pixels = _gallery_pixels(split, np.unique(top_indices))
  examples = []
  for row, caption_index in enumerate(caption_indices):
    true_index = int(split.txt2img[caption_index])
    rank, _ = true_image_rank(images_emb @ captions_emb[row], true_index, k)
    examples.append(Example(captions[row], true_index, rank, top_indices[row], top_scores[row],
                            np.stack([pixels[i] for i in top_indices[row]])))
  return examples


def _gallery_pixels(split, wanted):
  """{gallery index: uint8 [S, S, 3]} of the `wanted` images, in one pass over the batches."""
  found, offset = {}, 0
  for batch in split.image_batches():
    images = batch["image"][np.asarray(batch["valid"], bool)]
    for index in wanted[(wanted >= offset) & (wanted < offset + len(images))]:
      found[int(index)] = to_uint8(images[index - offset])
    offset += len(images)
  return found


def image_strip(pixels, is_true, labels):
  """A row of k tiles (uint8 [k, S, S, 3], upscaled to MIN_TILE_PX), the tiles with is_true [k]
  framed in TRUE_COLOUR, each with its label below -> RGB PIL image."""
  side = max(pixels.shape[1], MIN_TILE_PX)
  tile = side + 2 * FRAME_PX
  strip = Image.new("RGB", (len(pixels) * (tile + GAP_PX) - GAP_PX, tile + LABEL_PX), "white")
  draw = ImageDraw.Draw(strip)
  for column, (image, true, label) in enumerate(zip(pixels, is_true, labels)):
    left = column * (tile + GAP_PX)
    if true:
      draw.rectangle([left, 0, left + tile - 1, tile - 1], fill=TRUE_COLOUR)
    strip.paste(Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST),
                (left + FRAME_PX, FRAME_PX))
    draw.text((left + 2, tile + 2), label, fill=TRUE_COLOUR if true else "black")
  return strip


def write_report(workdir, num_captions=6, encoder="online", step=None, seed=0):
  """Writes WORKDIR/report.html + PNGs under WORKDIR/report/; returns (html path, examples)."""
  root = epath.Path(workdir)
  pictures = root / PICTURES_DIR
  pictures.mkdir(parents=True, exist_ok=True)
  metrics = metrics_writer.read_series(workdir)
  panels, notes = curve_panels(metrics)
  for title, file_name, names in panels:
    (pictures / file_name).write_bytes(plot_panel(metrics, title, names))
  run = inference.TrainedRun.load(workdir, step=step)
  split = eval_split.make_eval_split(run.config)
  examples = retrieval_examples(run, split, pick_captions(split.num_texts, num_captions, seed),
                                encoder)
  for number, example in enumerate(examples):
    is_true = example.top_indices == example.true_index
    labels = [f"#{i + 1}  {score:.3f}" + (f"\ntrue, rank {example.rank}" if true else "")
              for i, (score, true) in enumerate(zip(example.top_scores, is_true))]
    buffer = io.BytesIO()
    image_strip(example.pixels, is_true, labels).save(buffer, format="png")
    (pictures / f"example_{number}.png").write_bytes(buffer.getvalue())
  header = {"workdir": os.fspath(workdir), "checkpoint step": run.step, "encoder": encoder,
            "eval gallery": f"{split.num_images} images, {split.num_texts} captions"}
  path = root / REPORT_FILE
  path.write_text(render_html(header, final_eval(metrics), panels, notes, examples))
  return path, examples


def render_html(header, final, panels, notes, examples):
  """The report page: header table, final eval table, curves (+ notes), examples -> str."""
  esc = html.escape
  rows = "".join(f"<tr><th>{esc(key)}</th><td>{esc(str(value))}</td></tr>"
                 for key, value in header.items())
  parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>cots_jax report</title>"
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}</style></head><body>",
           f"<h1>cots_jax report</h1><table>{rows}</table><h2>Final eval</h2>"]
  columns = list(dict.fromkeys(name for _, results in final.values() for name in results))
  if final:
    parts.append("<table><tr><th>evaluator</th><th>step</th>"
                 + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>")
    for evaluator, (step, results) in final.items():
      cells = "".join(f"<td>{results[c]:.2f}</td>" if c in results else "<td></td>"
                      for c in columns)
      parts.append(f"<tr><td>{esc(evaluator)}</td><td>{step}</td>{cells}</tr>")
    parts.append("</table>")
  else:
    parts.append("<p>No eval/* records in metrics.jsonl.</p>")
  parts.append("<h2>Training curves</h2>")
  parts += [f"<p><img src='{PICTURES_DIR}/{file_name}' alt='{esc(title)}'></p>"
            for title, file_name, _ in panels]
  parts += [f"<p class='note'>{esc(note)}</p>" for note in notes]
  parts.append(f"<h2>Retrieval examples (top {TOP_K}, true image framed in green)</h2>")
  for number, example in enumerate(examples):
    found = f"{'' if example.rank <= TOP_K else 'not '}in the top {TOP_K}"
    parts.append(f"<div class='example'><p><b>{esc(example.caption)}</b><br>true image "
                 f"{example.true_index}: rank {example.rank} ({found})</p>"
                 f"<img src='{PICTURES_DIR}/example_{number}.png' alt='top {TOP_K}'></div>")
  parts.append("</body></html>\n")
  return "\n".join(parts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = os.path.expanduser(_WORKDIR.value)
  logs.quiet_terminal()
  logs.log_to_file(logs.workdir_log(workdir))
  path, _ = write_report(workdir, _NUM_CAPTIONS.value, _ENCODER.value, _STEP.value, _SEED.value)
  print(f"report written to {path}")


if __name__ == "__main__":
  app.run(main)
