"""Experiment grids of `python -m cots_jax.experiments` (cots_jax/experiments.py), as plain data.

  ablation  configs/pretrain.py:data=flickr8k,recipe=cots (ITC + MLM + MVM + KL at 0.1, AMF on):
            the objective built up term by term (itc, itc_mlm_mvm, itc_mlm_mvm_kl, cots = the
            full objective), then the KL term one-way (kl_one_way) and with a stop-gradient on its
            target (kl_stopgrad). One VQ tokenizer for all runs.
  cookie    configs/cookie_pretrain.py:data=flickr8k: the cross-modal term alone without (cm) and
            with the weight-sharing transformer (cm_wst), then with the intra-modal terms on two
            views (cm_wst_views, the config's default) or against the tower's own projection
            (cm_wst_cross_model).
  noise     the base of `ablation` with 0 / 20 / 40 % of the training captions replaced by
            another image's (input.caption_noise), each with AMF on and off: how much noise AMF
            catches and what it buys. One VQ tokenizer for all runs.
  smoke     configs/pretrain.py:runlocal shrunk to compile in seconds (synthetic data, a handful
            of steps, eval at the end), ITC alone and the full objective with a quarter of the
            captions replaced: the tests' grid.

A grid is a dict:
  base:      the config file and its arg, `configs/x.py[:arg]`.
  schedule:  {dotted config field: value} given to every run of the grid (and to the VQ run).
  shared_vq: optional; True trains one VQ tokenizer in WORKDIR/_vq first and hands it to every run
             (`config.vq.init`), so the variants differ by their own overrides only.
  variants:  ordered {name: {"overrides": {dotted field: value}, optional "arg": a config arg
             joined with commas onto the base's, e.g. "intra=cross_model"}}.
Values are Python literals; each becomes `--config.<field>=<value>` on the run's command line.
"""

# The Flickr8k grids' schedule, equal for every variant (design §8.14): 240 steps of batch 64
# (half an epoch of the 30,000 pairs), about 14 min a COTS run on 2 cores with its start and two
# evals, so that the 48 runs of the three grids at 3 seeds fit in about 12 CPU-hours; a
# checkpoint every 60 steps, so a grid stopped mid-run loses little.
FLICKR8K_SCHEDULE = {"total_steps": 240, "optim.warmup_steps": 24, "eval_every": 120,
                     "checkpoint_every": 60}
COTS_FLICKR8K = "configs/pretrain.py:data=flickr8k,recipe=cots"
NO_AUX = {"loss.mlm": 0.0, "loss.mvm": 0.0, "loss.kl_align": 0.0}  # ITC alone
# COOKIE's cross-modal term alone: no intra-modal terms, so no second view nor SimCSE dropout.
COOKIE_CM_ONLY = {"loss.cookie_vv": 0.0, "loss.cookie_tt": 0.0, "input.second_view": False,
                  "model.text.dropout": 0.0}

GRIDS = {
    "ablation": {
        "base": COTS_FLICKR8K,
        "schedule": FLICKR8K_SCHEDULE,
        "shared_vq": True,
        "variants": {
            "itc": {"overrides": {**NO_AUX, "amf.enabled": False}},
            "itc_mlm_mvm": {"overrides": {"loss.kl_align": 0.0, "amf.enabled": False}},
            "itc_mlm_mvm_kl": {"overrides": {"amf.enabled": False}},
            "cots": {"overrides": {}},
            "kl_one_way": {"overrides": {"kl.direction": "i2t_to_t2i"}},
            "kl_stopgrad": {"overrides": {"kl.stopgrad_target": True}},
        },
    },
    "cookie": {
        "base": "configs/cookie_pretrain.py:data=flickr8k",
        "schedule": FLICKR8K_SCHEDULE,
        "variants": {
            "cm": {"overrides": {"model.use_wst": False, **COOKIE_CM_ONLY}},
            "cm_wst": {"overrides": COOKIE_CM_ONLY},
            "cm_wst_views": {"overrides": {}},
            "cm_wst_cross_model": {"overrides": {}, "arg": "intra=cross_model"},
        },
    },
    "noise": {
        "base": COTS_FLICKR8K,
        "schedule": FLICKR8K_SCHEDULE,
        "shared_vq": True,
        "variants": {
            "p0_amf": {"overrides": {"input.caption_noise": 0.0, "amf.enabled": True}},
            "p0_noamf": {"overrides": {"input.caption_noise": 0.0, "amf.enabled": False}},
            "p20_amf": {"overrides": {"input.caption_noise": 0.2, "amf.enabled": True}},
            "p20_noamf": {"overrides": {"input.caption_noise": 0.2, "amf.enabled": False}},
            "p40_amf": {"overrides": {"input.caption_noise": 0.4, "amf.enabled": True}},
            "p40_noamf": {"overrides": {"input.caption_noise": 0.4, "amf.enabled": False}},
        },
    },
    "smoke": {
        "base": "configs/pretrain.py:runlocal",
        # tests/support.py's TINY, 4 steps, 10 VQ steps, one eval at the end.
        "schedule": {
            "model.embed_dim": 16, "model.image.image_size": 24, "model.image.patch_size": 8,
            "model.image.width": 32, "model.image.depth": 1, "model.text.width": 32,
            "model.text.depth": 1, "vq.codebook_size": 16, "vq.hidden": 16, "vq.steps": 10,
            "input.batch_size": 8, "queue.size": 32, "input.mvm_min_block": 2,
            "input.data.num_train_images": 40, "input.data.num_eval_images": 20,
            "total_steps": 4, "optim.warmup_steps": 1, "log_every": 2, "eval_every": 0,
            "checkpoint_every": 0,
        },
        "shared_vq": True,
        "variants": {
            "itc": {"overrides": NO_AUX},
            # The full objective on captions of which a quarter are another image's: the
            # noise path (caption_noise.json, the step's AMF catch metrics, the report's table).
            "full_noise": {"overrides": {"input.caption_noise": 0.25}},
        },
    },
}
