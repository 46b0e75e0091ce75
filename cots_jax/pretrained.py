"""Public weights in the towers: Hugging Face BERT and ViT / timm / big_vision checkpoints, read
without torch or pickle (safetensors and numpy only).

Text: a Hugging Face BERT directory holds `config.json` (the sizes) and `model.safetensors` (or
shards listed in `model.safetensors.index.json`) with `BertModel` keys, with or without the
`bert.` prefix of the task models. `load_hf_bert(DIR)` returns the text tower and its parameters.

Image: `load_hf_vit(PATH, image_size)` reads a Hugging Face `ViTModel` directory, a timm ViT
`.safetensors` file, or a big_vision / AugReg `.npz`, and returns the image tower and its
parameters; position embeddings are interpolated (bilinear, with a log line) when the checkpoint
was trained at another image size.

In a run, `config.model.text.init=DIR` / `config.model.image.init=PATH` make the config take the
checkpoint's sizes (and DIR's tokenizer; `resolve_pretrained`) and the fresh state take its
weights, the momentum towers starting as their copy (`init_pretrained_towers`). Weights are read
through etils.epath, so DIR and PATH may be gs:// URLs; the tokenizer (transformers) is read
from local directories only.

Each checkpoint tensor is mapped to a parameter by name (BERT: models/bert.py `hf_param_name`;
ViT: the tables below), torch `[out, in]` Linear weights and `[out, in, kh, kw]` convolutions
transposed. Parameters the checkpoint lacks keep their fresh values and are reported as missing;
tensors the tower has no place for (poolers, task heads) are reported as unused; a tensor of
another shape stops the load with every such name listed.
"""

import json
import os
import re

from absl import logging
from etils import epath
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from cots_jax import locking
from cots_jax import paths
from cots_jax import shapes
from cots_jax.models import bert as bert_lib
from cots_jax.models import vit as vit_lib

# Buffers that HF saves in some checkpoints and that are no weights.
_BUFFERS = ("embeddings.position_ids",)
# HF `hidden_act` -> the tower's `gelu` form.
_GELU_FORMS = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh",
               "gelu_fast": "tanh"}


def read_hf_config(directory):
  """DIRECTORY/config.json as a dict; FileNotFoundError naming the path when it is absent."""
  path = epath.Path(directory) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: {directory!r} is not a Hugging Face "
                            "model directory")
  return json.loads(path.read_text(encoding="utf-8"))


def read_safetensors(directory):
  """Every tensor of DIRECTORY's model.safetensors (or of its shards) as {key: numpy array}."""
  single = epath.Path(directory) / "model.safetensors"
  index = epath.Path(directory) / "model.safetensors.index.json"
  if single.is_file():
    files = [single]
  elif index.is_file():
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    files = [epath.Path(directory) / name for name in sorted(set(weight_map.values()))]
  else:
    raise FileNotFoundError(f"{directory!r} has neither model.safetensors nor "
                            "model.safetensors.index.json (only safetensors weights are read)")
  tensors = {}
  for file in files:
    tensors.update(_load_safetensors(file))
  return tensors


def _load_safetensors(path):
  """{key: numpy array} of one safetensors file, memory-mapped from a local disk and read whole
  from a bucket (safetensors opens local files only)."""
  if paths.is_local(path):
    return safetensors.numpy.load_file(os.fspath(path))
  return safetensors.numpy.load(epath.Path(path).read_bytes())


def bert_sizes(hf_config):
  """The `config.model.text` fields of a Hugging Face BERT config.json dict.

  Raises:
    ValueError for a model type or activation the tower does not implement.
  """
  if hf_config.get("model_type", "bert") != "bert":
    raise ValueError(f"model_type {hf_config['model_type']!r} is not a BERT")
  gelu = _gelu_form(hf_config)
  if hf_config.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError("only absolute position embeddings are supported, not "
                     f"{hf_config['position_embedding_type']!r}")
  width = hf_config["hidden_size"]
  return {"vocab_size": hf_config["vocab_size"], "width": width,
          "depth": hf_config["num_hidden_layers"], "heads": hf_config["num_attention_heads"],
          "mlp_ratio": hf_config["intermediate_size"] / width,
          "max_positions": hf_config["max_position_embeddings"],
          "type_vocab_size": hf_config.get("type_vocab_size", 2),
          "layer_norm_eps": hf_config.get("layer_norm_eps", 1e-12), "gelu": gelu}


