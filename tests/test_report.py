"""The run report (cots_jax/report.py): metrics reading, curve panels, retrieval examples, HTML."""

import io
import json
import os
import re
import shutil

import numpy as np
from PIL import Image
import pytest

from cots_jax import plots
from cots_jax import report
from cots_jax.data import transforms
from support import ABSL_INFO, run_module

NUM_CAPTIONS = 3


def _copy_run(trained_run, tmp_path, name="run"):
  """A private copy of the shared fixture's workdir (the report writes into it)."""
  return shutil.copytree(trained_run, tmp_path / name)


def _img_sources(page):
  return re.findall(r"<img src='([^']+)'", page)


@pytest.fixture(scope="module")
def written(trained_run, tmp_path_factory):
  """(workdir, html text, examples) of the report of a copy of the fixture run."""
  workdir = _copy_run(trained_run, tmp_path_factory.mktemp("report"))
  path, examples = report.write_report(workdir, num_captions=NUM_CAPTIONS, seed=1)
  return workdir, path.read_text(), examples


def test_final_eval_takes_each_evaluators_last_eval():
  series = lambda steps, values: (np.array(steps), np.array(values, float))
  metrics = {"train/loss": series([6, 12], [2.0, 1.0]),
             "eval/retrieval/t2i_r1": series([6, 12], [10.0, 40.0]),
             "eval/retrieval/rsum": series([6, 12], [60.0, 240.0]),
             "eval/retrieval/old_metric": series([6], [1.0]),
             "eval/zero_shot/top1": series([6], [33.0])}
  assert report.final_eval(metrics) == {
      "retrieval": (12, {"t2i_r1": 40.0, "rsum": 240.0}), "zero_shot": (6, {"top1": 33.0})}


def test_curve_panels_leave_absent_metrics_out_with_a_note():
  one = (np.array([3]), np.array([1.0]))
  panels, notes = report.curve_panels({"train/itc": one, "train/loss": one, "train/lr": one})
  assert panels == [("Losses", "losses.png", ["train/loss", "train/itc"])]
  assert [note.split(":")[0] for note in notes] == ["Temperature", "AMF kept fraction", "R@K"]


def test_curve_panels_draw_cookie_losses_and_unimodal_recalls():
  one = (np.array([3]), np.array([1.0]))
  names = ["train/loss", "train/cookie_cm", "train/cookie_vv", "train/cookie_tt",
           "eval/retrieval/i2t_r1", "eval/retrieval/rsum", "eval/text_matching/r1",
           "eval/text_matching/r10", "eval/text_matching/medr", "eval/image_instance/r5"]
  panels, _ = report.curve_panels({name: one for name in names})
  assert panels[0] == ("Losses", "losses.png", names[:4])
  assert panels[1:] == [
      ("R@K of eval/retrieval (%)", "recall_retrieval.png", ["eval/retrieval/i2t_r1"]),
      ("R@K of eval/text_matching (%)", "recall_text_matching.png",
       ["eval/text_matching/r1", "eval/text_matching/r10"]),
      ("R@K of eval/image_instance (%)", "recall_image_instance.png",
       ["eval/image_instance/r5"])]


def test_to_uint8_inverts_to_unit_range_and_clips():
  every = np.arange(256, dtype=np.uint8).reshape(1, -1, 1).repeat(3, axis=2)
  np.testing.assert_array_equal(report.to_uint8(transforms.to_unit_range(every)), every)
  np.testing.assert_array_equal(report.to_uint8(np.array([[-1.5, 0.0, 2.0]])), [[0, 128, 255]])


def test_pick_captions_is_seeded_distinct_and_bounded():
  picked = report.pick_captions(100, 6, seed=0)
  assert picked.shape == (6,) and len(set(picked)) == 6 and picked.min() >= 0
  assert picked.max() < 100
  np.testing.assert_array_equal(picked, report.pick_captions(100, 6, seed=0))
  assert not np.array_equal(picked, report.pick_captions(100, 6, seed=1))
  assert sorted(report.pick_captions(4, 6, seed=0)) == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="num_captions must be >= 1"):
    report.pick_captions(100, 0, seed=0)


def test_true_image_rank_matches_a_sort_with_ties_against_the_query():
  rng = np.random.default_rng(0)
  for _ in range(50):
    scores = rng.integers(0, 6, size=12).astype(np.float32)  # many ties
    true_index = int(rng.integers(12))
    # Reference: sort by score, descending; among equal scores the true image goes last.
    order = np.lexsort((np.arange(12) == true_index, -scores))
    expected = 1 + int(np.flatnonzero(order == true_index)[0])
    assert report.true_image_rank(scores, true_index) == (expected, expected <= 5)
  assert report.true_image_rank([np.nan, 0.5, 0.2], 1) == (2, True)
  assert report.true_image_rank([0.1, np.nan, 0.2], 1, k=2) == (3, False)


