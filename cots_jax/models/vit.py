"""ViT image tower (method §4 item 1): pre-LN transformer over patches with a learned [CLS].

Parameters are float32; `dtype` is the compute dtype of the activations. With `mvm_mask`, masked
patch embeddings are swapped for a learned `mask_token` before the position embedding is added
(BEiT), which is what the MVM objective predicts from.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Patch positions: learned (hub checkpoints) or big_vision's fixed 2-D sine-cosine.
POSEMBS = ("learn", "sincos2d")
# Patch embedding: one p x p convolution (ViT), or a stack of 3 x 3 stride-2 convolutions and a
# 1 x 1 projection (Xiao et al. 2021, "Early convolutions help transformers see better").
STEMS = ("patch", "conv")


def fits_conv_stem(patch_size):
  """Whether the conv stem can make patches of this size: a power of 2, at least 2 (one
  stride-2 layer per halving)."""
  return patch_size >= 2 and patch_size & (patch_size - 1) == 0


def conv_stem_channels(patch_size, width):
  """Output channels of the conv stem's 3 x 3 stride-2 layers: log2(patch_size) of them, doubling
  up to `width` (patch 8, width 192: 48, 96, 192)."""
  if not fits_conv_stem(patch_size):
    raise ValueError(f"the conv stem needs a patch_size that is a power of 2 (>= 2), "
                     f"got {patch_size}")
  layers = patch_size.bit_length() - 1
  return [max(width // 2 ** (layers - 1 - i), 1) for i in range(layers)]


class ConvStem(nn.Module):
  """`[B, H, W, 3] -> [B, H/p, W/p, width]`: 3 x 3 stride-2 convolutions, each followed by a
  LayerNorm over channels and GELU (no batch statistics), then a 1 x 1 projection to `width`."""
  patch_size: int
  width: int
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, images):
    x = images
    for i, channels in enumerate(conv_stem_channels(self.patch_size, self.width)):
      x = nn.Conv(channels, (3, 3), strides=(2, 2), padding="SAME", use_bias=False,
                  dtype=self.dtype, name=f"conv_{i}")(x)
      x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name=f"norm_{i}")(x)
      x = nn.gelu(x, approximate=self.gelu_approximate)
    return nn.Conv(self.width, (1, 1), dtype=self.dtype, name="proj")(x)


class MlpBlock(nn.Module):
  """Transformer feed-forward: Dense -> GELU -> Dense, `[..., D] -> [..., D]`."""
  hidden: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    width = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)); `[B, T, D] -> [B, T, D]`.

  `attention_mask` `[B, 1, T, T]` bool (True = may attend), or None for full attention.
  """
  heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x, train=False, attention_mask=None):
    y = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, dtype=self.dtype, force_fp32_for_softmax=True,
        deterministic=True, name="attn")(y, y, mask=attention_mask)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="norm2")(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.gelu_approximate, name="mlp")(
        y, train)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


def posemb_sincos_2d(grid_size, width, temperature=10_000.0):
  """Fixed 2-D sine-cosine position embeddings of a grid_size x grid_size patch grid (row-major,
  as the patch tokens): `[1, grid_size**2, width]`, width a multiple of 4. A quarter of the
  channels each holds sin(x w), cos(x w), sin(y w), cos(y w) for the column x and row y, at
  frequencies w = temperature^(-k / (width/4 - 1)), k = 0 .. width/4 - 1."""
  if width % 4:
    raise ValueError(f"sincos2d position embeddings need a width divisible by 4, got {width}")
  quarter = width // 4
  rows, cols = jnp.meshgrid(jnp.arange(grid_size), jnp.arange(grid_size), indexing="ij")
  omega = temperature ** -(jnp.arange(quarter) / max(quarter - 1, 1))
  x = cols.reshape(-1, 1) * omega
  y = rows.reshape(-1, 1) * omega
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)[None]


def kept_patches(num_patches, token_drop):
  """The patch tokens left of `num_patches` after dropping a `token_drop` fraction (rounded;
  at least one)."""
  return max(num_patches - round(num_patches * token_drop), 1)


def keep_random_tokens(tokens, keep, rng):
  """`[B, N, D] -> [B, keep, D]`: a uniformly random subset of `keep` tokens of each row, drawn
  independently per row, in their original order."""
  scores = jax.random.uniform(rng, tokens.shape[:2])
  kept = jnp.sort(jnp.argsort(scores, axis=1)[:, :keep], axis=1)
  return jnp.take_along_axis(tokens, kept[..., None], axis=1)


