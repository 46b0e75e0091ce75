"""Single-stream cross-encoder in the style of ViLT (Kim et al. 2021): one transformer reads an
image and a caption together and scores how well they match.

The image enters as linear projections of its patches (ViLT's "patch projection") with a learned
image [CLS] and positions, the caption as BERT's word + position embeddings, both at the
transformer's width. The tokens of a pair, each sequence with its modality-type embedding, are
concatenated (caption first) and run through pre-LN encoder blocks (models/vit.py); a head on the
first token (the caption's [CLS]) gives the score. Only the blocks see both inputs, so a
retrieval embeds each image and each caption once (`embed_image`, `embed_text`) and runs `score`
on every pair; `__call__` does all three for pairs given as raw inputs (and for `init`).

Parameters are float32; `dtype` is the compute dtype.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cots_jax.models import bert
from cots_jax.models import cots
from cots_jax.models import vit

IMAGE_TYPE, TEXT_TYPE = 1, 0  # rows of the modality-type embedding


class CrossEncoder(nn.Module):
  """Scores image-caption pairs with one transformer over the concatenated tokens of each pair.

  Attributes:
    image_size, patch_size: square input side and patch side in pixels (N = (image_size /
      patch_size)^2 patch tokens).
    vocab_size, max_positions: the caption's WordPiece vocabulary and its longest length.
    width, depth, heads, mlp_ratio: transformer sizes (MLP hidden = width * mlp_ratio).
    dtype: compute dtype.
    layer_norm_eps: LayerNorm epsilon of the blocks and of the image embedding.
    gelu: "exact" (erf) or "tanh", in the blocks.
  """
  image_size: int
  patch_size: int
  vocab_size: int
  max_positions: int
  width: int
  depth: int
  heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-6
  gelu: str = "exact"

  @classmethod
  def from_config(cls, config):
    """The cross-encoder of the size of `config.model.image` (width, depth, heads, MLP ratio,
    patches) reading captions of `config.model.text`'s vocabulary, in `config.model.dtype`."""
    image, text = config.model.image, config.model.text
    return cls(image_size=image.image_size, patch_size=image.patch_size,
               vocab_size=text.vocab_size, max_positions=text.max_positions, width=image.width,
               depth=image.depth, heads=image.heads, mlp_ratio=image.mlp_ratio,
               dtype=cots.dtype_from_name(config.model.dtype),
               layer_norm_eps=image.layer_norm_eps, gelu=image.gelu)

  @property
  def num_patches(self):
    """N, the patch tokens of one image."""
    return (self.image_size // self.patch_size) ** 2

  def setup(self):
    p = self.patch_size
    self.patch_projection = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                                    dtype=self.dtype)
    self.image_cls = self.param("image_cls", nn.initializers.zeros, (1, 1, self.width))
    self.image_positions = self.param("image_positions", nn.initializers.normal(0.02),
                                      (1, 1 + self.num_patches, self.width))
    self.word_embeddings = bert.BertEmbeddings(
        self.vocab_size, self.width, self.max_positions, type_vocab_size=1,
        layer_norm_eps=self.layer_norm_eps, dropout=0.0, dtype=self.dtype)
    self.modality_types = self.param("modality_types", nn.initializers.normal(0.02),
                                     (2, self.width))
    self.blocks = [vit.EncoderBlock(self.heads, round(self.width * self.mlp_ratio), 0.0,
                                    self.dtype, self.layer_norm_eps, self.gelu == "tanh")
                   for _ in range(self.depth)]
    self.norm = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype)
    self.head = nn.Dense(1, dtype=self.dtype)

  def embed_image(self, images):
    """images `[B, H, W, 3]` -> `[B, 1 + N, width]`: the image [CLS] and the patch projections,
    positions added."""
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"CrossEncoder built for {self.image_size}px images got "
                       f"{images.shape[1:3]}")
    patches = self.patch_projection(images).reshape(images.shape[0], self.num_patches, self.width)
    cls = jnp.broadcast_to(self.image_cls, (images.shape[0], 1, self.width)).astype(patches.dtype)
    return jnp.concatenate([cls, patches], axis=1) + self.image_positions.astype(patches.dtype)

  def embed_text(self, text_ids):
    """text_ids `[B, L]` int -> `[B, L, width]` BERT word + position embeddings."""
    return self.word_embeddings(text_ids)

  def score(self, image_tokens, text_tokens, text_mask):
    """Scores each pair of an image and a caption embedding.

    Args:
      image_tokens: `[P, 1 + N, width]` from `embed_image`.
      text_tokens: `[P, L, width]` from `embed_text`.
      text_mask: `[P, L]` (1 = real token); padding is never attended to.

    Returns:
      float32 `[P]`, the score of pair p = (image_tokens[p], text_tokens[p]).
    """
    types = self.modality_types.astype(self.dtype)
    x = jnp.concatenate([text_tokens.astype(self.dtype) + types[TEXT_TYPE],
                         image_tokens.astype(self.dtype) + types[IMAGE_TYPE]], axis=1)
    valid = jnp.concatenate([text_mask > 0, jnp.ones(image_tokens.shape[:2], bool)], axis=1)
    attention_mask = nn.make_attention_mask(valid, valid)
    for block in self.blocks:
      x = block(x, False, attention_mask)
    # Only the first token feeds the head, so only it is normalised.
    return self.head(self.norm(x[:, 0]))[:, 0].astype(jnp.float32)

  def __call__(self, images, text_ids, text_mask):
    """images `[P, H, W, 3]`, text_ids and text_mask `[P, L]` -> float32 `[P]`, the score of
    image p with caption p."""
    return self.score(self.embed_image(images), self.embed_text(text_ids), text_mask)