def test_image_strip_frames_only_the_true_image():
  pixels = np.full((5, 8, 8, 3), 90, np.uint8)
  is_true = np.array([False, False, True, False, False])
  strip = np.asarray(report.image_strip(pixels, is_true, [f"#{i}" for i in range(5)]))
  tile = report.MIN_TILE_PX + 2 * report.FRAME_PX
  assert strip.shape == (tile + report.LABEL_PX, 5 * tile + 4 * report.GAP_PX, 3)
  for column in range(5):
    left = column * (tile + report.GAP_PX)
    frame = report.TRUE_COLOUR if is_true[column] else (255, 255, 255)
    np.testing.assert_array_equal(strip[1, left + 1], frame)
    np.testing.assert_array_equal(strip[tile // 2, left + tile // 2], [90, 90, 90])


def test_render_html_escapes_captions():
  example = report.Example("a <red> circle & \"square\"", 4, 7, np.arange(5), np.zeros(5),
                           np.zeros((5, 8, 8, 3), np.uint8))
  page = report.render_html({"workdir": "/x<y>"}, {}, [], ["note <1>"], [example])
  assert "a &lt;red&gt; circle &amp; &quot;square&quot;" in page
  assert "/x&lt;y&gt;" in page and "note &lt;1&gt;" in page and "<red>" not in page
  assert "rank 7 (not in the top 5)" in page


def test_report_pictures_exist_and_are_valid_pngs(written):
  workdir, page, _ = written
  sources = _img_sources(page)
  for name in ["losses", "temperature", "amf_kept", "recall_retrieval",
               "recall_retrieval_momentum"]:
    assert f"report/{name}.png" in sources
  for source in sources:
    assert not os.path.isabs(source)
    with Image.open(os.path.join(workdir, source)) as image:
      assert image.format == "PNG"
      image.verify()
  assert "<th>checkpoint step</th><td>12</td>" in page
  assert "<th>encoder</th><td>online</td>" in page


def test_report_final_eval_table_holds_the_last_eval_record(written):
  workdir, page, _ = written
  with open(os.path.join(workdir, "metrics.jsonl")) as lines:
    last = [json.loads(line) for line in lines if '"eval/retrieval/' in line][-1]
  assert f"<td>retrieval</td><td>{last['step']}</td><td>{last['eval/retrieval/i2t_r1']:.2f}</td>" \
      in page


def test_report_examples_show_the_top_5_and_mark_the_true_image(written):
  workdir, page, examples = written
  assert len(examples) == NUM_CAPTIONS
  assert page.count("<div class='example'>") == NUM_CAPTIONS
  tile = report.MIN_TILE_PX + 2 * report.FRAME_PX
  for number, example in enumerate(examples):
    assert example.top_indices.shape == (5,) and example.pixels.shape[0] == 5
    assert np.all(np.diff(example.top_scores) <= 0)
    hits = np.flatnonzero(example.top_indices == example.true_index)
    # Scores of a trained model do not tie, so the true image's place in the strip is its rank.
    assert (example.rank <= 5) == (hits.size == 1)
    if hits.size:
      assert example.rank == hits[0] + 1
    assert f"rank {example.rank} (" in page
    with Image.open(os.path.join(workdir, "report", f"example_{number}.png")) as image:
      assert image.size == (5 * tile + 4 * report.GAP_PX, tile + report.LABEL_PX)


def test_report_without_eval_records_leaves_the_recall_panel_out(trained_run, tmp_path):
  workdir = _copy_run(trained_run, tmp_path)
  jsonl = workdir / "metrics.jsonl"
  jsonl.write_text("".join(line for line in jsonl.read_text().splitlines(keepends=True)
                           if '"eval/' not in line))
  path, examples = report.write_report(workdir, num_captions=1, encoder="momentum")
  page = path.read_text()
  assert len(examples) == 1 and "<th>encoder</th><td>momentum</td>" in page
  assert not any("recall" in source for source in _img_sources(page))
  assert not list((workdir / "report").glob("recall_*.png"))
  assert "R@K: no eval/" in page and "No eval/* records" in page


def test_cli_writes_the_report(trained_run, tmp_path):
  workdir = _copy_run(trained_run, tmp_path)
  result = run_module("cots_jax.report", f"--workdir={workdir}", "--num_captions=2")
  assert (workdir / "report.html").exists() and "report written to" in result.stdout
  assert not ABSL_INFO.search(result.stderr)  # Orbax's restore lines: in the workdir's log
  assert "Restoring checkpoint from" in (workdir / "log.txt").read_text()
  assert sorted(p.name for p in (workdir / "report").glob("example_*.png")) == [
      "example_0.png", "example_1.png"]


def test_figure_png_renders_the_figure_and_closes_it():
  figure, axes = plots.subplots(figsize=(2, 1), dpi=50)
  axes.plot([0, 1], [1, 0])
  png = plots.figure_png(figure)
  with Image.open(io.BytesIO(png)) as image:
    assert (image.format, image.size) == ("PNG", (100, 50))
  assert not plots.plt.fignum_exists(figure.number)
