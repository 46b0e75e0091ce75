"""COOKIE's weight-sharing transformer (WST, method §2.2 and §4 item 10).

A small pre-LN transformer on top of the towers' token sequences. With `wst_shared` one instance
(one parameter set) serves both modalities, applied separately to the image tokens ([CLS] +
patches) and to the text tokens (with their padding mask); the `wst_shared=False` ablation builds
one instance per modality, of the same size. Per modality, and so never shared: an input
projection when the tower's width differs from the WST's, and a row of the learned modality-type
embedding.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cots_jax.models.vit import EncoderBlock

MODALITIES = ("image", "text")


class WeightSharingTransformer(nn.Module):
  """Transformer layers with one parameter set for every modality in `modalities`.

  Attributes:
    modalities: the modalities this instance serves: ("image", "text") when shared, one of them
      for an unshared stack. Each has its own modality-embedding row and input projection.
    width, depth, heads, mlp_dim: transformer sizes.
    modality_embed: add a learned modality-type vector to the inputs.
    dropout: dropout rate inside the blocks (active only when train).
    dtype: compute dtype; parameters stay float32.
    layer_norm_eps: LayerNorm epsilon.
  """
  modalities: tuple[str, ...]
  width: int
  depth: int
  heads: int
  mlp_dim: int
  modality_embed: bool = True
  dropout: float = 0.0
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, tokens, mask, modality, train=False):
    """Encodes one modality's tower output.

    Args:
      tokens: `[B, T, D_tower]` tower output.
      mask: `[B, T]` (1 / True = real token) or None (every token is real).
      modality: one of `self.modalities`.
      train: enables dropout (needs a "dropout" rng when dropout > 0).

    Returns:
      `[B, T, width]` in `dtype`, after a final LayerNorm. A padding token never changes the
      outputs at real tokens (it is masked as an attention key).
    """
    if modality not in self.modalities:
      raise ValueError(f"this WST serves {self.modalities}, not {modality!r}")
    x = tokens.astype(self.dtype)
    if x.shape[-1] != self.width:
      x = nn.Dense(self.width, dtype=self.dtype, name=f"{modality}_input")(x)
    if self.modality_embed:
      table = self.param("modality_embed", nn.initializers.normal(0.02),
                         (len(self.modalities), self.width))
      x = x + table[self.modalities.index(modality)].astype(x.dtype)
    attention_mask = None if mask is None else nn.make_attention_mask(mask > 0, mask > 0)
    for i in range(self.depth):
      x = EncoderBlock(self.heads, self.mlp_dim, self.dropout, self.dtype, self.layer_norm_eps,
                       name=f"block_{i}")(x, train, attention_mask)
    return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="norm")(x)
