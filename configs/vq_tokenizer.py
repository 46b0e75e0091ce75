"""Trains the VQ tokenizer whose codes are the MVM targets, on the images of the configured data.

  python -m cots_jax.main --config=configs/vq_tokenizer.py --workdir=runs/vq
  python -m cots_jax.main --config=configs/pretrain.py --config.vq.init=runs/vq --workdir=runs/cots

Takes the same arguments as configs/pretrain.py (the tokenizer must match the model's image size
and patch size); `config.vq.steps` sets the length of the run.
"""

from configs import pretrain


def get_config(arg=None):
  config = pretrain.get_config(arg)
  config.trainer = "vq"
  return config
