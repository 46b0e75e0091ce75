"""The two-stream model: ViT + BERT towers, projection heads, MLM / MVM heads (COTS), and
optionally COOKIE's weight-sharing transformer between the towers and the projections.

No cross-stream network (method §1.2): the other modality enters the MLM / MVM heads only as
one pooled global vector (method §4 items 7-8, `config.model.mvlm_fusion`). With
`config.model.use_wst` each tower's tokens pass through the WST (models/wst.py) before pooling and
projection; the MLM / MVM heads keep using the towers' own global vectors. Video clips
`[B, T, H, W, 3]` go through the image tower frame by frame and a temporal aggregation
(models/temporal.py) before the image projection (`video_embedding`). The trainer calls
the pieces as pure functions, e.g.

  model = CotsModel.from_config(config)
  params = model.init(rng, image, text_ids, text_mask)["params"]
  tokens = model.apply({"params": params}, image, method="encode_image")

Parameters are float32; `config.model.dtype` is the compute dtype. Parameter tree:
image (ViT), text (BERT, HF names), image_proj, text_proj, mlm_head, mvm_head; with the WST also
`wst` (shared) or `wst_image` + `wst_text` (unshared), and, for COOKIE's "cross_model" terms,
image_encoder_proj + text_encoder_proj (projections of the towers' own global vectors); with
`model.temporal_agg == "transformer"` and video input, `temporal`.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from cots_jax.models import temporal
from cots_jax.models import wst
from cots_jax.models.bert import Bert
from cots_jax.models.vit import ViT

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# How the other modality's global vector enters the MLM / MVM heads.
FUSIONS = ("concat", "add", "none")
# Where that global vector comes from: the clean online pass or the momentum pass.
MVLM_GLOBAL_SOURCES = ("online", "momentum")
# A tower's global vector: its [CLS] state or the mean of its patch / real-token states.
POOLINGS = ("cls", "mean")
# COOKIE's intra-modal positives: a second view / dropout pass, or the tower's own projection.
INTRA_MODES = ("views", "cross_model")


def dtype_from_name(name):
  """`"float32"` / `"bfloat16"` -> the jnp dtype; ValueError naming the choices otherwise."""
  if name not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


def l2_normalize(x, eps=1e-12):
  """`[..., D]` -> float32 rows of unit L2 norm (a zero row stays zero)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def pool_image(tokens, how):
  """tokens `[B, 1+N, D]` ([CLS] first) -> `[B, D]`: the [CLS] state ("cls") or the mean of the
  patch states ("mean")."""
  if how == "mean":
    return jnp.mean(tokens[:, 1:], axis=1)
  return tokens[:, 0]


def pool_text(hidden, mask, how):
  """hidden `[B, L, D]`, mask `[B, L]` (1 = real) -> `[B, D]`: the [CLS] state ("cls") or the
  mean over the real tokens ("mean")."""
  if how == "mean":
    weights = mask.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)
  return hidden[:, 0]


def gather_positions(tokens, positions):
  """tokens `[B, N, D]`, positions `[B, P]` int -> the tokens at those positions `[B, P, D]`."""
  return jnp.take_along_axis(tokens, positions[..., None], axis=1)


def masked_patch_positions(mvm_mask, num_masked):
  """The indices of the `num_masked` True entries of each row of `mvm_mask` `[B, N]` -> `[B, M]`.

  The data gives exactly `num_masked` per row (design §8.3), so the shape is static.
  """
  return jnp.argsort(~mvm_mask, axis=1, stable=True)[:, :num_masked].astype(jnp.int32)


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
      raise ValueError(f"config.model.mvlm_fusion must be one of {FUSIONS}, got "
                       f"{self.fusion!r}")
    x = nn.Dense(self.width, dtype=self.dtype, name="dense")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="LayerNorm")(nn.gelu(x, approximate=False))
    if tied_embedding is None:
      return nn.Dense(self.num_outputs, dtype=self.dtype, name="decoder")(x).astype(jnp.float32)
    bias = self.param("decoder_bias", nn.initializers.zeros, (tied_embedding.shape[0],))
    logits = jnp.dot(x, tied_embedding.astype(self.dtype).T,
                     preferred_element_type=jnp.float32)
    return logits + bias


def needs_encoder_projections(config):
  """True when COOKIE's "cross_model" intra-modal terms are on (they need projections of the
  towers' own global vectors beside the WST-level ones)."""
  loss = config.loss
  return (config.model.use_wst and loss.cookie_intra_mode == "cross_model"
          and (loss.cookie_vv > 0 or loss.cookie_tt > 0))