def _gelu_form(hf_config):
  """The tower's `gelu` form of a Hugging Face config's `hidden_act`; ValueError if it has none."""
  act = hf_config.get("hidden_act", "gelu")
  if act not in _GELU_FORMS:
    raise ValueError(f"hidden_act {act!r} is not supported; the tower has {sorted(_GELU_FORMS)}")
  return _GELU_FORMS[act]


def bert_params_from_hf(tensors, target):
  """Matches Hugging Face tensors to the parameters of a `Bert` tower.

  Args:
    tensors: {HF key: numpy array}; keys may carry the `bert.` prefix.
    target: the tower's parameter tree (arrays or ShapeDtypeStructs: only shapes are read).

  Returns:
    (loaded: {flax path tuple: float32 numpy array in the tower's layout}, missing: sorted names
    of the parameters the checkpoint lacks, unused: sorted checkpoint keys no parameter takes).

  Raises:
    ValueError listing every parameter whose tensor has another shape.
  """
  prefixed = any(key.startswith("bert.") for key in tensors)
  by_name = {key.removeprefix("bert."): key for key in tensors
             if not prefixed or key.startswith("bert.")}
  converted = {}
  for path in traverse_util.flatten_dict(target):
    key = by_name.get(bert_lib.hf_param_name(path))
    if key is not None:
      converted[path] = (key, tensors[key].T if path[-1] == "kernel" else tensors[key])
  unused = [key for key in tensors if key.removeprefix("bert.") not in _BUFFERS]
  return _fit(converted, target, unused, "text")


def _fit(converted, target, keys, tower):
  """Checks converted tensors against the tower's parameter shapes.

  Args:
    converted: {flax path: (checkpoint key, array in the tower's layout)}.
    target: the tower's parameter tree (only shapes are read).
    keys: every checkpoint key that could have been used.
    tower: "text" or "image", for messages.

  Returns:
    (loaded {flax path: float32 array}, missing sorted "/"-joined paths, unused sorted keys).

  Raises:
    ValueError listing every parameter whose tensor has another shape.
  """
  flat = traverse_util.flatten_dict(target)
  mis_shaped = [f"{key}: {tuple(array.shape)} in the checkpoint (in the tower's layout), "
                f"{tuple(flat[path].shape)} in the tower ({'/'.join(path)})"
                for path, (key, array) in sorted(converted.items()) if path in flat
                and tuple(array.shape) != tuple(flat[path].shape)]
  if mis_shaped:
    raise ValueError(f"the checkpoint does not fit the {tower} tower:\n  "
                     + "\n  ".join(sorted(mis_shaped)))
  loaded = {path: np.asarray(array, np.float32) for path, (_, array) in converted.items()
            if path in flat}
  used = {key for path, (key, _) in converted.items() if path in flat}
  missing = sorted("/".join(path) for path in flat if path not in loaded)
  return loaded, missing, sorted(set(keys) - used)


# ----------------------------------------------------------------------------------------- ViT


def _torch_linear(weight):
  """torch Linear weight [out, in] -> flax Dense kernel [in, out]."""
  return weight.T


def _torch_conv(weight):
  """torch Conv2d weight [out, in, kh, kw] -> flax Conv kernel [kh, kw, in, out]."""
  return weight.transpose(2, 3, 1, 0)


def _collector(tensors, names):
  """(put, converted): `put(path, name, convert)` records `converted[path] = (key, convert(
  tensor))` for the checkpoint key `names[name]`, when the checkpoint has it (else nothing: the
  parameter is reported missing)."""
  converted = {}

  def put(path, name, convert=lambda x: x):
    if name in names:
      converted[path] = (names[name], convert(tensors[names[name]]))

  return put, converted


