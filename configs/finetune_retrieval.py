"""Retrieval fine-tuning of a pre-trained run (ALBEF-style ITC, every caption of an image a
positive).

  configs/finetune_retrieval.py --config.init_from=RUN
        tiny towers on the synthetic data, from the pre-training workdir RUN
  configs/finetune_retrieval.py:data=flickr8k --config.init_from=RUN
        Flickr8k train split, eval on the 1K test split ($COTS_DATA_DIR/flickr8k, as pretrain.py)
  configs/finetune_retrieval.py:model=base   ViT-B/16 + BERT-base (accelerators)
  :runlocal shrinks any of them to a smoke test.

`init_from` is required: the towers and heads (params; the momentum towers start as their copy,
or as RUN's momentum towers with --config.init_from_ema) come from RUN's latest checkpoint; the
optimizer, queues, AMF statistics and step start fresh. The objective is ITC with queues in which
every entry of the same image (`image_id`, in the batch and in the queue) is a positive
(losses.itc_targets); KL alignment is off (`--config.loss.kl_align=0.1` turns it on) and so are
MVLM (no VQ tokenizer is trained) and the AMF (method.md §1.3.4: pre-training only).
"""

from configs import common
from configs import pretrain


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, model="tiny", data="synthetic")
  config = pretrain.get_config(f"model={arg.model}")
  if arg.data == "flickr8k":
    # The data and the towers of the Flickr8k pre-training presets, not their recipe: nothing is
    # locked or cached here, the whole model fine-tunes.
    pretrain.flickr8k_data(config)
    if arg.model == "tiny":
      pretrain.flickr8k_towers(config)
  config.require_init_from = True
  config.queue.multi_positive = True
  # Same-image pairs are positives, so in-batch keys join the negatives also at paper scale.
  config.queue.in_batch_negatives = True
  config.loss.update(itc=1.0, mlm=0.0, mvm=0.0, kl_align=0.0)
  config.amf.enabled = False
  if arg.model == "base":
    config.total_steps, config.optim.warmup_steps = 10_000, 500
    config.optim.lr, config.optim.end_lr = 1e-5, 1e-7
    config.eval_every = config.checkpoint_every = 1000
  else:
    # The tiny towers come from short pre-training runs (pretrain.py: lr 1e-3), far from
    # converged: 1e-4 still moves them, for a quarter to a half of their steps.
    config.optim.lr, config.optim.end_lr = 1e-4, 1e-6
    config.total_steps = 800 if arg.data == "flickr8k" else 150
    config.optim.warmup_steps = 50 if arg.data == "flickr8k" else 15
    config.eval_every = config.checkpoint_every = 400 if arg.data == "flickr8k" else 0
  if arg.runlocal:
    common.shrink_for_runlocal(config)
    config.total_steps, config.optim.warmup_steps = 40, 5
  return config
