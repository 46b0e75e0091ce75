"""The one config tree of cots_jax (design.md §8.4), and the `:arg` parser of the config files.

Every field of every run lives here with its default; `configs/*.py` only change values. The
method.md `use_*` switches are the loss weights (`loss.mlm = 0` turns MLM off and skips it).
Defaults are the tiny CPU model (design §8.5); `configs/pretrain.py:model=base` holds the paper's.
"""

import ml_collections


def parse_arg(arg, **spec):
  """Parses `"runlocal,data=flickr8k,model=base"` into a ConfigDict typed like `spec`.

  Args:
    arg: the string after `:` in `--config=configs/x.py:ARG` (None or "" for none).
    **spec: every accepted key with its default; the default's type parses the value
      (a bool key given without `=value`, like `runlocal`, is True).

  Returns:
    ConfigDict with one field per key of `spec`.

  Raises:
    ValueError naming the key when it is unknown or its value does not parse.
  """
  parsed = ml_collections.ConfigDict(spec)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, has_value, value = item.partition("=")
    if key not in spec:
      raise ValueError(f"config arg {key!r} is unknown; known: {sorted(spec)}")
    default = spec[key]
    if isinstance(default, bool):
      if has_value and value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {key!r} takes true/false, got {value!r}")
      parsed[key] = (not has_value) or value.lower() in ("true", "1")
    elif not has_value:
      raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
    else:
      try:
        parsed[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(f"config arg {key!r}: cannot parse {value!r} as "
                         f"{type(default).__name__}") from e
  return parsed


def model_config(size="tiny"):
  """Tower sizes. `tiny`: the 2-core CPU default; `base`: ViT-B/16 224 px + BERT-base
  (method §1.2)."""
  m = ml_collections.ConfigDict()
  m.embed_dim = 128 if size == "tiny" else 256
  # Compute dtype of activations; parameters always stay float32.
  m.dtype = "float32" if size == "tiny" else "bfloat16"
  # How the other modality's global vector enters the MLM / MVM heads: concat | add | none.
  m.mvlm_fusion = "concat"
  # Source of that global vector: online ([CLS] of the clean pass) or momentum ([CLS] of the EMA
  # pass).
  m.mvlm_global_src = "online"
  m.mvlm_global_stopgrad = False
  # Global vector of each tower (embeddings and MVLM conditioning): "cls" ([CLS] state, method
  # §1.2, the paper-scale default) or "mean" (mean of the patch / real-token states). Towers
  # trained from scratch start with a near-constant [CLS] state, and the CPU default's ITC did not
  # leave chance in 200 steps with it; with "mean" it did
  # (docs/development.md#deviations-from-the-paper).
  m.pool = "mean" if size == "tiny" else "cls"
  m.remat = False  # rematerialise the tower blocks in the backward pass (memory for FLOPs)
  # COOKIE's weight-sharing transformer between the towers and the projections (method §2.2,
  # models/wst.py): `wst_layers` pre-LN layers applied to each modality's tokens; shared = one
  # parameter set for both (False: one stack per modality, the ablation that isolates sharing).
  m.use_wst = False
  m.wst_layers = 2
  m.wst_shared = True
  m.wst_modality_embed = True
  m.wst_pool = "mean" if size == "tiny" else "cls"  # cls | mean (masked), as `pool`
  m.wst_width = 0  # 0 = the text tower's width; a tower of another width is projected to it
  m.wst_heads = 0  # 0 = the text tower's heads
  m.wst_mlp_ratio = 4.0
  m.wst_dropout = 0.0
  # Video (method §4 items 9, 28): frames per clip, and how their vectors become one:
  # "mean" or "transformer" (the mean plus what `temporal_layers` pre-LN layers over learned frame
  # positions read from the frames' deviations from it; models/temporal.py).
  m.num_frames = 4
  m.temporal_agg = "mean"
  m.temporal_layers = 2

  m.image = ml_collections.ConfigDict()
  m.image.image_size = 48 if size == "tiny" else 224
  m.image.patch_size = 8 if size == "tiny" else 16
  m.image.width = 192 if size == "tiny" else 768
  m.image.depth = 3 if size == "tiny" else 12
  m.image.heads = 3 if size == "tiny" else 12
  m.image.mlp_ratio = 4.0
  m.image.dropout = 0.0
  m.image.layer_norm_eps = 1e-6
  m.image.gelu = "exact"  # exact (erf) | tanh
  # Patch positions: "learn" (small-initialised, as hub checkpoints) | "sincos2d" (fixed).
  m.image.posemb = "learn"
  # Patch embedding: "patch" (one patch_size x patch_size convolution, ViT) | "conv" (3 x 3
  # stride-2 convolutions + LayerNorm + GELU, then a 1 x 1 projection: Xiao et al. 2021's early
  # convolutions; patch_size a power of 2, no hub checkpoint).
  m.image.stem = "patch"
  # Fraction of patch tokens dropped at random from each training image (FLIP, Li et al. 2023):
  # the encoder runs on the rest, so a step costs about that fraction less; eval sees them all.
  m.image.token_drop = 0.0
  # The last this many steps run without token drop (FLIP's unmasked tuning): the ViT ends on
  # whole images, as evals show them. Each costs about 1 / (1 - token_drop) of a masked step.
  m.image.unmasked_tuning_steps = 0
  # A local ViT checkpoint (cots_jax/pretrained.py): a Hugging Face ViTModel directory, a timm
  # ViT .safetensors, or a big_vision / AugReg .npz; its sizes replace the ones above (the image
  # size stays, position embeddings are interpolated to it) and its weights the tower's.
  m.image.init = ""
  # "none" | "all" | "N": freeze the tower, or all but its top N blocks (and final norm), as
  # open_clip's --lock-image (cots_jax/locking.py; named `locked` because ConfigDict.lock is a
  # method that hides a field of that name from the command line). Projection heads always
  # train. A frozen tower gets no gradient, no optimizer moments and no momentum copy; fully
  # frozen without WST or a term that reads its tokens, its outputs are computed once and cached
  # (feature_cache_dir).
  m.image.locked = "none"
  m.image.lock_random_ok = False  # allow locking a tower that neither init nor init_from gave

  m.text = ml_collections.ConfigDict()
  m.text.vocab_size = 30522
  m.text.width = 192 if size == "tiny" else 768
  m.text.depth = 3 if size == "tiny" else 12
  m.text.heads = 3 if size == "tiny" else 12
  m.text.mlp_ratio = 4.0
  m.text.max_positions = 64 if size == "tiny" else 512
  m.text.type_vocab_size = 2
  m.text.dropout = 0.0
  m.text.layer_norm_eps = 1e-12
  m.text.gelu = "exact"  # exact (erf) | tanh
  # A local Hugging Face BERT directory (config.json + model.safetensors; cots_jax/pretrained.py):
  # its sizes replace the ones above, its weights the tower's, its tokenizer the shipped one.
  m.text.init = ""
  # As model.image.locked (open_clip's --lock-text and --lock-text-unlocked-layers).
  m.text.locked = "none"
  m.text.lock_random_ok = False
  return m


def vq_config(size="tiny"):
  """The VQ tokenizer whose codes are the MVM targets (design §8.1: one code per ViT patch)."""
  v = ml_collections.ConfigDict()
  v.init = ""  # workdir or directory of a trained tokenizer; "" = train one first (`steps`).
  v.steps = 200 if size == "tiny" else 20_000
  v.codebook_size = 256 if size == "tiny" else 8192
  v.code_dim = 32
  v.hidden = 128 if size == "tiny" else 256
  v.commitment = 0.25
  # "ema": codebook follows the encoder outputs by EMA; "st": straight-through + codebook loss.
  v.codebook_update = "ema"
  v.ema_decay = 0.99
  # A code used fewer than this many times (EMA count) is re-seeded from a random encoder output.
  v.dead_code_threshold = 1.0
  v.batch_size = 64 if size == "tiny" else 256
  v.lr = 2e-3 if size == "tiny" else 5e-4
  v.log_every = 100
  return v


def base_config(size="tiny"):
  """The full tree with defaults for `size` in {tiny, base}."""
  c = ml_collections.ConfigDict()
  c.trainer = "cots"  # cots | vq (configs/vq_tokenizer.py)
  c.seed = 0
  # The CPU default is sized to finish within 15 minutes on 2 cores (about 30 pairs/s, 2 s/step;
  # one eval of the 500 x 5 split by both encoders takes ~15 s, so it runs only at the end).
  c.total_steps = 350 if size == "tiny" else 200_000
  c.log_every = 50 if size == "tiny" else 100
  c.eval_every = 0 if size == "tiny" else 5000  # 0 = only at the end.
  c.checkpoint_every = 200 if size == "tiny" else 5000  # 0 = only the final state.
  c.keep_checkpoints = 3
  # Fine-tuning: a run's workdir whose latest checkpoint gives the towers and heads (params);
  # optimizer, queues, AMF statistics and step start fresh. "" = off. A workdir that already has
  # checkpoints resumes from them instead.
  c.init_from = ""
  # True: params_ema comes from init_from's momentum towers (a leaf it locked, from its params);
  # False: it starts as a copy of params.
  c.init_from_ema = False
  # True (configs/finetune_retrieval.py): refuse to start without init_from.
  c.require_init_from = False
  # Where the pooled outputs of a fully locked tower are cached (cots_jax/feature_cache.py);
  # "" = WORKDIR/feature_cache. Files are keyed by a fingerprint of the weights, the
  # preprocessing and the examples, so runs can share a directory.
  c.feature_cache_dir = ""

  c.model = model_config(size)
  c.vq = vq_config(size)

  # One weight per objective (method §1.3.5, §4.17); 0 skips the term's computation.
  # `base` keeps the method's lambda_mvlm = lambda_kl = 1. The tiny towers start from scratch,
  # where MLM / MVM at weight 1 win over ITC (the text tower collapses to one embedding and
  # retrieval stays at chance); at 0.1 all terms learn
  # (docs/development.md#deviations-from-the-paper).
  aux_weight = 0.1 if size == "tiny" else 1.0
  c.loss = ml_collections.ConfigDict()
  c.loss.itc = 1.0
  c.loss.mlm = aux_weight
  c.loss.mvm = aux_weight
  c.loss.kl_align = aux_weight
  # ALBEF momentum distillation of the ITC targets (method §4.12); 0 = hard targets (COTS default).
  c.loss.itc_alpha = 0.0
  # COOKIE's three contrastive terms (method §2.3, §4.18; configs/cookie_pretrain.py): cross-modal
  # InfoNCE of the online embeddings in the batch (with `cookie_use_queue`: the queued momentum
  # logits of `itc` instead), and the image-image (vv) / text-text (tt) terms of
  # `cookie_intra_mode`: "views" (two augmented views of each image, input.second_view; each
  # caption twice with different dropout, at temperature `cookie_text_temp`) or "cross_model"
  # (the WST-level embedding against its tower's own projection, per modality).
  c.loss.cookie_cm = 0.0
  c.loss.cookie_vv = 0.0
  c.loss.cookie_tt = 0.0
  c.loss.cookie_intra_mode = "views"
  c.loss.cookie_text_temp = 0.05
  c.loss.cookie_use_queue = False

  c.queue = ml_collections.ConfigDict()
  c.queue.size = 4096 if size == "tiny" else 65_536
  # False: BriVL's N x (1+K) logits, positive at index 0 (method §1.3.1, the paper-scale default).
  # True (ALBEF): the batch's momentum keys are negatives too. The CPU default needs them: with
  # queue-only negatives its ITC did not learn at all in 200 steps (retrieval at chance), because
  # fresh positives are told apart from stale queued keys by age, not content
  # (docs/development.md#deviations-from-the-paper).
  c.queue.in_batch_negatives = size == "tiny"
  c.queue.multi_positive = False  # fine-tuning: every entry with the same image_id is a positive.

  c.momentum = ml_collections.ConfigDict()
  c.momentum.decay = 0.99
  c.momentum.schedule = "constant"  # constant | cosine (decay -> final_decay over total_steps)
  c.momentum.final_decay = 1.0

  c.amf = ml_collections.ConfigDict()
  c.amf.enabled = True
  c.amf.lambda_ = 2.0  # threshold = mu - lambda_ * sigma of the momentum pair similarity
  c.amf.beta = 0.99
  c.amf.warmup_steps = 0.1  # < 1: fraction of total_steps (design §8.2); >= 1: steps.
  c.amf.enqueue_filtered = True  # False: filtered pairs enter the queue marked invalid.

  c.kl = ml_collections.ConfigDict()
  c.kl.direction = "sym"  # sym | i2t_to_t2i (KL(p||q)) | t2i_to_i2t (KL(q||p))
  c.kl.stopgrad_target = False

  c.temp = ml_collections.ConfigDict()
  c.temp.init = 0.07
  c.temp.learnable = False
  c.temp.min = 0.001
  c.temp.max = 0.5

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3 if size == "tiny" else 1e-4
  c.optim.end_lr = 1e-5 if size == "tiny" else 1e-6
  c.optim.warmup_steps = 40 if size == "tiny" else 1000
  c.optim.weight_decay = 0.02
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip = 1.0  # global norm; 0 = off.
  # Learning-rate multipliers of each tower's trainable parameters (ALBEF-style lower lr for a
  # pre-trained tower); heads and the rest train at optim.lr.
  c.optim.lr_mult_image = 1.0
  c.optim.lr_mult_text = 1.0

  c.input = ml_collections.ConfigDict()
  c.input.batch_size = 64 if size == "tiny" else 512  # global batch (pairs per step).
  c.input.max_len = 36 if size == "tiny" else 30  # synthetic captions: at most 36 tokens
  c.input.tokenizer = ""  # local tokenizer dir; "" = the shipped bert-base-uncased vocab.
  c.input.mlm_prob = 0.15
  c.input.mvm_prob = 0.4
  c.input.mvm_mask = "block"  # block (BEiT) | random
  c.input.mvm_min_block = 4 if size == "tiny" else 16
  # Training images: "crop_flip" (random-resized crop + horizontal flip, for photos) or "none"
  # (resize + centre crop, as at eval; the synthetic captions name positions and sides).
  c.input.augment = "none"
  c.input.crop_scale = (0.5, 1.0)  # area fraction of the random-resized crop
  c.input.flip_prob = 0.5
  # A second, independently augmented view of each training image (batch key `image_view`), for
  # COOKIE's image-image term in "views" mode; crop area fraction and flip probability of that
  # view, also used for the two views of the image instance-retrieval eval. No flip by default:
  # the synthetic captions name sides.
  c.input.second_view = False
  c.input.view_crop_scale = (0.6, 1.0)
  c.input.view_flip_prob = 0.0
  # An unreadable image or an empty caption: "skip" (count it in data/skipped) or "fail".
  c.input.on_bad_example = "skip"
  # Batches of whole source groups (synthetic_video: the 4 clips that differ only in direction,
  # one caption each), so each clip meets its twins as in-batch negatives.
  c.input.group_batches = False
  # K > 1: an example is a training image with K of its captions (every image once an epoch),
  # all positives of it in the in-batch InfoNCE (loss.cookie_cm): K times the text supervision
  # per image forward. Only for the in-batch terms (no queue, MLM or text-text term).
  c.input.captions_per_image = 1
  # Noise study (issue 24): the caption of this fraction of the training pairs is replaced by a
  # caption of another image (drawn with `seed`, training split only; the replaced pairs are
  # listed in WORKDIR/caption_noise.json and flagged in the batch as `caption_replaced`, from
  # which the step logs how many of them AMF keeps). One caption per example only.
  c.input.caption_noise = 0.0
  c.input.num_workers = 0  # grain worker processes; 0 = decode in the main process.
  # Decode every training image once, before training, and keep it in memory as uint8 downscaled
  # to the shorter side from which the crops are still only downscaled (1.63 x image_size at
  # crop_scale (0.5, 1)); an epoch then crops and flips from memory instead of decoding each file
  # again. For image sets that fit in memory: a square photo takes 3 x (1.63 x image_size)^2
  # bytes, at most its decoded size, so the 6,000 224 px Flickr8k train images take 107 MB at
  # image_size 48, 861 MB at 224; each grain worker process holds a copy. Not for video.
  c.input.cache_decoded = False
  c.input.prefetch = 2  # batches read ahead by threads; 0 = synchronous
  c.input.data = ml_collections.ConfigDict()
  # synthetic | captions_json | tfds | array_record | webdataset; video: synthetic_video |
  # msrvtt | frames_folder
  c.input.data.name = "synthetic"
  c.input.data.num_train_images = 20_000  # synthetic only
  c.input.data.num_eval_images = 500  # synthetic only
  # synthetic_video: frames rendered per clip (model.num_frames are sampled); 0 = model.num_frames,
  # which keeps a clip and its opposite-direction twin exact reversals at the model's input.
  c.input.data.clip_frames = 0
  # msrvtt / frames_folder: MSRVTT_data.json in `annotations`, the video files (or one folder of
  # frames per video) in `videos_dir`; `test_list` = the 1k-A csv ("" = MSR-VTT's own splits).
  c.input.data.videos_dir = ""
  c.input.data.test_list = ""
  c.input.data.video_extension = ".mp4"
  # captions_json: Karpathy-style json + image folder (Flickr8k / Flickr30k / COCO).
  c.input.data.annotations = ""
  c.input.data.images_dir = ""
  c.input.data.train_splits = ("train",)  # add "restval" for Karpathy's COCO train set
  c.input.data.eval_split = "test"
  # tfds: an image-caption dataset laid out like coco_captions, read by tfds.data_source.
  c.input.data.tfds_name = ""
  c.input.data.tfds_data_dir = ""
  c.input.data.tfds_train_split = "train"
  c.input.data.tfds_eval_split = "test"
  c.input.data.image_key = "image"
  c.input.data.captions_key = "captions"
  c.input.data.caption_text_key = ""  # coco_captions: "text" (captions are dicts)
  # array_record (shards written by `python -m cots_jax.data.convert`) and webdataset
  # (img2dataset tars), docs/data.md: local or gs://, comma-separated paths, globs or brace
  # patterns (train-{00000..00099}.array_record).
  c.input.data.paths = ""  # the training split's shards
  c.input.data.eval_paths = ""  # the eval split's shards (image ids apart from the training ones)
  c.input.data.shuffle_buffer = 10_000  # webdataset: examples shuffled together, per process
  c.input.data.json_caption_key = "caption"  # webdataset: the caption's field of a key's .json

  # Devices as ((axis, size), ...), one size -1 = the rest. FSDP: (("data", -1), ("fsdp", 8)).
  c.mesh = (("data", -1),)
  # ((regex, spec), ...) searched in "/"-joined state paths ("params/image/...", "opt/...",
  # "queue/img"); the first match wins, unmatched leaves are replicated. spec: a tuple of mesh
  # axes / None per dim, or "fsdp" = split the largest dim divisible by the mesh's "fsdp" axis
  # (replicated when the mesh has none, or below fsdp_min_size elements). Queues are replicated;
  # ("^queue/(img|txt|idx|valid)", ("data",)) shards them along K instead.
  c.sharding_rules = (("^queue/", ()), (".*", "fsdp"))
  c.fsdp_min_size = 2**14

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 250
  c.eval.chunk = 4096  # similarity rows per chunk (design §4.1)
  c.eval.ks = (1, 5, 10)
  # ((name, {option: value}), ...) of cots_jax/evaluators/common.py's EVALUATORS, each run with the
  # online and the momentum encoder; options (ks, chunk) override the two fields above.
  # retrieval: image <-> text (video <-> text); image_instance / text_matching: COOKIE's unimodal
  # tasks (method §2.1); direction: synthetic clips against their direction twins; zeroshot:
  # synthetic single-object images classified by shape and by colour from text prompts (synthetic
  # data only; its ks are the k of its top-k accuracies, default (1, 5)).
  c.eval.evaluators = (("retrieval", {}), ("image_instance", {}), ("text_matching", {}))
  return c


def shrink_for_runlocal(config):
  """Shrinks a config in place to a smoke test of about a minute on a laptop CPU."""
  for tower in (config.model.image, config.model.text):
    tower.width, tower.depth, tower.heads = 64, 2, 2
  config.model.embed_dim = 64
  config.total_steps = 120
  config.log_every = 20
  config.eval_every = 0
  config.checkpoint_every = 0
  config.vq.steps = 100
  config.vq.codebook_size = 64
  config.vq.log_every = 50
  config.queue.size = 1024
  config.input.batch_size = 32
  config.input.data.num_train_images = 2000
  config.input.data.num_eval_images = 100
  config.optim.warmup_steps = 20