def _vit_params_from_hf(tensors, hf_config):
  """Hugging Face `ViTModel` tensors (keys with or without `vit.`) -> (sizes, {flax path:
  (key, array)})."""
  prefixed = any(key.startswith("vit.") for key in tensors)
  put, converted = _collector(tensors, {key.removeprefix("vit."): key for key in tensors
                                        if not prefixed or key.startswith("vit.")})
  width, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
  sizes = {"patch_size": hf_config["patch_size"], "width": width,
           "depth": hf_config["num_hidden_layers"], "heads": heads,
           "mlp_ratio": hf_config["intermediate_size"] / width,
           "layer_norm_eps": hf_config.get("layer_norm_eps", 1e-12),
           "gelu": _gelu_form(hf_config)}
  put(("cls",), "embeddings.cls_token")
  put(("pos_embed",), "embeddings.position_embeddings")
  put(("mask_token",), "embeddings.mask_token")
  put(("patch_embed", "kernel"), "embeddings.patch_embeddings.projection.weight", _torch_conv)
  put(("patch_embed", "bias"), "embeddings.patch_embeddings.projection.bias")
  put(("norm", "scale"), "layernorm.weight")
  put(("norm", "bias"), "layernorm.bias")
  for i in range(sizes["depth"]):
    hf, block = f"encoder.layer.{i}.", f"block_{i}"
    for name, ours in (("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
      put((block, ours, "scale"), f"{hf}{name}.weight")
      put((block, ours, "bias"), f"{hf}{name}.bias")
    for name in ("query", "key", "value"):
      put((block, "attn", name, "kernel"), f"{hf}attention.attention.{name}.weight",
          lambda w: _torch_linear(w).reshape(width, heads, -1))
      put((block, "attn", name, "bias"), f"{hf}attention.attention.{name}.bias",
          lambda b: b.reshape(heads, -1))
    put((block, "attn", "out", "kernel"), f"{hf}attention.output.dense.weight",
        lambda w: _torch_linear(w).reshape(heads, -1, width))
    put((block, "attn", "out", "bias"), f"{hf}attention.output.dense.bias")
    for name, ours in (("intermediate.dense", "fc1"), ("output.dense", "fc2")):
      put((block, "mlp", ours, "kernel"), f"{hf}{name}.weight", _torch_linear)
      put((block, "mlp", ours, "bias"), f"{hf}{name}.bias")
  return sizes, converted


def _vit_params_from_timm(tensors, heads):
  """timm `VisionTransformer` tensors -> (sizes, {flax path: (key, array)}); timm stores no head
  count, so `heads` (None: width / 64, ViT's head size) gives it."""
  width = tensors["cls_token"].shape[-1]
  depth = len({key.split(".")[1] for key in tensors if key.startswith("blocks.")})
  heads = heads or width // 64
  sizes = {"patch_size": tensors["patch_embed.proj.weight"].shape[-1], "width": width,
           "depth": depth, "heads": heads,
           "mlp_ratio": tensors["blocks.0.mlp.fc1.weight"].shape[0] / width,
           "layer_norm_eps": 1e-6, "gelu": "exact"}
  put, converted = _collector(tensors, {key: key for key in tensors})
  put(("cls",), "cls_token")
  put(("pos_embed",), "pos_embed")
  put(("patch_embed", "kernel"), "patch_embed.proj.weight", _torch_conv)
  put(("patch_embed", "bias"), "patch_embed.proj.bias")
  put(("norm", "scale"), "norm.weight")
  put(("norm", "bias"), "norm.bias")
  for i in range(depth):
    timm, block = f"blocks.{i}.", f"block_{i}"
    for name in ("norm1", "norm2"):
      put((block, name, "scale"), f"{timm}{name}.weight")
      put((block, name, "bias"), f"{timm}{name}.bias")
    # One fused [3 * width, width] projection: query, key, value in that order.
    for index, name in enumerate(("query", "key", "value")):
      rows = slice(index * width, (index + 1) * width)
      put((block, "attn", name, "kernel"), f"{timm}attn.qkv.weight",
          lambda w, rows=rows: _torch_linear(w[rows]).reshape(width, heads, -1))
      put((block, "attn", name, "bias"), f"{timm}attn.qkv.bias",
          lambda b, rows=rows: b[rows].reshape(heads, -1))
    put((block, "attn", "out", "kernel"), f"{timm}attn.proj.weight",
        lambda w: _torch_linear(w).reshape(heads, -1, width))
    put((block, "attn", "out", "bias"), f"{timm}attn.proj.bias")
    for name in ("fc1", "fc2"):
      put((block, "mlp", name, "kernel"), f"{timm}mlp.{name}.weight", _torch_linear)
      put((block, "mlp", name, "bias"), f"{timm}mlp.{name}.bias")
  return sizes, converted


_BIG_VISION_BLOCK = re.compile(r"(?:img/)?Transformer/encoderblock_(\d+)/(\w+?)_(\d+)/(.+)")


def _vit_params_from_big_vision(tensors):
  """big_vision / AugReg ViT arrays (flax names, optionally under `img/`) -> (sizes, {flax path:
  (key, array)}). Within a block the first LayerNorm is norm1, the second norm2; Dense_0 and
  Dense_1 of the MlpBlock are fc1 and fc2. A position table without a [CLS] row gets a zero row."""
  prefix = "img/" if "img/embedding/kernel" in tensors else ""
  kernel = tensors[f"{prefix}embedding/kernel"]
  width = kernel.shape[-1]
  out = {("patch_embed", "kernel"): (f"{prefix}embedding/kernel", kernel),
         ("patch_embed", "bias"): (f"{prefix}embedding/bias", tensors[f"{prefix}embedding/bias"])}
  if f"{prefix}cls" in tensors:
    out[("cls",)] = (f"{prefix}cls", tensors[f"{prefix}cls"])
  for key in (f"{prefix}Transformer/posembed_input/pos_embedding", f"{prefix}pos_embedding"):
    if key in tensors:
      pos = tensors[key]
      if int(round(pos.shape[1] ** 0.5)) ** 2 == pos.shape[1]:  # g*g rows: no [CLS] row
        pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
      out[("pos_embed",)] = (key, pos)
  for name, ours in (("scale", "scale"), ("bias", "bias")):
    key = f"{prefix}Transformer/encoder_norm/{name}"
    if key in tensors:
      out[("norm", ours)] = (key, tensors[key])
  norms = {}
  for key, array in tensors.items():
    match = _BIG_VISION_BLOCK.fullmatch(key)
    if not match:
      continue
    index, module, number, rest = match.groups()
    block = f"block_{index}"
    if module == "LayerNorm":
      norms.setdefault(block, set()).add(int(number))
      out[(block, f"LayerNorm_{number}", rest)] = (key, array)
    elif module == "MultiHeadDotProductAttention":
      out[(block, "attn", *rest.split("/"))] = (key, array)
    elif module == "MlpBlock":
      dense, leaf = rest.split("/")
      out[(block, "mlp", {"Dense_0": "fc1", "Dense_1": "fc2"}[dense], leaf)] = (key, array)
  for block, numbers in norms.items():
    for ours, number in zip(("norm1", "norm2"), sorted(numbers)):
      for leaf in ("scale", "bias"):
        out[(block, ours, leaf)] = out.pop((block, f"LayerNorm_{number}", leaf))
  heads = out[("block_0", "attn", "query", "kernel")][1].shape[1]
  sizes = {"patch_size": kernel.shape[0], "width": width, "depth": len(norms), "heads": heads,
           "mlp_ratio": out[("block_0", "mlp", "fc1", "kernel")][1].shape[-1] / width,
           "layer_norm_eps": 1e-6, "gelu": "tanh"}
  return sizes, out


def read_vit_checkpoint(path, heads=None):
  """A ViT checkpoint in any supported layout -> (sizes, {flax path: (key, array)}, all keys).

  Args:
    path: a Hugging Face `ViTModel` directory (config.json + safetensors), a timm ViT
      `.safetensors` file, or a big_vision / AugReg `.npz`.
    heads: the head count of a timm file (None: width / 64).

  Returns:
    sizes: the `config.model.image` fields of the checkpoint (not image_size);
    converted: its tensors in the tower's layout, by flax parameter path;
    keys: every tensor name of the checkpoint.
  """
  if epath.Path(path).is_dir():
    tensors = read_safetensors(path)
    sizes, converted = _vit_params_from_hf(tensors, read_hf_config(path))
  elif path.endswith(".safetensors"):
    tensors = _load_safetensors(path)
    sizes, converted = _vit_params_from_timm(tensors, heads)
  elif path.endswith(".npz"):
    with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as npz:
      tensors = dict(npz)
    sizes, converted = _vit_params_from_big_vision(tensors)
  else:
    raise ValueError(f"{path!r} is no ViT checkpoint: give a Hugging Face ViTModel directory, "
                     "a timm .safetensors file or a big_vision .npz")
  return sizes, converted, list(tensors)


def interpolate_positions(pos, grid):
  """Position embeddings [1, 1 + g*g, D] ([CLS] first) resized to [1, 1 + grid*grid, D]: the
  patch table bilinearly as a [g, g, D] image, the [CLS] row as it is."""
  old = int(round((pos.shape[1] - 1) ** 0.5))
  if old * old != pos.shape[1] - 1:
    raise ValueError(f"position embeddings of shape {pos.shape} are not [1, 1 + g*g, D]")
  if old == grid:
    return pos
  patches = jax.image.resize(pos[0, 1:].reshape(old, old, -1), (grid, grid, pos.shape[-1]),
                             "bilinear")
  return np.concatenate([pos[:, :1], np.asarray(patches).reshape(1, grid * grid, -1)], axis=1)


def vit_params_from_checkpoint(checkpoint, target, grid, path):
  """A `read_vit_checkpoint` result fitted to a ViT tower of `grid` x `grid` patches.

  Args:
    checkpoint: (sizes, converted, keys) of `read_vit_checkpoint`.
    target: the tower's parameter tree (only shapes are read).
    grid: patches per side of the tower.
    path: the checkpoint's path, for the log.

  Returns:
    (loaded {flax path: float32 array}, missing, unused), as `bert_params_from_hf`.
  """
  _, converted, keys = checkpoint
  converted = dict(converted)
  if ("pos_embed",) in converted:
    key, pos = converted[("pos_embed",)]
    resized = interpolate_positions(pos, grid)
    if resized.shape != pos.shape:
      logging.info("%s: position embeddings interpolated from %d to %d patches", path,
                   pos.shape[1] - 1, grid * grid)
    converted[("pos_embed",)] = (key, resized)
  return _fit(converted, target, keys, "image")


def load_hf_vit(path, image_size=None, dtype=jnp.float32, heads=None):
  """A ViT checkpoint (see `read_vit_checkpoint`) as `(ViT module, params)`.

  `module.apply({"params": params}, images)` gives the tokens `[B, 1 + N, D]` ([CLS] first)
  after the final LayerNorm, for images `[B, image_size, image_size, 3]`.

  Args:
    path: the checkpoint.
    image_size: the input side; None = the checkpoint's (position table size x patch size).
    dtype: compute dtype (parameters are float32).
    heads: head count of a timm file (None: width / 64).
  """
  checkpoint = read_vit_checkpoint(path, heads)
  sizes, converted, _ = checkpoint
  if image_size is None:
    image_size = int(round((converted[("pos_embed",)][1].shape[1] - 1) ** 0.5)) * sizes[
        "patch_size"]
  module = vit_lib.ViT(image_size=image_size, **sizes, dtype=dtype)
  fresh = module.init(jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)))["params"]
  loaded, missing, unused = vit_params_from_checkpoint(
      checkpoint, fresh, image_size // sizes["patch_size"], path)
  _report("load_hf_vit", path, missing, unused)
  return module, _merged(fresh, loaded, lambda array, _: jnp.asarray(array))


# ---------------------------------------------------------------------------------- in a run


def _merged(fresh, loaded, place):
  """`fresh` (a parameter tree) with the leaves of `loaded` ({path: numpy}) put in by
  `place(numpy, fresh leaf)`."""
  flat = traverse_util.flatten_dict(fresh)
  return traverse_util.unflatten_dict(
      {path: place(loaded[path], leaf) if path in loaded else leaf for path, leaf in flat.items()})


def _report(what, directory, missing, unused):
  """Logs the missing and unused weights of one load."""
  logging.info("%s: loaded %s", what, directory)
  if missing:
    logging.warning("%s: %d weights not in %s keep their fresh values: %s", what, len(missing),
                    directory, ", ".join(missing))
  if unused:
    logging.warning("%s: %d tensors of %s are unused: %s", what, len(unused), directory,
                    ", ".join(unused))


def load_hf_bert(directory, dtype=jnp.float32):
  """A Hugging Face BERT-family directory as `(Bert module, params)`.

  `module.apply({"params": params}, input_ids, attention_mask)` gives the last hidden states
  `[B, L, D]` (no pooler, no projection).

  Args:
    directory: local or gs:// directory with config.json + model.safetensors (BERT-base,
      MiniLM, ...).
    dtype: compute dtype of the module (parameters are float32).

  Raises:
    FileNotFoundError, or ValueError on an unsupported config or mis-shaped weights.
  """
  sizes = bert_sizes(read_hf_config(directory))
  module = bert_lib.Bert(**sizes, dtype=dtype)
  ids = jnp.zeros((1, 2), jnp.int32)
  fresh = module.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids))["params"]
  loaded, missing, unused = bert_params_from_hf(read_safetensors(directory), fresh)
  _report("load_hf_bert", directory, missing, unused)
  return module, _merged(fresh, loaded, lambda array, _: jnp.asarray(array))


