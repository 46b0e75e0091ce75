"""COTS pre-training.

  configs/pretrain.py            tiny towers, synthetic data: the 2-core CPU default (about 10 minutes)
  configs/pretrain.py:runlocal   the same, shrunk to a smoke test of about a minute
  configs/pretrain.py:model=base ViT-B/16 224 px + BERT-base, queue 65,536, bf16 (accelerators)
Arguments combine with commas (`:runlocal,model=base`); every field is overridable on the command
line (`--config.total_steps=40`).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, model="tiny", data="synthetic")
  if arg.model not in ("tiny", "base"):
    raise ValueError(f"config arg model={arg.model!r} is unknown; use tiny or base")
  if arg.data != "synthetic":
    raise ValueError(f"config arg data={arg.data!r} is unknown; the embedded data is `synthetic`")
  config = common.base_config(arg.model)
  if arg.runlocal:
    common.shrink_for_runlocal(config)
  return config
