"""Shard lists: the files a shard spec names, for every sharded source (webdataset tars,
ArrayRecord files) and the converter.

A spec is a list of patterns or one string of comma-separated ones; a pattern is a path, a brace
pattern (`shards/{00000..00099}.tar`, zero padding kept; `{cc3m,cc12m}`; nested, left to right)
or a glob (local with `**`, or remote through etils.epath), local or gs://. Listed files that do
not exist (img2dataset's failed shards) are dropped with one warning; a pattern that matches
nothing, and a remote one that cannot be listed (no credentials, no network), fail with one
line naming it.
"""

import glob
import os
import re

from absl import logging
from etils import epath

from cots_jax import paths

_GLOB_CHARS = re.compile(r"[*?[]")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def one_line(error, limit=300):
  """str(error) on one line, at most `limit` characters."""
  text = " ".join(str(error).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def remote_error(path, error):
  """ValueError for a remote `path` that could not be read: no credentials, no network, ..."""
  if isinstance(error, ImportError):  # fsspec without its gcsfs / s3fs plugin
    return ValueError(f"{path}: cannot read it ({one_line(error)}; pip install gcsfs for gs://)")
  return ValueError(
      f"{path}: cannot read it ({type(error).__name__}: {one_line(error)}); check the "
      "credentials (gcloud auth application-default login, or the VM's service account) and "
      "the network")




def _split_top_level(text, where):
  """`text` split at the commas outside braces; ValueError naming `where` for unbalanced ones."""
  parts, depth, start = [], 0, 0
  for i, char in enumerate(text):
    depth += {"{": 1, "}": -1}.get(char, 0)
    if depth < 0:
      break
    if char == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  if depth:
    raise ValueError(f"{where}: unbalanced braces in the shard pattern")
  return parts + [text[start:]]


def _brace_alternatives(body, pattern):
  """The strings that `{body}` stands for: a range a..b (zero-padded to the longer end when
  either has a leading zero), or the comma-separated list (nested braces left for later)."""
  match = _RANGE.fullmatch(body)
  if match:
    first, last = match.groups()
    padded = any(len(end.lstrip("-")) > 1 and end.lstrip("-")[0] == "0" for end in (first, last))
    width = max(len(first), len(last)) if padded else 0
    step = 1 if int(last) >= int(first) else -1
    return [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
  alternatives = _split_top_level(body, pattern)
  if len(alternatives) < 2:
    raise ValueError(f"{pattern}: {{{body}}} is neither a range {{a..b}} nor a list {{a,b}}")
  return alternatives


def expand_braces(pattern):
  """Every string of a brace pattern, in order: "s/{00..02}.tar" -> s/00.tar, s/01.tar,
  s/02.tar; "{a,b}/x" -> a/x, b/x; nested and repeated braces expand left to right."""
  start = pattern.find("{")
  if start < 0:
    if "}" in pattern:
      raise ValueError(f"{pattern}: unbalanced braces in the shard pattern")
    return [pattern]
  depth = 0
  for end in range(start, len(pattern)):
    depth += {"{": 1, "}": -1}.get(pattern[end], 0)
    if depth == 0:
      break
  if depth:
    raise ValueError(f"{pattern}: unbalanced braces in the shard pattern")
  head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
  return [expanded for alternative in _brace_alternatives(body, pattern)
          for expanded in expand_braces(head + alternative + tail)]


def _glob(pattern):
  """Sorted paths matching a glob (local: `glob`, with **; remote: etils.epath)."""
  if paths.is_local(pattern):
    return sorted(glob.glob(pattern, recursive=True))
  parts = pattern.split("/")
  first_magic = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
  base, rest = "/".join(parts[:first_magic]), "/".join(parts[first_magic:])
  try:
    return sorted(os.fspath(path) for path in epath.Path(base).glob(rest))
  except Exception as error:  # pylint: disable=broad-except  (stores raise their own types)
    raise remote_error(pattern, error) from error


def _existing(candidates, pattern):
  """The `candidates` (literal paths) that exist, in order; one listing per folder, so a
  pattern of 10,000 gs:// shards costs a few requests, not 10,000."""
  folders = {}
  for path in candidates:
    folder = os.path.dirname(path) or "."
    if folder not in folders:
      try:
        folders[folder] = {os.fspath(child.name) for child in epath.Path(folder).iterdir()}
      except FileNotFoundError:
        folders[folder] = set()
      except Exception as error:  # pylint: disable=broad-except  (stores raise their own types)
        if paths.is_local(folder) and isinstance(error, OSError):
          raise ValueError(f"{folder}: cannot list it ({one_line(error)})") from error
        raise remote_error(pattern, error) from error
  return [path for path in candidates if os.path.basename(path) in folders[
      os.path.dirname(path) or "."]]


def _expand_pattern(pattern):
  """The shards of one pattern (braces, then globs); ValueError naming it when none exists.
  Listed shards that do not exist (img2dataset's failed ones) are dropped with a warning."""
  shards, literal = [], []
  for name in expand_braces(pattern):
    if _GLOB_CHARS.search(name):
      shards.extend(_glob(name))
    else:
      literal.append(name)
      shards.append(name)
  present = set(_existing(literal, pattern)) if literal else set()
  missing = [path for path in literal if path not in present]
  if missing:
    logging.warning("%s: %d of its shards do not exist (the first: %s); reading the others",
                    pattern, len(missing), missing[0])
    gone = set(missing)
    shards = [path for path in shards if path not in gone]
  if not shards:
    raise ValueError(f"{pattern}: no shard matches this pattern")
  return shards


def expand_shards(spec):
  """Shard paths, in order, of `spec`: a list (or tuple) of patterns, or one string of
  comma-separated patterns; each pattern a path, brace pattern or glob, local or remote
  (gs://, via etils.epath). ValueError (one line) naming a pattern that matches nothing, or a
  remote one that cannot be listed (no credentials, no network)."""
  if isinstance(spec, (list, tuple)):
    patterns = [os.fspath(pattern) for pattern in spec]
  else:
    patterns = _split_top_level(os.fspath(spec), os.fspath(spec))
  patterns = [pattern.strip() for pattern in patterns if pattern.strip()]
  if not patterns:
    raise ValueError(f"{spec!r}: no shard pattern given")
  return [shard for pattern in patterns for shard in _expand_pattern(pattern)]