class CotsModel(nn.Module):
  """Both towers and all heads of COTS, plus COOKIE's WST when `model.use_wst`.

  Build it with `CotsModel.from_config(config)`.

  Attributes:
    model: the `config.model` group as a FrozenConfigDict (hashable, as flax fields must be).
    codebook_size: V of the MVM head, = config.vq.codebook_size.
    encoder_projections: build image_encoder_proj / text_encoder_proj (COOKIE "cross_model").
  """
  model: ml_collections.FrozenConfigDict
  codebook_size: int
  encoder_projections: bool = False

  @classmethod
  def from_config(cls, config):
    """From the whole config tree (configs/common.py): `config.model`, `config.vq` and whether
    the loss needs encoder-level projections."""
    return cls(model=ml_collections.FrozenConfigDict(config.model),
               codebook_size=config.vq.codebook_size,
               encoder_projections=needs_encoder_projections(config))

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
    if m.use_wst and m.wst_shared:
      self.wst = self._wst_stack(wst.MODALITIES, dtype)
    elif m.use_wst:
      self.wst_image = self._wst_stack(("image",), dtype)
      self.wst_text = self._wst_stack(("text",), dtype)
    if self.encoder_projections:
      self.image_encoder_proj = nn.Dense(m.embed_dim, dtype=dtype)
      self.text_encoder_proj = nn.Dense(m.embed_dim, dtype=dtype)
    # Its width is that of the frames' head inputs: the WST's with the WST, else the ViT's.
    heads = (m.wst_heads or m.text.heads) if m.use_wst else m.image.heads
    self.temporal = temporal.TemporalAggregator(
        m.temporal_agg, m.num_frames, m.temporal_layers, heads, m.image.mlp_ratio,
        m.image.dropout, dtype)

  def _wst_stack(self, modalities, dtype):
    """One WST instance serving `modalities`; width and heads 0 take the text tower's."""
    m = self.model
    width = m.wst_width or m.text.width
    return wst.WeightSharingTransformer(
        modalities=modalities, width=width, depth=m.wst_layers, heads=m.wst_heads or m.text.heads,
        mlp_dim=round(width * m.wst_mlp_ratio), modality_embed=m.wst_modality_embed,
        dropout=m.wst_dropout, dtype=dtype)

  def wst_tokens(self, modality, tokens, mask, train=False):
    """The WST of `modality` (the shared one, or its own stack) on its tower's tokens
    `[B, T, D_tower]` with mask `[B, T]` or None -> `[B, T, Dw]`."""
    stack = self.wst if self.model.wst_shared else getattr(self, f"wst_{modality}")
    return stack(tokens, mask, modality, train)

  def encode_image(self, image, mvm_mask=None, train=False):
    """image `[B, H, W, 3]`, mvm_mask `[B, N]` bool or None -> tokens `[B, 1+N, Di]`."""
    return self.image(image, mvm_mask, train)

  def encode_text(self, ids, mask, train=False):
    """ids `[B, L]` int32, mask `[B, L]` (1 = real token) -> hidden `[B, L, Dt]`."""
    return self.text(ids, mask, train)

  def image_global(self, tokens):
    """The tower's global image vector `[B, Di]` from tokens `[B, 1+N, Di]` (`model.pool`)."""
    return pool_image(tokens, self.model.pool)

  def text_global(self, hidden, mask):
    """The tower's global text vector `[B, Dt]` from hidden `[B, L, Dt]`, mask `[B, L]`
    (`model.pool`)."""
    return pool_text(hidden, mask, self.model.pool)

  def image_features(self, image):
    """The image tower's pooled output `[B, Di]` of images `[B, H, W, 3]`, what a fully locked
    tower's cache holds (cots_jax/features.py); without the WST, `image_embedding` is
    `embed_image` of it."""
    return self.image_global(self.encode_image(image))

  def text_features(self, ids, mask):
    """The text tower's pooled output `[B, Dt]` of ids, mask `[B, L]`, what a fully locked
    tower's cache holds; without the WST, `text_embedding` is `embed_text` of it."""
    return self.text_global(self.encode_text(ids, mask), mask)

  def image_head_input(self, tokens, train=False):
    """What the image projection sees, from tower tokens `[B, 1+N, Di]`: the WST output pooled
    by `model.wst_pool` `[B, Dw]` with `model.use_wst`, else `image_global(tokens)`."""
    if not self.model.use_wst:
      return self.image_global(tokens)
    return pool_image(self.wst_tokens("image", tokens, None, train), self.model.wst_pool)

  def text_head_input(self, hidden, mask, train=False):
    """What the text projection sees, from tower states `[B, L, Dt]` and mask `[B, L]`: the WST
    output pooled by `model.wst_pool` `[B, Dw]` with `model.use_wst`, else `text_global`."""
    if not self.model.use_wst:
      return self.text_global(hidden, mask)
    return pool_text(self.wst_tokens("text", hidden, mask, train), mask, self.model.wst_pool)

  def image_embedding(self, image, train=False):
    """image `[B, H, W, 3]` -> (L2-normalised embedding `[B, E]`, tower global vector `[B, Di]`)."""
    tokens = self.encode_image(image, None, train)
    return self.embed_image(self.image_head_input(tokens, train)), self.image_global(tokens)

  def visual_embedding(self, visual, train=False):
    """`image_embedding` of images `[B, H, W, 3]`, `video_embedding` of clips `[B, T, H, W, 3]`."""
    if visual.ndim == 5:
      return self.video_embedding(visual, train)
    return self.image_embedding(visual, train)

  def video_embedding(self, video, train=False, frame_mask=None):
    """video `[B, T, H, W, 3]` (frame_mask `[B, T]`, 1 = real frame, or None) -> (L2-normalised
    embedding `[B, E]`, clip global vector `[B, Di]`: the mean of the frames' tower vectors).

    Every frame goes through the image tower (and the WST) as one `[B*T, H, W, 3]` batch; the
    frames' head inputs are aggregated over time (`model.temporal_agg`), then projected.
    """
    batch, num_frames = video.shape[:2]
    tokens = self.encode_image(video.reshape(batch * num_frames, *video.shape[2:]), None, train)
    frame_heads = self.image_head_input(tokens, train).reshape(batch, num_frames, -1)
    frame_globals = self.image_global(tokens).reshape(batch, num_frames, -1)
    return (self.embed_image(self.temporal(frame_heads, frame_mask, train)),
            temporal.masked_frame_mean(frame_globals, frame_mask))

  def text_embedding(self, ids, mask, train=False):
    """ids, mask `[B, L]` -> (L2-normalised embedding `[B, E]`, tower global vector `[B, Dt]`)."""
    hidden = self.encode_text(ids, mask, train)
    return (self.embed_text(self.text_head_input(hidden, mask, train)),
            self.text_global(hidden, mask))

  def embed_image(self, cls):
    """Image head input `[B, D]` (`image_head_input`) -> L2-normalised float32 embedding
    `[B, E]`."""
    return l2_normalize(self.image_proj(cls))

  def embed_text(self, cls):
    """Text head input `[B, D]` (`text_head_input`) -> L2-normalised float32 embedding `[B, E]`."""
    return l2_normalize(self.text_proj(cls))

  def encoder_embeddings(self, image_global, text_global):
    """COOKIE "cross_model": the towers' global vectors `[B, Di]`, `[B, Dt]` -> their own
    L2-normalised projections `([B, E], [B, E])`, beside the WST-level embeddings."""
    return (l2_normalize(self.image_encoder_proj(image_global)),
            l2_normalize(self.text_encoder_proj(text_global)))

  def mlm_logits(self, hidden_at_masked, image_global):
    """Masked text states `[B, P, Dt]`, image [CLS] `[B, Di]` -> float32 `[B, P, vocab]`."""
    return self.mlm_head(hidden_at_masked, image_global,
                         tied_embedding=self.text.word_embedding_table())

  def mvm_logits(self, hidden_at_masked, text_global):
    """Masked patch states `[B, M, Di]`, text [CLS] `[B, Dt]` -> float32 `[B, M, V]`."""
    return self.mvm_head(hidden_at_masked, text_global)

  def __call__(self, image, text_ids, text_mask, mvm_mask=None, train=False):
    """Runs every submodule once (what `init` uses); all positions go through the heads. A video
    `[B, T, H, W, 3]` in place of `image` also runs the temporal aggregation.

    Returns:
      dict(image_tokens [B,1+N,Di], text_tokens [B,L,Dt], image_embed [B,E],
      text_embed [B,E], mlm_logits [B,L,vocab], mvm_logits [B,N,V]), plus
      image_encoder_embed, text_encoder_embed [B,E] with `encoder_projections`.
    """
    if image.ndim == 5:
      image_embed, image_global = self.video_embedding(image, train)
      image_tokens = self.encode_image(image[:, 0], mvm_mask, train)
    else:
      image_tokens = self.encode_image(image, mvm_mask, train)
      image_global = self.image_global(image_tokens)
      image_embed = self.embed_image(self.image_head_input(image_tokens, train))
    text_tokens = self.encode_text(text_ids, text_mask, train)
    text_global = self.text_global(text_tokens, text_mask)
    outputs = {
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "image_embed": image_embed,
        "text_embed": self.embed_text(self.text_head_input(text_tokens, text_mask, train)),
        "mlm_logits": self.mlm_logits(text_tokens, image_global),
        "mvm_logits": self.mvm_logits(image_tokens[:, 1:], text_global),
    }
    if self.encoder_projections:
      outputs["image_encoder_embed"], outputs["text_encoder_embed"] = self.encoder_embeddings(
          image_global, text_global)
    return outputs