class ViT(nn.Module):
  """Vision transformer returning all tokens, [CLS] first.

  Attributes:
    image_size: side of the square input in pixels; fixes the number of position embeddings.
    patch_size: side of a patch in pixels; N = (image_size / patch_size)^2 patches.
    width, depth, heads, mlp_ratio: transformer sizes (MLP hidden = width * mlp_ratio).
    dropout: dropout rate on embeddings, attention output and MLP (active only when train).
    dtype: compute dtype; parameters stay float32.
    remat: rematerialise each block in the backward pass (saves activation memory).
    layer_norm_eps: LayerNorm epsilon (1e-6 as timm / big_vision; Hugging Face ViT uses 1e-12).
    gelu: "exact" (erf: timm, Hugging Face) or "tanh" (big_vision / AugReg, flax's default).
    posemb: "learn" (a learned `pos_embed` for [CLS] and every patch, initialised small, as the
      hub checkpoints have) or "sincos2d" (fixed 2-D sine-cosine patch positions, none for
      [CLS], as big_vision's posemb="sincos2d": no parameter, and position is visible from step
      0 at the scale of the patch embeddings).
    stem: "patch" (one patch_size x patch_size convolution, `patch_embed`) or "conv" (ConvStem,
      `stem`: patch_size must be a power of 2).
    token_drop: fraction of patch tokens dropped at random from each image in train mode, after
      the position embeddings (FLIP, Li et al. 2023: the encoder runs on the rest, so a step
      costs about that fraction less); none at eval.
  """
  image_size: int
  patch_size: int
  width: int
  depth: int
  heads: int
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  layer_norm_eps: float = 1e-6
  gelu: str = "exact"
  posemb: str = "learn"
  stem: str = "patch"
  token_drop: float = 0.0

  @classmethod
  def from_config(cls, image_config, dtype=jnp.float32, remat=False):
    """Builds the tower from a `config.model.image` group (configs/common.py)."""
    return cls(image_size=image_config.image_size, patch_size=image_config.patch_size,
               width=image_config.width, depth=image_config.depth, heads=image_config.heads,
               mlp_ratio=image_config.mlp_ratio, dropout=image_config.dropout, dtype=dtype,
               remat=remat, layer_norm_eps=image_config.layer_norm_eps,
               gelu=image_config.gelu, posemb=image_config.posemb, stem=image_config.stem,
               token_drop=image_config.token_drop)

  @property
  def grid_size(self):
    """Patches per side: image_size // patch_size."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self):
    """N, the number of patch tokens (the MVM mask length)."""
    return self.grid_size ** 2

  def kept_patches(self, train):
    """N', the patch tokens the encoder sees: N less `token_drop` of them in train mode."""
    return kept_patches(self.num_patches, self.token_drop if train else 0.0)

  @nn.compact
  def __call__(self, images, mvm_mask=None, train=False):
    """Encodes images.

    Args:
      images: `[B, H, W, 3]` with H = W = image_size.
      mvm_mask: optional `[B, N]` bool, True = replace that patch by the mask token.
      train: enables dropout and token_drop (they need a "dropout" rng).

    Returns:
      `[B, 1 + N', width]` tokens in `dtype`, [CLS] at index 0, after the final LayerNorm; N' =
      `kept_patches(train)` (the kept patches in their original order).
    """
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"ViT built for {self.image_size}px images got {images.shape[1:3]}")
    p = self.patch_size
    if self.stem == "patch":
      x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                  name="patch_embed")(images)
    elif self.stem == "conv":
      x = ConvStem(p, self.width, self.dtype, self.layer_norm_eps, self.gelu == "tanh",
                   name="stem")(images)
    else:
      raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
    batch = x.shape[0]
    x = x.reshape(batch, self.num_patches, self.width)

    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width))
    if mvm_mask is not None:
      if mvm_mask.shape != (batch, self.num_patches):
        raise ValueError(f"mvm_mask must be [B, N] = {(batch, self.num_patches)}, "
                         f"got {mvm_mask.shape}")
      x = jnp.where(mvm_mask[..., None], mask_token.astype(x.dtype), x)

    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x], 1)
    if self.posemb == "learn":
      pos = self.param("pos_embed", nn.initializers.normal(0.02),
                       (1, 1 + self.num_patches, self.width))
    elif self.posemb == "sincos2d":
      pos = jnp.pad(posemb_sincos_2d(self.grid_size, self.width), ((0, 0), (1, 0), (0, 0)))
    else:
      raise ValueError(f"posemb must be one of {POSEMBS}, got {self.posemb!r}")
    x = x + pos.astype(x.dtype)
    if self.kept_patches(train) < self.num_patches:
      x = jnp.concatenate([x[:, :1], keep_random_tokens(
          x[:, 1:], self.kept_patches(train), self.make_rng("dropout"))], axis=1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)

    block_cls = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = block_cls(self.heads, round(self.width * self.mlp_ratio), self.dropout, self.dtype,
                    self.layer_norm_eps, self.gelu == "tanh", name=f"block_{i}")(x, train)
    return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="norm")(x)
