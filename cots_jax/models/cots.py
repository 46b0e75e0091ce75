"""The COTS two-stream model: ViT + BERT towers, projection heads, MLM / MVM heads.

No cross-stream network (method §1.2): the other modality enters the MLM / MVM heads only as
one pooled global vector (method §4 items 7-8, `config.model.mvlm_fusion`). The trainer calls
the pieces as pure functions, e.g.

  model = CotsModel.from_config(config)
  params = model.init(rng, image, text_ids, text_mask)["params"]
  tokens = model.apply({"params": params}, image, method="encode_image")

Parameters are float32; `config.model.dtype` is the compute dtype. Parameter tree:
image (ViT), text (BERT, HF names), image_proj, text_proj, mlm_head, mvm_head.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from cots_jax.models.bert import Bert
from cots_jax.models.vit import ViT

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_FUSIONS = ("concat", "add", "none")


def dtype_from_name(name):
  """`"float32"` / `"bfloat16"` -> the jnp dtype; ValueError naming the choices otherwise."""
  if name not in _DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
  return _DTYPES[name]


def l2_normalize(x, eps=1e-12):
  """`[..., D]` -> float32 rows of unit L2 norm (a zero row stays zero)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class MvlmHead(nn.Module):
  """MLM / MVM prediction head: fuse the other modality's global vector, transform, decode.

  Transform: Dense(width) -> GELU -> LayerNorm on the fused input, where fusion is
  "concat" ([h ; g]), "add" (h + W g) or "none" (h alone: plain MLM / MVM).
  Decoder: `Dense(num_outputs)`, or, given `tied_embedding` `[V, width]`, the logits
  `x @ tied_embedding^T + bias` (BERT's decoder tied to the word embeddings).

  Attributes:
    width: transform width (the tower width).
    fusion: one of concat | add | none.
    num_outputs: size of the untied decoder; None when `tied_embedding` is passed.
    dtype: compute dtype.
  """
  width: int
  fusion: str
  num_outputs: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, global_vec, tied_embedding=None):
    """hidden `[B, P, Dh]`, global_vec `[B, Dg]` -> float32 logits `[B, P, V]`."""
    if (self.num_outputs is None) == (tied_embedding is None):
      raise ValueError("MvlmHead needs exactly one of num_outputs and tied_embedding")
    if self.fusion == "concat":
      glob = jnp.broadcast_to(global_vec[:, None, :].astype(hidden.dtype),
                              (*hidden.shape[:2], global_vec.shape[-1]))
      x = jnp.concatenate([hidden, glob], axis=-1)
    elif self.fusion == "add":
      x = hidden + nn.Dense(hidden.shape[-1], dtype=self.dtype, name="global_proj")(
          global_vec)[:, None, :]
    elif self.fusion == "none":
      x = hidden
    else:
      raise ValueError(f"config.model.mvlm_fusion must be one of {_FUSIONS}, got "
                       f"{self.fusion!r}")
    x = nn.Dense(self.width, dtype=self.dtype, name="dense")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="LayerNorm")(nn.gelu(x, approximate=False))
    if tied_embedding is None:
      return nn.Dense(self.num_outputs, dtype=self.dtype, name="decoder")(x).astype(jnp.float32)
    bias = self.param("decoder_bias", nn.initializers.zeros, (tied_embedding.shape[0],))
    logits = jnp.dot(x, tied_embedding.astype(self.dtype).T,
                     preferred_element_type=jnp.float32)
    return logits + bias


