"""COOKIE pre-training: a weight-sharing transformer (WST) on top of both towers and three
contrastive terms (method.md §2, §4 items 10, 18, 29).

  configs/cookie_pretrain.py                 tiny towers + 2-layer WST, synthetic data (2-core CPU)
  configs/cookie_pretrain.py:runlocal        the same, shrunk to a smoke test of about a minute
  configs/cookie_pretrain.py:data=flickr8k   tiny towers from scratch on Flickr8k (its data)
  configs/cookie_pretrain.py:model=base      ViT-B/16 + BERT-base + WST 2 x 768 (accelerators)
  configs/cookie_pretrain.py:intra=cross_model
        the intra-modal terms compare the WST-level embedding with its tower's own projection,
        instead of two views of each image and two dropout passes of each caption ("views")
Arguments combine with commas. The ablations are single fields: `--config.model.wst_shared=False`
(one WST stack per modality), `--config.model.use_wst=False` (towers only; then intra=views),
`--config.loss.cookie_vv=0` / `cookie_tt=0` (cross-modal term alone),
`--config.loss.cookie_use_queue`
(the cross-modal term over the momentum queue, `queue.in_batch_negatives` on).

The objective is L = cookie_cm + cookie_vv + cookie_tt (weights 1, method §4.18), InfoNCE at
temperature 0.07, 0.05 for the SimCSE text term; no MLM / MVM / KL, no AMF. No term reads a
momentum encoder, so none is kept (no EMA, no queues) and evals report the online encoder only;
`cookie_use_queue` brings both back.
"""

from configs import common
from configs import pretrain


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, model="tiny", data="synthetic", intra="views")
  if arg.intra not in ("views", "cross_model"):
    raise ValueError(f"config arg intra={arg.intra!r} is unknown; use views or cross_model")
  config = pretrain.get_config(f"model={arg.model},runlocal={arg.runlocal}")
  if arg.data == "flickr8k":
    # The tiny towers from scratch, as measured in docs/results.md (not pretrain.py's MiniLM
    # recipes): ITC-era settings, lr 3e-4, 1,600 steps.
    pretrain.flickr8k_data(config)
    config.optim.lr = 3e-4
    if not arg.runlocal:
      config.total_steps, config.optim.warmup_steps = 1600, 100
      config.eval_every = config.checkpoint_every = 400
  config.model.use_wst = True
  config.loss.update(itc=0.0, mlm=0.0, mvm=0.0, kl_align=0.0, cookie_cm=1.0, cookie_vv=1.0,
                     cookie_tt=1.0, cookie_intra_mode=arg.intra)
  config.amf.enabled = False
  if arg.intra == "views":
    config.input.second_view = True
    # SimCSE's dropout: the two passes of a caption differ only by it.
    config.model.text.dropout = 0.1
  if arg.data == "flickr8k":
    config.input.view_flip_prob = 0.5  # photos: a mirrored view is the same scene
  return config
