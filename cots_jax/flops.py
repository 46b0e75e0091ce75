"""Analytic FLOP model of a COTS step (design §8.8), for MFU and for the TPU fit proof.

A multiply-add counts as 2 FLOPs; a backward pass costs twice its forward. Every pass that the
step runs is counted: clean online pair (forward + backward, none below a locked tower's
trainable blocks, nothing for a cached tower, the image encoder on the tokens that
`model.image.token_drop` keeps), momentum pair (forward, when a term reads it),
masked text and masked image passes with the MLM / MVM heads (forward + backward; approximated
as full backward also on a locked tower), the frozen VQ encoder (forward), the contrastive logits
against batch and queue.
"""

from cots_jax import locking
from cots_jax import objectives
from cots_jax import shapes
from cots_jax.data import masking
from cots_jax.models import vit


def transformer_forward_flops(tokens, width, depth, mlp_ratio):
  """Forward FLOPs of `depth` pre/post-LN encoder layers over one sequence of `tokens`.

  Per layer: Q, K, V and output projections (4 d^2 MACs per token), the MLP (2 r d^2 MACs per
  token) and attention scores + weighted values (2 n d MACs per token).
  """
  per_layer = tokens * (8 * width**2 + 4 * mlp_ratio * width**2) + 4 * tokens**2 * width
  return depth * per_layer


def patch_embedding_flops(config):
  """One image's patch embedding: the patch convolution, or the conv stem (3 x 3 stride-2
  layers, each halving the side, then the 1 x 1 projection; norms and GELU not counted)."""
  image = config.model.image
  patches = shapes.num_patches(config)
  if image.stem == "patch":
    return 2 * patches * image.patch_size**2 * 3 * image.width
  flops, side, channels = 0, image.image_size, 3
  for out in vit.conv_stem_channels(image.patch_size, image.width):
    side = -(-side // 2)
    flops += 2 * side**2 * 9 * channels * out
    channels = out
  return flops + 2 * patches * channels * image.width


def image_tokens(config, train=False):
  """The tokens of one image in the ViT's encoder: [CLS] + the patches, less
  `model.image.token_drop` of them in a training pass."""
  image = config.model.image
  return vit.kept_patches(shapes.num_patches(config), image.token_drop if train else 0.0) + 1


def image_tower_forward_flops(config, train=False):
  """One image through the ViT: patch embedding (of every patch) + encoder."""
  image = config.model.image
  return patch_embedding_flops(config) + transformer_forward_flops(
      image_tokens(config, train), image.width, image.depth, image.mlp_ratio)


def text_tower_forward_flops(config):
  """One caption of `input.max_len` tokens through BERT (embeddings are look-ups: 0 FLOPs)."""
  text = config.model.text
  return transformer_forward_flops(config.input.max_len, text.width, text.depth, text.mlp_ratio)


def _head_flops(positions, width, other_width, fusion, outputs):
  """MLM / MVM head forward: fusion of the other modality, Dense + GELU + LN, decoder."""
  fused = {"concat": width + other_width, "add": width, "none": width}[fusion]
  fusion_extra = 2 * other_width * width if fusion == "add" else 0
  return positions * (2 * fused * width + fusion_extra + 2 * width * outputs)


def vq_encoder_forward_flops(config):
  """The frozen tokenizer's encoder on one image (patch conv + two 1x1 layers + nearest code)."""
  image, vq = config.model.image, config.vq
  patches = shapes.num_patches(config)
  per_patch = (image.patch_size**2 * 3 * vq.hidden + vq.hidden * vq.hidden
               + vq.hidden * vq.code_dim + vq.code_dim * vq.codebook_size)
  return 2 * patches * per_patch


def _tower_flops(config, tower, cached):
  """(forward, backward) FLOPs of one example through `tower` in the clean online pass: none
  for a cached tower; a locked tower's backward reaches only its trainable top blocks (the
  blocks below and the embeddings need no gradient)."""
  if tower in cached:
    return 0, 0
  forward = (image_tower_forward_flops(config, train=True) if tower == "image"
             else text_tower_forward_flops(config))
  if config.model[tower].locked == locking.NONE:
    return forward, 2 * forward
  group = config.model[tower]
  tokens = image_tokens(config, train=True) if tower == "image" else config.input.max_len
  unlocked = locking.tower_lock(config, tower)
  return forward, 2 * transformer_forward_flops(tokens, group.width, unlocked, group.mlp_ratio)


def cots_step_flops_per_pair(config, cached=()):
  """FLOPs of one update step divided by the global batch, as a dict of parts and `total`.

  Follows the switches: locked towers (no backward below their trainable blocks), `cached`
  towers (features.cached_towers: no tower pass at all), no momentum encoder
  (objectives.reads_momentum False: no momentum pass, no queue logits) and the loss weights.
  """
  image, text = config.model.image, config.model.text
  heads = 2 * (image.width + text.width) * config.model.embed_dim
  (image_fwd, image_bwd), (text_fwd, text_bwd) = (_tower_flops(config, tower, cached)
                                                  for tower in ("image", "text"))
  pair_fwd = image_fwd + text_fwd + heads
  parts = {"online_pair": pair_fwd + image_bwd + text_bwd + 2 * heads}
  if objectives.reads_momentum(config):
    parts["momentum_pair"] = pair_fwd
    if config.loss.itc > 0 or config.loss.kl_align > 0:
      # The i2t and t2i logit rows of this pair, forward and backward.
      parts["contrastive_logits"] = 3 * 2 * 2 * config.model.embed_dim * (
          shapes.contrastive_columns(config))
  if config.loss.cookie_cm > 0 and not config.loss.cookie_use_queue:
    parts["in_batch_logits"] = 3 * 2 * 2 * config.model.embed_dim * config.input.batch_size
  if config.loss.mlm > 0:
    predictions = masking.num_mlm_predictions(config.input.mlm_prob, config.input.max_len)
    parts["masked_text"] = 3 * (text_tower_forward_flops(config) + _head_flops(
        predictions, text.width, image.width, config.model.mvlm_fusion, text.vocab_size))
  if config.loss.mvm > 0:
    masked = shapes.num_mvm_masked(config)
    parts["masked_image"] = 3 * (image_tower_forward_flops(config) + _head_flops(
        masked, image.width, text.width, config.model.mvlm_fusion, config.vq.codebook_size))
    parts["vq_tokenizer"] = vq_encoder_forward_flops(config)
  parts["total"] = sum(parts.values())
  return parts