class CotsModel(nn.Module):
  """Both towers and all heads of COTS.

  Build it with `CotsModel.from_config(config)`.

  Attributes:
    model: the `config.model` group as a FrozenConfigDict (hashable, as flax fields must be).
    codebook_size: V of the MVM head, = config.vq.codebook_size.
  """
  model: ml_collections.FrozenConfigDict
  codebook_size: int

  @classmethod
  def from_config(cls, config):
    """From the whole config tree (configs/common.py): uses `config.model` and `config.vq`."""
    return cls(model=ml_collections.FrozenConfigDict(config.model),
               codebook_size=config.vq.codebook_size)

  def setup(self):
    m = self.model
    dtype = dtype_from_name(m.dtype)
    remat = m.remat
    self.image = ViT.from_config(m.image, dtype, remat)
    self.text = Bert.from_config(m.text, dtype, remat)
    self.image_proj = nn.Dense(m.embed_dim, dtype=dtype)
    self.text_proj = nn.Dense(m.embed_dim, dtype=dtype)
    self.mlm_head = MvlmHead(m.text.width, m.mvlm_fusion, dtype=dtype)
    self.mvm_head = MvlmHead(m.image.width, m.mvlm_fusion, num_outputs=self.codebook_size,
                             dtype=dtype)

  def encode_image(self, image, mvm_mask=None, train=False):
    """image `[B, H, W, 3]`, mvm_mask `[B, N]` bool or None -> tokens `[B, 1+N, Di]`."""
    return self.image(image, mvm_mask, train)

  def encode_text(self, ids, mask, train=False):
    """ids `[B, L]` int32, mask `[B, L]` (1 = real token) -> hidden `[B, L, Dt]`."""
    return self.text(ids, mask, train)

  def image_global(self, tokens):
    """Global image vector `[B, Di]` from tokens `[B, 1+N, Di]`: the [CLS] state, or the mean of
    the patch states when `model.pool == "mean"`."""
    if self.model.pool == "mean":
      return jnp.mean(tokens[:, 1:], axis=1)
    return tokens[:, 0]

  def text_global(self, hidden, mask):
    """Global text vector `[B, Dt]` from hidden `[B, L, Dt]`, mask `[B, L]`: the [CLS] state, or
    the mean over real tokens when `model.pool == "mean"`."""
    if self.model.pool == "mean":
      weights = mask.astype(hidden.dtype)[..., None]
      return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)
    return hidden[:, 0]

  def image_embedding(self, image, train=False):
    """image `[B, H, W, 3]` -> (L2-normalised embedding `[B, E]`, global vector `[B, Di]`)."""
    image_global = self.image_global(self.encode_image(image, None, train))
    return self.embed_image(image_global), image_global

  def text_embedding(self, ids, mask, train=False):
    """ids, mask `[B, L]` -> (L2-normalised embedding `[B, E]`, global vector `[B, Dt]`)."""
    text_global = self.text_global(self.encode_text(ids, mask, train), mask)
    return self.embed_text(text_global), text_global

  def embed_image(self, cls):
    """Image global vector `[B, Di]` -> L2-normalised float32 embedding `[B, E]`."""
    return l2_normalize(self.image_proj(cls))

  def embed_text(self, cls):
    """Text global vector `[B, Dt]` -> L2-normalised float32 embedding `[B, E]`."""
    return l2_normalize(self.text_proj(cls))

  def mlm_logits(self, hidden_at_masked, image_global):
    """Masked text states `[B, P, Dt]`, image [CLS] `[B, Di]` -> float32 `[B, P, vocab]`."""
    return self.mlm_head(hidden_at_masked, image_global,
                         tied_embedding=self.text.word_embedding_table())

  def mvm_logits(self, hidden_at_masked, text_global):
    """Masked patch states `[B, M, Di]`, text [CLS] `[B, Dt]` -> float32 `[B, M, V]`."""
    return self.mvm_head(hidden_at_masked, text_global)

  def __call__(self, image, text_ids, text_mask, mvm_mask=None, train=False):
    """Runs every submodule once (what `init` uses); all positions go through the heads.

    Returns:
      dict(image_tokens [B,1+N,Di], text_tokens [B,L,Dt], image_embed [B,E],
      text_embed [B,E], mlm_logits [B,L,vocab], mvm_logits [B,N,V]).
    """
    image_tokens = self.encode_image(image, mvm_mask, train)
    text_tokens = self.encode_text(text_ids, text_mask, train)
    image_global = self.image_global(image_tokens)
    text_global = self.text_global(text_tokens, text_mask)
    return {
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "image_embed": self.embed_image(image_global),
        "text_embed": self.embed_text(text_global),
        "mlm_logits": self.mlm_logits(text_tokens, image_global),
        "mvm_logits": self.mvm_logits(image_tokens[:, 1:], text_global),
    }
