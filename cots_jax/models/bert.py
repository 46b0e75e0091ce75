"""BERT text tower (method §4 item 2) whose parameter tree maps 1:1 to Hugging Face `BertModel`.

Post-LN encoder with exact (erf) GELU, as `bert-base-uncased` (or the tanh form, `gelu="tanh"`).
Module names follow the HF state dict, so `hf_param_name` turns a flax path into the safetensors
key:

  embeddings/{word_embeddings, position_embeddings, token_type_embeddings}/embedding, LayerNorm
  encoder/layer_{i}/attention/self/{query, key, value}, attention/output/{dense, LayerNorm},
  encoder/layer_{i}/intermediate/dense, output/{dense, LayerNorm}

There is no pooler: the towers use the last hidden states. Parameters are float32; `dtype` is
the compute dtype. Token type ids are always 0 (single-segment text).
"""

from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax.numpy as jnp

_INIT = nn.initializers.normal(0.02)  # BERT's initializer_range.
GELU_FORMS = ("exact", "tanh")


def _dense(features, dtype, name):
  return nn.Dense(features, dtype=dtype, kernel_init=_INIT, name=name)


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""
  vocab_size: int
  width: int
  max_positions: int
  type_vocab_size: int
  layer_norm_eps: float
  dropout: float
  dtype: Any

  def setup(self):
    self.word_embeddings = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                                    embedding_init=_INIT)
    self.position_embeddings = nn.Embed(self.max_positions, self.width, dtype=self.dtype,
                                        embedding_init=_INIT)
    self.token_type_embeddings = nn.Embed(self.type_vocab_size, self.width, dtype=self.dtype,
                                          embedding_init=_INIT)
    # The attribute name is the flax module name, hence HF's capitalised "LayerNorm".
    self.LayerNorm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype)
    self.drop = nn.Dropout(self.dropout)

  def __call__(self, input_ids, train=False):
    """`[B, L]` int ids -> `[B, L, width]` embeddings."""
    length = input_ids.shape[1]
    if length > self.max_positions:
      raise ValueError(f"text length {length} exceeds max_positions {self.max_positions}")
    x = (self.word_embeddings(input_ids)
         + self.position_embeddings(jnp.arange(length))[None]
         + self.token_type_embeddings(jnp.zeros_like(input_ids)))
    return self.drop(self.LayerNorm(x), deterministic=not train)


class BertSelfAttention(nn.Module):
  """Multi-head attention over padded keys; `[B, L, D] -> [B, L, D]` (before the output dense)."""
  heads: int
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x, attention_mask, train=False):
    batch, length, width = x.shape
    if width % self.heads:
      raise ValueError(f"width {width} is not divisible by heads {self.heads}")
    split = lambda y: y.reshape(batch, length, self.heads, width // self.heads)
    q, k, v = (split(_dense(width, self.dtype, n)(x)) for n in ("query", "key", "value"))
    key_mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, L]: heads, queries.
    dropout_rng = self.make_rng("dropout") if train and self.dropout > 0 else None
    context = nn.dot_product_attention(
        q, k, v, mask=key_mask, dropout_rng=dropout_rng, dropout_rate=self.dropout,
        deterministic=not train, dtype=self.dtype, force_fp32_for_softmax=True)
    return context.reshape(batch, length, width)


class BertResidualOutput(nn.Module):
  """HF's `BertSelfOutput` / `BertOutput`: LayerNorm(residual + Dropout(Dense(x)))."""
  width: int
  layer_norm_eps: float
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x, residual, train=False):
    x = _dense(self.width, self.dtype, "dense")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(
        x + residual)


class BertIntermediate(nn.Module):
  """Dense to the intermediate size, then GELU (exact erf, or the tanh approximation)."""
  features: int
  dtype: Any
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x):
    return nn.gelu(_dense(self.features, self.dtype, "dense")(x),
                   approximate=self.gelu_approximate)


class BertAttention(nn.Module):
  """Self-attention followed by its residual output block."""
  heads: int
  layer_norm_eps: float
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x, attention_mask, train=False):
    context = BertSelfAttention(self.heads, self.dropout, self.dtype, name="self")(
        x, attention_mask, train)
    return BertResidualOutput(x.shape[-1], self.layer_norm_eps, self.dropout, self.dtype,
                              name="output")(context, x, train)


class BertLayer(nn.Module):
  """One post-LN encoder layer, `[B, L, D] -> [B, L, D]`."""
  heads: int
  intermediate_size: int
  layer_norm_eps: float
  dropout: float
  dtype: Any
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x, attention_mask, train=False):
    x = BertAttention(self.heads, self.layer_norm_eps, self.dropout, self.dtype,
                      name="attention")(x, attention_mask, train)
    y = BertIntermediate(self.intermediate_size, self.dtype, self.gelu_approximate,
                         name="intermediate")(x)
    return BertResidualOutput(x.shape[-1], self.layer_norm_eps, self.dropout, self.dtype,
                              name="output")(y, x, train)


