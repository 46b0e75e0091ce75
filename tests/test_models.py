"""Tests of the towers and heads (cots_jax/models/{vit,bert,cots}.py) against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from configs.common import base_config, model_config
from cots_jax.models import bert as bert_lib
from cots_jax.models.bert import Bert
from cots_jax.models.cots import CotsModel, MvlmHead, dtype_from_name, l2_normalize
from cots_jax.models import vit as vit_lib
from cots_jax.models.vit import ConvStem, ViT, conv_stem_channels

LN_EPS = 1e-6  # flax LayerNorm default (ViT, heads).


# ---------------------------------------------------------------- numpy references

def np_layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def np_dense(x, p):
  return x @ p["kernel"] + p["bias"]


def np_attention(q, k, v, heads, key_mask=None):
  """q, k, v `[B, L, D]`; key_mask `[B, L]` bool or None -> `[B, L, D]`."""
  batch, length, width = q.shape
  split = lambda t: t.reshape(batch, -1, heads, width // heads).transpose(0, 2, 1, 3)
  scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(width // heads)
  if key_mask is not None:
    scores = np.where(key_mask[:, None, None, :], scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return (weights @ split(v)).transpose(0, 2, 1, 3).reshape(batch, length, width)


def np_bert(params, ids, mask, heads, eps):
  """Post-LN BERT written from the HF recipe over the flax params (float64)."""
  emb = params["embeddings"]
  x = (emb["word_embeddings"]["embedding"][ids]
       + emb["position_embeddings"]["embedding"][:ids.shape[1]]
       + emb["token_type_embeddings"]["embedding"][0])
  x = np_layer_norm(x, emb["LayerNorm"], eps)
  for name in sorted(params["encoder"]):
    layer = params["encoder"][name]
    attn = layer["attention"]
    q, k, v = (np_dense(x, attn["self"][n]) for n in ("query", "key", "value"))
    context = np_attention(q, k, v, heads, mask.astype(bool))
    x = np_layer_norm(np_dense(context, attn["output"]["dense"]) + x,
                      attn["output"]["LayerNorm"], eps)
    hidden = np_gelu(np_dense(x, layer["intermediate"]["dense"]))
    x = np_layer_norm(np_dense(hidden, layer["output"]["dense"]) + x,
                      layer["output"]["LayerNorm"], eps)
  return x


def np_vit(params, images, mask, heads, patch):
  """Pre-LN ViT over the flax params (float64); mask `[B, N]` bool or None."""
  batch, size, _, _ = images.shape
  grid = size // patch
  x = images.reshape(batch, grid, patch, grid, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(batch, grid * grid, patch * patch * 3)
  kernel = params["patch_embed"]["kernel"]
  x = x @ kernel.reshape(-1, kernel.shape[-1]) + params["patch_embed"]["bias"]
  width = x.shape[-1]
  if mask is not None:
    x = np.where(mask[..., None], params["mask_token"][0], x)
  cls = np.broadcast_to(params["cls"], (batch, 1, width))
  x = np.concatenate([cls, x], 1) + params["pos_embed"]
  depth = sum(name.startswith("block_") for name in params)
  for i in range(depth):
    block = params[f"block_{i}"]
    attn = block["attn"]
    y = np_layer_norm(x, block["norm1"], LN_EPS)
    q, k, v = (y @ attn[n]["kernel"].reshape(width, width) + attn[n]["bias"].reshape(width)
               for n in ("query", "key", "value"))
    context = np_attention(q, k, v, heads)
    x = x + context @ attn["out"]["kernel"].reshape(width, width) + attn["out"]["bias"]
    y = np_layer_norm(x, block["norm2"], LN_EPS)
    x = x + np_dense(np_gelu(np_dense(y, block["mlp"]["fc1"])), block["mlp"]["fc2"])
  return np_layer_norm(x, params["norm"], LN_EPS)


def np_head(params, hidden, glob, fusion, tied_embedding=None):
  """MLM / MVM head: fuse, Dense, GELU, LayerNorm, decode."""
  if fusion == "concat":
    glob = np.broadcast_to(glob[:, None], (*hidden.shape[:2], glob.shape[-1]))
    x = np.concatenate([hidden, glob], -1)
  elif fusion == "add":
    x = hidden + np_dense(glob, params["global_proj"])[:, None]
  else:
    x = hidden
  x = np_layer_norm(np_gelu(np_dense(x, params["dense"])), params["LayerNorm"], LN_EPS)
  if tied_embedding is None:
    return np_dense(x, params["decoder"])
  return x @ tied_embedding.T + params["decoder_bias"]


def to_np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ---------------------------------------------------------------- fixtures

def _tiny_config(**model_overrides):
  """Tiny sizes; image and text widths differ so a mix-up fails a shape."""
  config = base_config("tiny")
  config.model.embed_dim = 16
  config.model.image.update(image_size=16, patch_size=4, width=32, depth=2, heads=4)
  config.model.text.update(vocab_size=97, width=24, depth=2, heads=3, max_positions=16)
  config.model.update(model_overrides)
  config.vq.codebook_size = 11
  return config


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((2, 7), np.int32)
  mask[1, 4:] = 0
  return {"image": rng.normal(size=(2, 16, 16, 3)).astype(np.float32),
          "text_ids": rng.integers(0, 97, (2, 7)).astype(np.int32),
          "text_mask": mask}


def _init(model, *args, method=None):
  return jax.jit(model.init, static_argnames="method")(jax.random.key(0), *args,
                                                      method=method)["params"]


def _apply(model, params, *args, method=None, **kwargs):
  fn = jax.jit(model.apply, static_argnames=("method", "train"))
  return fn({"params": params}, *args, method=method, **kwargs)


@pytest.fixture(scope="module")
def tiny():
  config = _tiny_config()
  model = CotsModel.from_config(config)
  batch = _batch()
  params = _init(model, batch["image"], batch["text_ids"], batch["text_mask"])
  return config, model, params, batch


# ---------------------------------------------------------------- CotsModel

def test_cots_forward_shapes_and_unit_embeddings(tiny):
  config, model, params, batch = tiny
  assert set(params) == {"image", "text", "image_proj", "text_proj", "mlm_head", "mvm_head"}
  out = _apply(model, params, batch["image"], batch["text_ids"], batch["text_mask"])
  assert out["image_tokens"].shape == (2, 17, 32)
  assert out["text_tokens"].shape == (2, 7, 24)
  assert out["mlm_logits"].shape == (2, 7, 97) and out["mlm_logits"].dtype == jnp.float32
  assert out["mvm_logits"].shape == (2, 16, 11) and out["mvm_logits"].dtype == jnp.float32
  for key in ("image_embed", "text_embed"):
    assert out[key].shape == (2, 16) and out[key].dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0, rtol=1e-5)
  assert not np.allclose(out["image_embed"], out["text_embed"])


def test_cots_methods_match_numpy_references(tiny):
  config, model, params, batch = tiny
  p = to_np(params)
  image_tokens = _apply(model, params, batch["image"], method="encode_image")
  np.testing.assert_allclose(image_tokens, np_vit(p["image"], batch["image"], None, 4, 4),
                             atol=2e-4)
  text_tokens = _apply(model, params, batch["text_ids"], batch["text_mask"],
                       method="encode_text")
  np.testing.assert_allclose(
      text_tokens, np_bert(p["text"], batch["text_ids"], batch["text_mask"], 3, 1e-12),
      atol=2e-4)

  cls_img, cls_txt = np.asarray(image_tokens[:, 0]), np.asarray(text_tokens[:, 0])
  img_emb = np_dense(cls_img, p["image_proj"])
  np.testing.assert_allclose(_apply(model, params, cls_img, method="embed_image"),
                             img_emb / np.linalg.norm(img_emb, axis=-1, keepdims=True),
                             atol=1e-5)
  txt_emb = np_dense(cls_txt, p["text_proj"])
  np.testing.assert_allclose(_apply(model, params, cls_txt, method="embed_text"),
                             txt_emb / np.linalg.norm(txt_emb, axis=-1, keepdims=True),
                             atol=1e-5)

  masked_text = np.asarray(text_tokens[:, 1:4])  # P = 3 positions
  table = p["text"]["embeddings"]["word_embeddings"]["embedding"]
  assert "decoder" not in p["mlm_head"], "the MLM decoder is tied, not a separate kernel"
  np.testing.assert_allclose(
      _apply(model, params, masked_text, cls_img, method="mlm_logits"),
      np_head(p["mlm_head"], masked_text, cls_img, "concat", tied_embedding=table), atol=2e-4)
  masked_patches = np.asarray(image_tokens[:, 3:8])  # M = 5 patches
  np.testing.assert_allclose(
      _apply(model, params, masked_patches, cls_txt, method="mvm_logits"),
      np_head(p["mvm_head"], masked_patches, cls_txt, "concat"), atol=2e-4)


def test_mlm_decoder_follows_the_word_embeddings(tiny):
  _, model, params, _ = tiny
  hidden = jax.random.normal(jax.random.key(1), (2, 3, 24))
  glob = jax.random.normal(jax.random.key(2), (2, 32))
  base = _apply(model, params, hidden, glob, method="mlm_logits")
  table = params["text"]["embeddings"]["word_embeddings"]["embedding"]
  bumped = jax.tree.map(lambda x: x, params)
  bumped["text"]["embeddings"]["word_embeddings"]["embedding"] = table.at[5].add(1.0)
  changed = np.asarray(_apply(model, bumped, hidden, glob, method="mlm_logits") != base)
  assert changed[..., 5].all() and not np.delete(changed, 5, axis=-1).any()


@pytest.mark.parametrize("fusion", ["concat", "add", "none"])
def test_mvlm_head_fusions_match_numpy(fusion):
  head = MvlmHead(width=8, fusion=fusion, num_outputs=5)
  hidden = jax.random.normal(jax.random.key(0), (2, 3, 8))
  glob = jax.random.normal(jax.random.key(1), (2, 6))
  params = _init(head, hidden, glob)
  want = np_head(to_np(params), np.asarray(hidden, np.float64), np.asarray(glob, np.float64),
                 fusion)
  np.testing.assert_allclose(_apply(head, params, hidden, glob), want, atol=1e-5)
  assert ("global_proj" in params) == (fusion == "add")


def test_mvlm_head_errors():
  hidden, glob = jnp.zeros((1, 2, 4)), jnp.zeros((1, 4))
  with pytest.raises(ValueError, match="mvlm_fusion must be one of"):
    MvlmHead(width=4, fusion="gate", num_outputs=3).init(jax.random.key(0), hidden, glob)
  with pytest.raises(ValueError, match="exactly one of num_outputs and tied_embedding"):
    MvlmHead(width=4, fusion="none").init(jax.random.key(0), hidden, glob)


def test_fusion_none_makes_mlm_and_mvm_ignore_the_other_modality(tiny):
  hidden_t = jax.random.normal(jax.random.key(1), (2, 3, 24))
  hidden_v = jax.random.normal(jax.random.key(2), (2, 4, 32))
  image_global = jax.random.normal(jax.random.key(3), (2, 32))
  text_global = jax.random.normal(jax.random.key(4), (2, 24))

  def global_grads(model, params):
    mlm = lambda g: jnp.sum(model.apply({"params": params}, hidden_t, g, method="mlm_logits"))
    mvm = lambda g: jnp.sum(model.apply({"params": params}, hidden_v, g, method="mvm_logits"))
    return jax.jit(jax.grad(mlm))(image_global), jax.jit(jax.grad(mvm))(text_global)

  none_model = CotsModel.from_config(_tiny_config(mvlm_fusion="none"))
  none_params = {**_init(none_model, hidden_t, image_global, method="mlm_logits"),
                 **_init(none_model, hidden_v, text_global, method="mvm_logits")}
  for grad in global_grads(none_model, none_params):
    assert not np.any(np.asarray(grad))
  _, concat_model, concat_params, _ = tiny
  for grad in global_grads(concat_model, concat_params):
    assert np.abs(np.asarray(grad)).max() > 1e-6


def test_bfloat16_compute_keeps_float32_params_and_close_outputs(tiny):
  config, model, params, batch = tiny
  bf16_model = CotsModel.from_config(_tiny_config(dtype="bfloat16"))
  shapes = jax.eval_shape(bf16_model.init, jax.random.key(0), batch["image"],
                          batch["text_ids"], batch["text_mask"])["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}

  args = (batch["image"], batch["text_ids"], batch["text_mask"])
  full = _apply(model, params, *args)
  half = _apply(bf16_model, params, *args)
  assert half["image_tokens"].dtype == jnp.bfloat16 and half["text_tokens"].dtype == jnp.bfloat16
  for key in ("image_embed", "text_embed"):
    assert half[key].dtype == jnp.float32
    np.testing.assert_allclose(half[key], full[key], atol=3e-2)
  for key in ("image_tokens", "text_tokens"):
    np.testing.assert_allclose(np.asarray(half[key], np.float32), full[key], atol=0.1)


def test_dtype_from_name():
  assert dtype_from_name("float32") == jnp.float32
  assert dtype_from_name("bfloat16") == jnp.bfloat16
  with pytest.raises(ValueError, match="config.model.dtype must be one of"):
    dtype_from_name("float16")


def test_l2_normalize():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0]], jnp.bfloat16)
  y = l2_normalize(x)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]], atol=1e-6)


# ---------------------------------------------------------------- ViT

def test_mvm_mask_token_replaces_only_masked_patch_inputs():
  """Depth 0: outputs are LN(input + pos) per token, so each output shows its own input."""
  vit = ViT(image_size=8, patch_size=4, width=8, depth=0, heads=2)
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  mask = jnp.array([[True, False, False, True], [False, False, False, False]])
  params = _init(vit, images)
  plain = np.asarray(_apply(vit, params, images))
  masked = np.asarray(_apply(vit, params, images, mask))
  np.testing.assert_array_equal(masked[:, 1:][~np.asarray(mask)],
                                plain[:, 1:][~np.asarray(mask)])
  np.testing.assert_array_equal(masked[:, 0], plain[:, 0])
  p = to_np(params)
  want = np_layer_norm(p["mask_token"][0, 0] + p["pos_embed"][0, [1, 4]], p["norm"], LN_EPS)
  np.testing.assert_allclose(masked[0, [1, 4]], want, atol=1e-5)
  assert not np.allclose(masked[0, [1, 4]], plain[0, [1, 4]])


def test_vit_mask_semantics_through_the_tower(tiny):
  config, model, params, batch = tiny
  no_mask = _apply(model, params, batch["image"], method="encode_image")
  all_false = _apply(model, params, batch["image"], np.zeros((2, 16), bool),
                     method="encode_image")
  np.testing.assert_array_equal(all_false, no_mask)
  mask = np.zeros((2, 16), bool)
  mask[:, [0, 5, 6]] = True
  masked = _apply(model, params, batch["image"], mask, method="encode_image")
  assert np.abs(np.asarray(masked - no_mask)).max() > 1e-3
  np.testing.assert_allclose(masked, np_vit(to_np(params["image"]), batch["image"], mask, 4, 4),
                             atol=2e-4)


def np_sincos_2d(grid, width):
  """Fixed patch positions, written per patch and channel: for column c and row r of patch
  r * grid + c, channel quarters sin(c w_k), cos(c w_k), sin(r w_k), cos(r w_k)."""
  quarter = width // 4
  emb = np.zeros((grid * grid, width))
  for r in range(grid):
    for c in range(grid):
      for k in range(quarter):
        w = 10_000.0 ** (-k / (quarter - 1))
        emb[r * grid + c, [k, quarter + k, 2 * quarter + k, 3 * quarter + k]] = [
            np.sin(c * w), np.cos(c * w), np.sin(r * w), np.cos(r * w)]
  return emb


def test_vit_sincos2d_positions_are_fixed_and_cls_gets_none():
  vit = ViT(image_size=12, patch_size=4, width=8, depth=1, heads=2, posemb="sincos2d")
  images = np.random.default_rng(0).uniform(-1, 1, (2, 12, 12, 3)).astype(np.float32)
  params = _init(vit, jnp.asarray(images))
  assert "pos_embed" not in params
  p = to_np(params)
  p["pos_embed"] = np.concatenate([np.zeros((1, 8)), np_sincos_2d(3, 8)])[None]
  np.testing.assert_allclose(vit.apply({"params": params}, images), np_vit(p, images, None, 2, 4),
                             atol=2e-4)
  with pytest.raises(ValueError, match=r"posemb must be one of \('learn', 'sincos2d'\)"):
    ViT(image_size=8, patch_size=4, width=8, depth=1, heads=2, posemb="rope").init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="width divisible by 4, got 6"):
    ViT(image_size=8, patch_size=4, width=6, depth=1, heads=2, posemb="sincos2d").init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_vit_rejects_wrong_shapes():
  vit = ViT(image_size=8, patch_size=4, width=8, depth=1, heads=2)
  params = _init(vit, jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="built for 8px images"):
    vit.apply({"params": params}, jnp.zeros((1, 12, 12, 3)))
  with pytest.raises(ValueError, match="mvm_mask must be"):
    vit.apply({"params": params}, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 3), bool))
  with pytest.raises(ValueError, match="not a multiple of patch_size"):
    ViT(image_size=10, patch_size=4, width=8, depth=1, heads=2).init(
        jax.random.key(0), jnp.zeros((1, 10, 10, 3)))


def test_vit_b16_from_base_config():
  image = model_config("base").image
  vit = ViT.from_config(image, jnp.bfloat16)
  assert (vit.num_patches, vit.dtype) == (196, jnp.bfloat16)
  shapes = jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
  assert shapes["pos_embed"].shape == (1, 197, 768)
  assert shapes["patch_embed"]["kernel"].shape == (16, 16, 3, 768)
  assert sorted(k for k in shapes if k.startswith("block_")) == sorted(
      f"block_{i}" for i in range(12))
  assert shapes["block_0"]["mlp"]["fc1"]["kernel"].shape == (768, 3072)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert n_params == 85_798_656 + 768  # timm ViT-B/16 without head, + the mask token.
  out = jax.eval_shape(vit.apply, {"params": shapes}, jnp.zeros((2, 224, 224, 3)))
  assert out.shape == (2, 197, 768) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize("tower", ["vit", "bert"])
def test_remat_gives_same_outputs_and_gradients(tower):
  if tower == "vit":
    make = lambda remat: ViT(image_size=8, patch_size=4, width=8, depth=2, heads=2,
                             remat=remat)
    args = (jax.random.normal(jax.random.key(0), (2, 8, 8, 3)),)
  else:
    make = lambda remat: Bert(vocab_size=20, width=8, depth=2, heads=2, max_positions=8,
                              remat=remat)
    args = (jnp.array([[1, 2, 3, 0]]), jnp.array([[1, 1, 1, 0]]))
  plain, remat = make(False), make(True)
  params = _init(plain, *args)
  remat_shapes = jax.eval_shape(remat.init, jax.random.key(0), *args)["params"]
  assert jax.tree.structure(remat_shapes) == jax.tree.structure(params)
  loss = lambda m: jax.jit(jax.value_and_grad(
      lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, *args)))))
  (value_plain, grad_plain), (value_remat, grad_remat) = loss(plain)(params), loss(remat)(params)
  np.testing.assert_allclose(value_remat, value_plain, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               grad_remat, grad_plain)


@pytest.mark.parametrize("tower", ["vit", "bert"])
def test_dropout_only_in_train_mode(tower):
  if tower == "vit":
    module = ViT(image_size=8, patch_size=4, width=8, depth=1, heads=2, dropout=0.3)
    args = (jax.random.normal(jax.random.key(0), (2, 8, 8, 3)),)
  else:
    module = Bert(vocab_size=20, width=8, depth=1, heads=2, max_positions=8, dropout=0.3)
    args = (jnp.array([[1, 2, 3, 4]]), jnp.array([[1, 1, 1, 1]]))
  params = _init(module, *args)
  run = jax.jit(lambda rng, train: module.apply({"params": params}, *args, train=train,
                                                rngs={"dropout": rng}), static_argnums=1)
  eval_a, eval_b = run(jax.random.key(1), False), run(jax.random.key(2), False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a, train_a2, train_b = (run(jax.random.key(1), True), run(jax.random.key(1), True),
                                run(jax.random.key(2), True))
  np.testing.assert_array_equal(train_a, train_a2)
  assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)


# ---------------------------------------------------------------- BERT

def test_bert_padding_does_not_change_real_tokens(tiny):
  config, model, params, batch = tiny
  bert = Bert.from_config(config.model.text)
  ids, mask = batch["text_ids"], batch["text_mask"]
  short = np.asarray(_apply(bert, params["text"], ids, mask))
  rng = np.random.default_rng(1)
  long_ids = np.concatenate([ids, rng.integers(0, 97, (2, 5))], 1).astype(np.int32)
  long_ids[1, 4:7] = rng.integers(0, 97, 3)  # different ids under the existing padding too.
  long_mask = np.concatenate([mask, np.zeros((2, 5), np.int32)], 1)
  long = np.asarray(_apply(bert, params["text"], long_ids, long_mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(long[:, :7][real], short[real], atol=1e-5)
  unmasked = np.asarray(_apply(bert, params["text"], long_ids, np.ones_like(long_mask)))
  assert np.abs(unmasked[:, :7][real] - short[real]).max() > 1e-3


def test_bert_rejects_text_longer_than_positions(tiny):
  config, _, params, _ = tiny
  bert = Bert.from_config(config.model.text)
  with pytest.raises(ValueError, match="exceeds max_positions 16"):
    bert.apply({"params": params["text"]}, jnp.zeros((1, 17), jnp.int32),
               jnp.ones((1, 17), jnp.int32))


def test_bert_exposes_word_embedding_table(tiny):
  config, _, params, _ = tiny
  table = Bert.from_config(config.model.text).apply({"params": params["text"]},
                                                    method="word_embedding_table")
  np.testing.assert_array_equal(table, params["text"]["embeddings"]["word_embeddings"]["embedding"])


def _hf_bert_base_layout():
  """HF `BertModel` (bert-base-uncased) state-dict names and shapes, without the pooler."""
  hidden, inter = 768, 3072
  names = {"embeddings.word_embeddings.weight": (30522, hidden),
           "embeddings.position_embeddings.weight": (512, hidden),
           "embeddings.token_type_embeddings.weight": (2, hidden),
           "embeddings.LayerNorm.weight": (hidden,), "embeddings.LayerNorm.bias": (hidden,)}
  for i in range(12):
    layer = f"encoder.layer.{i}."
    for dense, shape in [("attention.self.query", (hidden, hidden)),
                         ("attention.self.key", (hidden, hidden)),
                         ("attention.self.value", (hidden, hidden)),
                         ("attention.output.dense", (hidden, hidden)),
                         ("intermediate.dense", (inter, hidden)),
                         ("output.dense", (hidden, inter))]:
      names[layer + dense + ".weight"] = shape
      names[layer + dense + ".bias"] = shape[:1]
    for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
      names[layer + norm + ".weight"] = (hidden,)
      names[layer + norm + ".bias"] = (hidden,)
  return names


def test_hf_param_names_cover_bert_base_exactly():
  bert = Bert.from_config(model_config("base").text)
  shapes = jax.eval_shape(bert.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                          jnp.ones((1, 8), jnp.int32))["params"]
  assert bert_lib.hf_param_names(shapes) == _hf_bert_base_layout()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert n_params == 109_482_240 - (768 * 768 + 768)  # bert-base-uncased minus its pooler.


def test_hf_param_name_examples_and_errors():
  assert bert_lib.hf_param_name(
      ("encoder", "layer_0", "attention", "self", "query", "kernel")) == (
          "encoder.layer.0.attention.self.query.weight")
  assert bert_lib.hf_param_name(
      ("encoder", "layer_11", "output", "LayerNorm", "scale")) == (
          "encoder.layer.11.output.LayerNorm.weight")
  assert bert_lib.hf_param_name(("embeddings", "word_embeddings", "embedding")) == (
      "embeddings.word_embeddings.weight")
  with pytest.raises(ValueError, match="no Hugging Face name for parameter 'a/b/mean'"):
    bert_lib.hf_param_name(("a", "b", "mean"))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_global_vectors_are_cls_or_masked_means(pool):
  config = _tiny_config(pool=pool)
  model = CotsModel.from_config(config)
  batch = _batch()
  params = _init(model, batch["image"], batch["text_ids"], batch["text_mask"])
  image_tokens = np.asarray(_apply(model, params, batch["image"], method="encode_image"))
  text_tokens = np.asarray(_apply(model, params, batch["text_ids"], batch["text_mask"],
                                  method="encode_text"))
  mask = batch["text_mask"][..., None].astype(np.float32)
  if pool == "cls":
    expected_image, expected_text = image_tokens[:, 0], text_tokens[:, 0]
  else:
    expected_image = image_tokens[:, 1:].mean(axis=1)
    expected_text = (text_tokens * mask).sum(axis=1) / mask.sum(axis=1)
  np.testing.assert_allclose(_apply(model, params, image_tokens, method="image_global"),
                             expected_image, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      _apply(model, params, text_tokens, batch["text_mask"], method="text_global"),
      expected_text, rtol=1e-5, atol=1e-6)
  out = _apply(model, params, batch["image"], batch["text_ids"], batch["text_mask"])
  np.testing.assert_allclose(out["text_embed"],
                             _apply(model, params, expected_text, method="embed_text"),
                             rtol=1e-5, atol=1e-6)
  embedding, image_global = _apply(model, params, batch["image"], method="image_embedding")
  np.testing.assert_allclose(image_global, expected_image, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(embedding, out["image_embed"], rtol=1e-5, atol=1e-6)
  embedding, text_global = _apply(model, params, batch["text_ids"], batch["text_mask"],
                                  method="text_embedding")
  np.testing.assert_allclose(text_global, expected_text, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(embedding, out["text_embed"], rtol=1e-5, atol=1e-6)


def np_conv3x3_stride2(x, kernel):
  """3 x 3 stride-2 convolution with XLA's SAME padding of an even side (nothing before, one
  row / column after): `[B, S, S, C] -> [B, S/2, S/2, O]`, written per output pixel."""
  batch, side, _, _ = x.shape
  padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  out = np.zeros((batch, side // 2, side // 2, kernel.shape[-1]))
  for i in range(side // 2):
    for j in range(side // 2):
      window = padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", window, kernel)
  return out


def test_conv_stem_matches_a_numpy_reference_and_halves_per_layer():
  assert [vit_lib.fits_conv_stem(p) for p in (1, 2, 6, 8, 16)] == [False, True, False, True, True]
  assert conv_stem_channels(8, 192) == [48, 96, 192]
  assert conv_stem_channels(16, 768) == [96, 192, 384, 768]
  with pytest.raises(ValueError, match="power of 2"):
    conv_stem_channels(6, 192)
  stem = ConvStem(patch_size=4, width=16)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  params = _init(stem, jnp.asarray(images))
  p = to_np(params)
  p = jax.tree.map(lambda a: a + np.random.default_rng(1).normal(0, 0.1, a.shape), p)
  x = images.astype(np.float64)
  for i in range(2):
    x = np_gelu(np_layer_norm(np_conv3x3_stride2(x, p[f"conv_{i}"]["kernel"]),
                              p[f"norm_{i}"], LN_EPS))
  want = x @ p["proj"]["kernel"][0, 0] + p["proj"]["bias"]
  got = stem.apply({"params": jax.tree.map(jnp.float32, p)}, images)
  assert got.shape == (2, 2, 2, 16)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_vit_with_conv_stem_keeps_the_token_layout_and_masks_after_the_stem():
  vit = ViT(image_size=16, patch_size=4, width=16, depth=1, heads=2, stem="conv")
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  params = _init(vit, images)
  assert "patch_embed" not in params
  assert set(params["stem"]) == {"conv_0", "norm_0", "conv_1", "norm_1", "proj"}
  plain = vit.apply({"params": params}, images)
  assert plain.shape == (2, 17, 16)
  mask = np.zeros((2, 16), bool)
  mask[:, 3] = True
  masked = vit.apply({"params": params}, images, jnp.asarray(mask))
  assert np.abs(np.asarray(masked - plain)).max() > 1e-3
  with pytest.raises(ValueError, match=r"stem must be one of \('patch', 'conv'\)"):
    ViT(image_size=8, patch_size=4, width=8, depth=1, heads=2, stem="resnet").init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_token_drop_keeps_a_random_ordered_subset_of_patches_in_train_mode_only():
  assert [vit_lib.kept_patches(64, 0.5), vit_lib.kept_patches(16, 0.25),
          vit_lib.kept_patches(3, 0.9)] == [32, 12, 1]
  # Depth 0: each output token is LN(patch + position), so a kept token equals its eval row.
  vit = ViT(image_size=16, patch_size=4, width=8, depth=0, heads=2, token_drop=0.5)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  params = _init(vit, images)
  full = np.asarray(vit.apply({"params": params}, images))
  np.testing.assert_array_equal(full, ViT(16, 4, 8, 0, 2).apply({"params": params}, images))
  kept = np.asarray(vit.apply({"params": params}, images, train=True,
                              rngs={"dropout": jax.random.key(3)}))
  assert full.shape == (4, 17, 8) and kept.shape == (4, 9, 8)
  np.testing.assert_array_equal(kept[:, 0], full[:, 0])
  subsets = []
  for row in range(4):
    distance = np.abs(kept[row, 1:, None] - full[row, None, 1:]).max(-1)
    index = distance.argmin(-1)
    np.testing.assert_allclose(distance[np.arange(8), index], 0, atol=1e-6)
    assert np.all(np.diff(index) > 0)
    subsets.append(tuple(index))
  assert len(set(subsets)) > 1
