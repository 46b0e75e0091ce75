"""Writes docs/configuration.md, the reference of the config tree, from `configs/common.py`.

  python -m cots_jax.config_reference --out=docs/configuration.md

Nothing of the page is kept by hand: the fields come from the assignments of `configs/common.py`
(`m.x = ...` in `model_config`, `v.x = ...` in `vq_config`, `c.x.y = ...` in `base_config`), in
source order; the tiny and base defaults from `common.base_config("tiny")` and
`common.base_config("base")`; each field's explanation from the comment lines just above its
assignment and the comment at the end of its line; the config files' arguments from the module
docstrings of `configs/*.py`, and what each file changes from evaluating its `get_config()`.
`tests/test_docs.py` fails when the page differs from a fresh generation.
"""

import ast
import dataclasses
import importlib
import io
import os
import tokenize

from absl import app
from absl import flags

from configs import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON_PATH = os.path.join(REPO, "configs", "common.py")
COMMAND = "python -m cots_jax.config_reference --out=docs/configuration.md"
# Function of configs/common.py -> (its ConfigDict's variable, the dotted prefix of its fields).
BUILDERS = {"model_config": ("m", "model."), "vq_config": ("v", "vq."), "base_config": ("c", "")}
# Config files described after the tree, in this order (others follow alphabetically).
CONFIG_FILES = ("pretrain", "finetune_retrieval", "cookie_pretrain", "video_retrieval",
                "vq_tokenizer")


@dataclasses.dataclass
class Entry:
  """One assignment of configs/common.py: a field, or a group (a ConfigDict)."""
  path: str
  is_group: bool
  comment: str


def _comments(source):
  """{line: (comment text, whether it is alone on its line)} of every `#` comment in `source`."""
  found = {}
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      line, column = token.start
      alone = not token.line[:column].strip()
      found[line] = (token.string.lstrip("#").strip(), alone)
  return found


def _leading_comment(comments, lineno):
  """The block of whole-line comments directly above line `lineno`, joined into one paragraph."""
  lines = []
  line = lineno - 1
  while line in comments and comments[line][1]:
    lines.insert(0, comments[line][0])
    line -= 1
  return " ".join(lines)


def _trailing_comment(comments, statement):
  """The end-of-line comments inside `statement`'s lines, joined."""
  return " ".join(comments[line][0] for line in range(statement.lineno, statement.end_lineno + 1)
                  if line in comments and not comments[line][1])


