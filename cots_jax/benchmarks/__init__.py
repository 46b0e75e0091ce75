"""Benchmarks: scripts that print their figures and write them as JSON (see each module)."""

import json


def write_results(results, path):
  """Writes `results` (a JSON-able dict) to `path`, indented; nothing when `path` is empty."""
  if path:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
