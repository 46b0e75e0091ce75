"""Matplotlib for the reports (cots_jax.report, cots_jax.experiments): the Agg backend, chosen
before pyplot is imported (PNGs only, no display needed), new figures and figures as PNG bytes."""

import io

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402


def subplots(*args, **kwargs):
  """`plt.subplots` on the Agg backend -> (figure, axes)."""
  return plt.subplots(*args, **kwargs)


def figure_png(figure):
  """PNG bytes of `figure`, which is closed after (pyplot keeps every open figure alive)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  plt.close(figure)
  return buffer.getvalue()
