"""Analytic FLOP model of a COTS step (design §8.8), for MFU and for the TPU fit proof.

A multiply-add counts as 2 FLOPs; a backward pass costs twice its forward. Every pass that the
step runs is counted: clean online pair (forward + backward), momentum pair (forward), masked
text and masked image passes with the MLM / MVM heads (forward + backward), the frozen VQ encoder
(forward), the contrastive logits against batch and queue.
"""

from cots_jax import shapes
from cots_jax.data import masking


def transformer_forward_flops(tokens, width, depth, mlp_ratio):
  """Forward FLOPs of `depth` pre/post-LN encoder layers over one sequence of `tokens`.

  Per layer: Q, K, V and output projections (4 d^2 MACs per token), the MLP (2 r d^2 MACs per
  token) and attention scores + weighted values (2 n d MACs per token).
  """
  per_layer = tokens * (8 * width**2 + 4 * mlp_ratio * width**2) + 4 * tokens**2 * width
  return depth * per_layer


def image_tower_forward_flops(config):
  """One image through the ViT: patch embedding + encoder."""
  image = config.model.image
  patches = shapes.num_patches(config)
  patch_embed = 2 * patches * image.patch_size**2 * 3 * image.width
  return patch_embed + transformer_forward_flops(patches + 1, image.width, image.depth,
                                                 image.mlp_ratio)


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


def cots_step_flops_per_pair(config):
  """FLOPs of one update step divided by the global batch, as a dict of parts and `total`."""
  image, text = config.model.image, config.model.text
  pair_fwd = (image_tower_forward_flops(config) + text_tower_forward_flops(config)
              + 2 * (image.width + text.width) * config.model.embed_dim)
  # The i2t and t2i logit rows of this pair.
  logits = 2 * 2 * config.model.embed_dim * shapes.contrastive_columns(config)
  parts = {
      "online_pair": 3 * pair_fwd,
      "momentum_pair": pair_fwd,
      "contrastive_logits": 3 * logits if (config.loss.itc > 0 or config.loss.kl_align > 0) else 0,
  }
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