class BertEncoder(nn.Module):
  """The stack of `depth` layers named `layer_{i}`."""
  depth: int
  heads: int
  intermediate_size: int
  layer_norm_eps: float
  dropout: float
  dtype: Any
  remat: bool = False
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x, attention_mask, train=False):
    layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
    for i in range(self.depth):
      x = layer_cls(self.heads, self.intermediate_size, self.layer_norm_eps, self.dropout,
                    self.dtype, self.gelu_approximate, name=f"layer_{i}")(
                        x, attention_mask, train)
    return x


class Bert(nn.Module):
  """BERT encoder returning the last hidden states (no pooler).

  Attributes:
    vocab_size, width, depth, heads: sizes (30522, 768, 12, 12 for bert-base-uncased).
    mlp_ratio: intermediate size = width * mlp_ratio (3072 = 768 * 4).
    max_positions: number of learned position embeddings (512); L may not exceed it.
    type_vocab_size: token-type embeddings (2); only type 0 is used.
    layer_norm_eps: LayerNorm epsilon (1e-12).
    dropout: hidden and attention-probability dropout (active only when train).
    dtype: compute dtype; parameters stay float32.
    remat: rematerialise each layer in the backward pass.
    gelu: "exact" (erf, HF "gelu") or "tanh" (HF "gelu_new" / "gelu_pytorch_tanh").
  """
  vocab_size: int
  width: int
  depth: int
  heads: int
  mlp_ratio: float = 4.0
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  gelu: str = "exact"

  @classmethod
  def from_config(cls, text_config, dtype=jnp.float32, remat=False):
    """Builds the tower from a `config.model.text` group (configs/common.py)."""
    return cls(vocab_size=text_config.vocab_size, width=text_config.width,
               depth=text_config.depth, heads=text_config.heads,
               mlp_ratio=text_config.mlp_ratio, max_positions=text_config.max_positions,
               type_vocab_size=text_config.type_vocab_size,
               layer_norm_eps=text_config.layer_norm_eps, dropout=text_config.dropout,
               dtype=dtype, remat=remat, gelu=text_config.gelu)

  def setup(self):
    self.embeddings = BertEmbeddings(self.vocab_size, self.width, self.max_positions,
                                     self.type_vocab_size, self.layer_norm_eps, self.dropout,
                                     self.dtype)
    if self.gelu not in GELU_FORMS:
      raise ValueError(f"gelu {self.gelu!r} is unknown; use one of {GELU_FORMS}")
    self.encoder = BertEncoder(self.depth, self.heads, round(self.width * self.mlp_ratio),
                               self.layer_norm_eps, self.dropout, self.dtype, self.remat,
                               gelu_approximate=self.gelu == "tanh")

  def __call__(self, input_ids, attention_mask, train=False):
    """Encodes token ids.

    Args:
      input_ids: `[B, L]` int32 WordPiece ids.
      attention_mask: `[B, L]` int or bool, 1 = real token, 0 = padding (ignored as a key).
      train: enables dropout (needs a "dropout" rng when dropout > 0).

    Returns:
      `[B, L, width]` last hidden states in `dtype` ([CLS] at index 0).
    """
    x = self.embeddings(input_ids, train)
    return self.encoder(x, attention_mask, train)

  def word_embedding_table(self):
    """The `[vocab_size, width]` float32 word-embedding table (for the tied MLM decoder)."""
    return self.embeddings.word_embeddings.embedding


_HF_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def hf_param_name(path):
  """Maps a flax parameter path of `Bert` to its Hugging Face `BertModel` state-dict key.

  Example: `("encoder", "layer_0", "attention", "self", "query", "kernel")` ->
  `"encoder.layer.0.attention.self.query.weight"`. A Dense `kernel` is `[in, out]` here and
  `[out, in]` in HF, so a loader transposes it; embeddings and LayerNorm need no transpose.

  Args:
    path: tuple of str, the keys from the `Bert` params root down to a leaf.

  Returns:
    The dotted HF key.

  Raises:
    ValueError for a leaf name with no HF counterpart.
  """
  *modules, leaf = path
  if leaf not in _HF_LEAF_NAMES:
    raise ValueError(f"no Hugging Face name for parameter {'/'.join(path)!r}")
  parts = []
  for module in modules:
    prefix, _, index = module.rpartition("_")
    parts.extend(("layer", index) if prefix == "layer" and index.isdigit() else (module,))
  return ".".join(parts + [_HF_LEAF_NAMES[leaf]])


def hf_param_names(params):
  """`{HF key: HF shape}` for every leaf of a `Bert` params tree (arrays or ShapeDtypeStructs).

  Shapes are in HF layout: Dense kernels transposed to `[out, in]`.
  """
  names = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    shape = tuple(leaf.shape)
    names[hf_param_name(path)] = shape[::-1] if path[-1] == "kernel" else shape
  return names
