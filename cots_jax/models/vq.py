"""VQ tokenizer whose codes are the MVM targets (method §4 item 6, design §8.1, §8.12).

The encoder downsamples by exactly the ViT patch size (a Conv with kernel = stride = patch), so
an image gives one code per ViT patch at any resolution. Everything here is float32. The params
are {"encoder", "decoder", "codebook" [K, C]}; `tokenize` needs only these. Training (EMA or
straight-through codebook, commitment loss, dead-code revival) is in `cots_jax.vq_trainer`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy.special import entr


class ResidualMlp(nn.Module):
  """Per-position residual MLP (a pair of 1x1 convs): x + Dense(GELU(Dense(LN(x))))."""

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    y = nn.LayerNorm()(x)
    y = nn.gelu(nn.Dense(width)(y), approximate=False)
    return x + nn.Dense(width)(y)


class PatchEncoder(nn.Module):
  """`[B, H, W, 3] -> [B, H/p, W/p, code_dim]`: patchify conv, residual MLPs, projection."""
  patch_size: int
  hidden: int
  code_dim: int
  num_blocks: int

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    x = nn.Conv(self.hidden, (p, p), strides=(p, p), padding="VALID")(images)
    for _ in range(self.num_blocks):
      x = ResidualMlp()(x)
    return nn.Dense(self.code_dim)(nn.LayerNorm()(x))


class PatchDecoder(nn.Module):
  """`[B, h, w, code_dim] -> [B, h*p, w*p, 3]`: the encoder's mirror (transposed patch conv)."""
  patch_size: int
  hidden: int
  num_blocks: int

  @nn.compact
  def __call__(self, z):
    p = self.patch_size
    x = nn.Dense(self.hidden)(z)
    for _ in range(self.num_blocks):
      x = ResidualMlp()(x)
    x = nn.gelu(nn.LayerNorm()(x), approximate=False)
    return nn.ConvTranspose(3, (p, p), strides=(p, p), padding="VALID")(x)


class VQTokenizer(nn.Module):
  """VQ-VAE with one code per `patch_size` x `patch_size` patch.

  Attributes:
    patch_size: downsampling factor; must equal the ViT patch size.
    hidden: channels of the encoder / decoder.
    code_dim: C, the size of a code vector.
    codebook_size: K, the number of codes (the MVM vocabulary).
    num_blocks: residual MLPs in the encoder and in the decoder.
  """
  patch_size: int
  hidden: int
  code_dim: int
  codebook_size: int
  num_blocks: int = 2

  @classmethod
  def from_config(cls, config):
    """Builds the tokenizer from the whole config (`vq` group + `model.image.patch_size`)."""
    return cls(patch_size=config.model.image.patch_size, hidden=config.vq.hidden,
               code_dim=config.vq.code_dim, codebook_size=config.vq.codebook_size)

  def setup(self):
    self.encoder = PatchEncoder(self.patch_size, self.hidden, self.code_dim, self.num_blocks)
    self.decoder = PatchDecoder(self.patch_size, self.hidden, self.num_blocks)
    self.codebook = self.param("codebook", nn.initializers.normal(1.0),
                               (self.codebook_size, self.code_dim))

  def encode(self, images):
    """`[B, H, W, 3]` (H, W multiples of patch_size) -> z_e `[B, H/p, W/p, C]`."""
    if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
      raise ValueError(f"image size {images.shape[1:3]} is not a multiple of the patch size "
                       f"{self.patch_size}")
    return self.encoder(images)

  def quantize(self, z_e):
    """Nearest-code quantisation.

    Args:
      z_e: `[..., C]` encoder outputs.

    Returns:
      (z_q, codes): z_q `[..., C]` equals the nearest code vector in value, with the
      straight-through gradient (d z_q / d z_e = identity, nothing reaches the codebook);
      codes `[...]` int32 in [0, K).
    """
    codes = nearest_codes(z_e, self.codebook)
    z_q = self.codebook[codes]
    return z_e + jax.lax.stop_gradient(z_q - z_e), codes

  def decode(self, z_q):
    """`[B, h, w, C]` -> reconstruction `[B, h*p, w*p, 3]`."""
    return self.decoder(z_q)

  def tokenize(self, images):
    """`[B, H, W, 3]` -> codes `[B, (H/p)*(W/p)]` int32, row-major over the patch grid.

    The order matches the ViT's patch tokens, so these are the MVM targets.
    """
    _, codes = self.quantize(self.encode(images))
    return codes.reshape(codes.shape[0], -1)

  def __call__(self, images):
    """`[B, H, W, 3]` -> dict(recon [B,H,W,3], codes [B,h,w], z_e [B,h,w,C], z_q [B,h,w,C])."""
    z_e = self.encode(images)
    z_q, codes = self.quantize(z_e)
    return {"recon": self.decode(z_q), "codes": codes, "z_e": z_e, "z_q": z_q}


def nearest_codes(z, codebook):
  """Index of the nearest (squared L2) codebook row: z `[..., C]`, codebook `[K, C]` -> `[...]`."""
  z = z.astype(jnp.float32)
  dist = (jnp.sum(z * z, -1, keepdims=True) - 2.0 * z @ codebook.T
          + jnp.sum(codebook * codebook, -1))
  return jnp.argmin(dist, -1).astype(jnp.int32)


def codebook_perplexity(codes, codebook_size):
  """exp(entropy) of the code histogram: 1 when one code is used, K when all are equally used.

  Args:
    codes: int array of any shape, values in [0, codebook_size).
    codebook_size: K.

  Returns:
    float32 scalar.
  """
  counts = jnp.bincount(codes.reshape(-1), length=codebook_size).astype(jnp.float32)
  probs = counts / jnp.maximum(counts.sum(), 1.0)
  return jnp.exp(jnp.sum(entr(probs)))