def _dotted(node, variable):
  """`c.input.data.name` -> "input.data.name" when `node` is an attribute chain on `variable`."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.insert(0, node.attr)
    node = node.value
  if isinstance(node, ast.Name) and node.id == variable and parts:
    return ".".join(parts)
  return None


def _is_group_value(node):
  """True for `ml_collections.ConfigDict()` and for `model_config(size)`-style builder calls."""
  if not isinstance(node, ast.Call):
    return False
  name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
  return name == "ConfigDict" or name in BUILDERS


def parse_entries(source):
  """Every field and group assigned in the builders of `source` (configs/common.py), in order.

  A comment above a statement that assigns no field (`aux_weight = ...`) carries over to the
  next field or group.
  """
  comments = _comments(source)
  entries = []
  for function in ast.parse(source).body:
    if not isinstance(function, ast.FunctionDef) or function.name not in BUILDERS:
      continue
    variable, prefix = BUILDERS[function.name]
    pending = ""
    for statement in function.body:
      comment = " ".join(filter(None, (pending, _leading_comment(comments, statement.lineno),
                                       _trailing_comment(comments, statement))))
      targets = statement.targets if isinstance(statement, ast.Assign) else []
      names = []
      for target in targets:
        elements = target.elts if isinstance(target, ast.Tuple) else [target]
        names += [name for name in (_dotted(e, variable) for e in elements) if name]
      if not names:
        pending = comment
        continue
      pending = ""
      is_group = _is_group_value(statement.value)
      if is_group and isinstance(statement.value.func, ast.Name):
        continue  # `c.model = model_config(size)`: its fields come from model_config itself.
      for name in names:
        entries.append(Entry(prefix + name, is_group, comment))
  return entries


def _flatten(config, prefix=""):
  """{dotted path: value} of every leaf of a ConfigDict."""
  leaves = {}
  for key, value in config.items():
    if hasattr(value, "items") and hasattr(value, "to_dict"):
      leaves.update(_flatten(value, f"{prefix}{key}."))
    else:
      leaves[prefix + key] = value
  return leaves


def _source(value):
  """A default as Python source (strings in double quotes)."""
  return '"' + value + '"' if isinstance(value, str) else repr(value)


def _value(value):
  """A default as a code span for a table cell."""
  return "`" + _source(value).replace("|", "\\|") + "`"


def _cell(text):
  return text.replace("|", "\\|")


def _config_files():
  """The config files of configs/ (modules with a `get_config`; not common.py or grids.py)."""
  names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                 if f.endswith(".py") and f not in ("__init__.py", "common.py")
                 and hasattr(importlib.import_module(f"configs.{f[:-3]}"), "get_config"))
  return [n for n in CONFIG_FILES if n in names] + [n for n in names if n not in CONFIG_FILES]


def render():
  """The whole page as a string."""
  with open(COMMON_PATH, encoding="utf-8") as f:
    source = f.read()
  entries = parse_entries(source)
  tiny = _flatten(common.base_config("tiny"))
  base = _flatten(common.base_config("base"))
  documented = {e.path for e in entries if not e.is_group}
  missing = sorted(set(tiny) - documented)
  if missing:
    raise ValueError(f"fields of base_config not found as assignments in {COMMON_PATH}: {missing}")

  out = ["# Configuration reference", "",
         f"Generated by `{COMMAND}`",
         "from `configs/common.py` (fields, defaults and their comments) and `configs/*.py`",
         "(arguments and changes); `tests/test_docs.py` fails when it is stale. Do not edit it by",
         "hand: edit the comments in `configs/common.py` and regenerate.", "",
         ast.get_docstring(ast.parse(source)), "",
         "A config file is named as `--config=configs/FILE.py[:ARG,ARG=VALUE,...]`; a field below",
         "is overridden on the command line as `--config.GROUP.FIELD=VALUE` (a tuple as a Python",
         "literal in quotes: `--config.input.data.train_splits='(\"train\", \"restval\")'`).",
         "Configs are validated (`cots_jax/config_validation.py`) before anything is compiled.",
         "`tiny` is `common.base_config(\"tiny\")` (the CPU default), `base` is",
         "`common.base_config(\"base\")` (`:model=base`).", ""]

  groups = ["top level"]
  for entry in entries:
    parent = entry.path.rpartition(".")[0]
    if parent and parent not in groups:
      groups.append(parent)
  notes = {e.path: e.comment for e in entries if e.is_group}
  for function in ast.parse(source).body:  # model / vq: the docstring of their builder
    if isinstance(function, ast.FunctionDef) and BUILDERS.get(function.name, ("", ""))[1]:
      notes[BUILDERS[function.name][1][:-1]] = ast.get_docstring(function) or ""
  for group in groups:
    fields = [e for e in entries if not e.is_group and
              (e.path.rpartition(".")[0] or "top level") == group]
    if not fields:
      continue
    title = group if group == "top level" else f"`{group}`"
    out += [f"## {title[0].upper() + title[1:]}", ""]
    if notes.get(group):
      out += [notes[group], ""]
    out += ["| field | tiny | base | what |", "|---|---|---|---|"]
    for entry in fields:
      name = entry.path.rpartition(".")[2]
      base_value = _value(base[entry.path]) if base[entry.path] != tiny[entry.path] else "same"
      out.append(f"| `{name}` | {_value(tiny[entry.path])} | {base_value} | "
                 f"{_cell(entry.comment)} |")
    out.append("")

  out += ["## Config files", "",
          "Each file's docstring (its `:ARG`s), then the fields its `get_config()` (no argument)",
          "sets differently from `common.base_config(\"tiny\")`.", ""]
  for name in _config_files():
    module = importlib.import_module(f"configs.{name}")
    out += [f"### `configs/{name}.py`", "", "```text", (module.__doc__ or "").strip("\n"), "```",
            ""]
    config = _flatten(module.get_config())
    changed = [f"`{path}={_source(value)}`" for path, value in config.items()
               if path not in tiny or tiny[path] != value]
    out += ["Changes: " + (", ".join(changed) if changed else "none") + ".", ""]
  if hasattr(common, "shrink_for_runlocal"):
    shrunk = common.base_config("tiny")
    common.shrink_for_runlocal(shrunk)
    changed = [f"`{path}={_source(value)}`" for path, value in _flatten(shrunk).items()
               if tiny[path] != value]
    out += ["`:runlocal` calls `common.shrink_for_runlocal`, which sets " + ", ".join(changed)
            + ".", ""]
  return "\n".join(out).rstrip("\n") + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  text = render()
  with open(flags.FLAGS.out, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {flags.FLAGS.out} ({text.count(chr(10))} lines)")


if __name__ == "__main__":
  # Defined here, not at import, so that tests can import render() beside other entries' flags.
  flags.DEFINE_string("out", "docs/configuration.md", "Where to write the page.")
  app.run(main)