def resolve_pretrained(config):
  """A copy of `config` whose tower sizes come from `model.text.init` / `model.image.init` (and,
  when input.tokenizer is empty, whose tokenizer is the text checkpoint's); `config` itself when
  neither is set.

  The image size stays the config's (position embeddings are interpolated to it). Each changed
  field is logged, so the run's config.json records the real shapes; local paths become absolute
  (gs:// URLs stay as they are).
  """
  if not config.model.text.init and not config.model.image.init:
    return config
  config = config.copy_and_resolve_references()
  text, image = config.model.text, config.model.image
  if text.init:
    text.init = os.fspath(paths.absolute(text.init))
    _update(text, bert_sizes(read_hf_config(text.init)), "model.text", text.init)
    if not config.input.tokenizer:
      config.input.tokenizer = text.init
  if image.init:
    image.init = os.fspath(paths.absolute(image.init))
    _update(image, read_vit_checkpoint(image.init, image.heads)[0], "model.image", image.init)
  return config


def _update(group, sizes, name, source):
  """Sets the fields `sizes` of config group `group`, logging each change."""
  for field, value in sizes.items():
    if group[field] != value:
      logging.info("%s.%s: %s -> %s from %s", name, field, group[field], value, source)
      group[field] = value


def init_pretrained_towers(config, state):
  """`state` with the towers of `model.text.init` / `model.image.init` in params (and the
  momentum copy of their trainable leaves in params_ema).

  The loaded arrays take the shardings of the fresh ones (every process reads the same files);
  the parameters a checkpoint lacks (the ViT's [MASK] token, say) and the rest of the state are
  unchanged. `config` must have been through `resolve_pretrained`.
  """
  image = config.model.image
  loaders = {"text": lambda target: bert_params_from_hf(read_safetensors(config.model.text.init),
                                                        target),
             "image": lambda target: vit_params_from_checkpoint(
                 read_vit_checkpoint(image.init, image.heads), target,
                 shapes.patch_grid(config)[0], image.init)}

  def place(array, fresh):
    return jax.make_array_from_callback(array.shape, fresh.sharding, lambda index: array[index])

  for tower, load in loaders.items():
    source = config.model[tower].init
    if not source:
      continue
    loaded, missing, unused = load(state["params"][tower])
    _report(f"model.{tower}.init", source, missing, unused)
    params = {**state["params"], tower: _merged(state["params"][tower], loaded, place)}
    state = dict(state, params=params)
    if "params_ema" in state:  # the momentum copy of the loaded tower's trainable leaves
      state["params_ema"] = jax.tree.map(jnp.copy, locking.like(params, state["params_ema"]))
  return state
