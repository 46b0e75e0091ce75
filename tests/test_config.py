"""Config files, `:arg` parsing and validation (design §4.4, §8.4, §8.5)."""

import importlib

from flax import traverse_util
import jax
import jax.numpy as jnp
import pytest

from configs import common
from configs import pretrain
from configs import vq_tokenizer
from cots_jax import config_validation
from cots_jax import objectives
from cots_jax.models import cots as cots_model


def test_parse_arg_types_flags_and_errors():
  arg = common.parse_arg("runlocal,model=base,steps=7", runlocal=False, model="tiny", steps=1)
  assert (arg.runlocal, arg.model, arg.steps) == (True, "base", 7)
  assert common.parse_arg(None, runlocal=False).runlocal is False
  assert common.parse_arg("runlocal=false", runlocal=True).runlocal is False
  with pytest.raises(ValueError, match="'nope' is unknown"):
    common.parse_arg("nope", runlocal=False)
  with pytest.raises(ValueError, match="'steps': cannot parse 'x' as int"):
    common.parse_arg("steps=x", steps=1)
  with pytest.raises(ValueError, match="'model' needs a value"):
    common.parse_arg("model", model="tiny")


@pytest.mark.parametrize("arg", [None, "runlocal", "model=base", "runlocal,model=base"])
def test_config_variants_validate(arg):
  config_validation.validate(pretrain.get_config(arg))


def test_defaults_tiny_runlocal_and_base():
  tiny, local, base = (pretrain.get_config(a) for a in (None, "runlocal", "model=base"))
  assert tiny.model.image.width <= 256 and tiny.model.dtype == "float32"
  assert local.total_steps < tiny.total_steps and local.input.data.num_eval_images == 100
  assert tiny.input.data.num_eval_images == 500
  assert (base.model.image.image_size, base.model.image.patch_size, base.model.image.width,
          base.model.image.depth) == (224, 16, 768, 12)
  assert (base.model.text.width, base.model.text.depth, base.model.text.vocab_size) == (
      768, 12, 30522)
  assert base.queue.size == 65_536 and base.model.dtype == "bfloat16"
  assert vq_tokenizer.get_config().trainer == "vq"
  with pytest.raises(ValueError, match="model='huge'"):
    pretrain.get_config("model=huge")


def test_base_model_has_vit_b16_and_bert_base_sizes():
  config = pretrain.get_config("model=base")
  model = cots_model.CotsModel.from_config(config)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                          jnp.zeros((1, 30), jnp.int32), jnp.ones((1, 30), jnp.int32))
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert 85e6 < count(shapes["params"]["image"]) < 87e6
  assert 108e6 < count(shapes["params"]["text"]) < 110e6


@pytest.mark.parametrize("field, value, message", [
    ("queue.size", 1000, r"config.queue.size=1000 must be a positive multiple of "
                         r"config.input.batch_size=64"),
    ("model.dtype", "float16", r"config.model.dtype='float16' must be one of"),
    ("kl.direction", "up", r"config.kl.direction='up'"),
    ("model.image.image_size", 50, r"config.model.image.image_size=50 must be a multiple"),
    ("model.text.heads", 5, r"config.model.text.width=192 must be divisible"),
    ("input.max_len", 100, r"config.input.max_len=100 exceeds"),
    ("total_steps", 0, r"config.total_steps=0 must be a positive integer"),
    ("loss.mlm", -1.0, r"config.loss.mlm=-1.0 must be a finite number >= 0"),
    ("momentum.decay", 1.5, r"config.momentum.decay=1.5 must lie in \[0, 1\]"),
    ("temp.init", 0.9, r"config.temp.init=0.9 must lie in"),
    ("optim.warmup_steps", 5000, r"config.optim.warmup_steps=5000 must be smaller"),
    ("input.on_bad_example", "error", r"config.input.on_bad_example='error' must be one of"),
    ("input.augment", "flip", r"config.input.augment='flip' must be one of"),
    ("model.image.posemb", "rope", r"config.model.image.posemb='rope' must be one of"),
    ("model.image.stem", "resnet", r"config.model.image.stem='resnet' must be one of"),
    ("model.image.token_drop", 1.0, r"config.model.image.token_drop=1.0 must lie in \[0, 1\)"),
    ("model.image.token_drop", 0.5, r"token_drop=0.5 must be 0 with loss.mvm > 0: MVM predicts"),
    ("model.image.unmasked_tuning_steps", 350,
     r"config.model.image.unmasked_tuning_steps=350 must lie in \[0, config.total_steps=350\)"),
    ("model.image.unmasked_tuning_steps", 10, r"unmasked_tuning_steps=10 needs "
                                              r"config.model.image.token_drop > 0"),
    ("input.crop_scale", (0.0, 1.0), r"config.input.crop_scale=\(0.0, 1.0\) must be"),
    ("input.caption_noise", 1.0, r"config.input.caption_noise=1.0 must be in \[0, 1\)"),
    ("input.data.name", "captions_json",
     r"config.input.data.annotations='' must be set for input.data.name='captions_json'"),
    ("mesh", [("data", -1), ("data", 2)], r"config.mesh=.* must be \[\(axis, size\)"),
    ("mesh", [("data", 0)], r"config.mesh=.* with distinct axes and sizes >= 1"),
    ("sharding_rules", [("params/(", "fsdp")], r"config.sharding_rules=.* invalid regex"),
    ("sharding_rules", [(".*", ("model", None))],
     r"config.sharding_rules=.* spec must be 'fsdp' or a tuple of mesh axes \['data'\]"),
    ("sharding_rules", [(".*", "data")], r"config.sharding_rules=.* spec must be 'fsdp'"),
    ("fsdp_min_size", 0, r"config.fsdp_min_size=0 must be a positive integer"),
])
def test_invalid_values_fail_with_one_line_naming_the_field(field, value, message):
  config = pretrain.get_config()
  *groups, last = field.split(".")
  node = config
  for group in groups:
    node = node[group]
  node[last] = value
  with pytest.raises(ValueError, match=message) as error:
    config_validation.validate(config)
  assert "\n" not in str(error.value)


def test_sincos2d_positions_need_a_width_of_fours_and_no_hub_weights():
  config = pretrain.get_config()
  config.model.image.posemb = "sincos2d"
  config_validation.validate(config)
  config.model.image.update(width=198, heads=3)
  with pytest.raises(ValueError, match="image.width=198 must be divisible by 4 for posemb"):
    config_validation.validate(config)
  config.model.image.update(width=192, init="vit-b16.npz")
  with pytest.raises(ValueError, match="posemb='sincos2d' must be 'learn' with model.image.init"):
    config_validation.validate(config)


def test_conv_stem_needs_a_power_of_two_patch_and_no_hub_weights():
  config = pretrain.get_config()
  config.model.image.stem = "conv"
  config_validation.validate(config)
  config.model.image.update(image_size=48, patch_size=6)
  with pytest.raises(ValueError, match="patch_size=6 must be a power of 2"):
    config_validation.validate(config)
  config.model.image.update(patch_size=8, init="vit-b16.npz")
  with pytest.raises(ValueError, match="stem='conv' must be 'patch' with model.image.init"):
    config_validation.validate(config)


def test_all_loss_weights_zero_is_refused():
  config = pretrain.get_config()
  config.loss.update(itc=0.0, mlm=0.0, mvm=0.0, kl_align=0.0)
  with pytest.raises(ValueError, match="config.loss="):
    config_validation.validate(config)


def test_amf_warmup_fraction_or_steps():
  config = pretrain.get_config()
  assert config_validation.amf_warmup_steps(config) == round(0.1 * config.total_steps)
  config.amf.warmup_steps = 30
  assert config_validation.amf_warmup_steps(config) == 30


@pytest.mark.parametrize("module", ["pretrain", "finetune_retrieval", "cookie_pretrain",
                                    "video_retrieval", "vq_tokenizer"])
def test_every_field_of_every_config_can_be_overridden_on_the_command_line(module):
  """ml_collections refuses `--config.<field>=...` for a list field: the tree holds none."""
  config = importlib.import_module(f"configs.{module}").get_config()
  lists = [name for name, value in traverse_util.flatten_dict(config.to_dict(), sep=".").items()
           if isinstance(value, list)]
  assert not lists


# What each shipped config's docstring says its objective is: loss weights > 0, AMF, whether a
# momentum encoder is kept, locked towers, image token drop and its unmasked tail (an independent
# table: a changed switch fails here).
SHIPPED_OBJECTIVES = {
    ("pretrain", None): dict(terms={"itc", "mlm", "mvm", "kl_align"}, amf=True, momentum=True,
                             text_locked="none"),
    ("pretrain", "model=base"): dict(terms={"itc", "mlm", "mvm", "kl_align"}, amf=True,
                                     momentum=True, text_locked="none"),
    ("pretrain", "data=flickr8k"): dict(terms={"cookie_cm"}, amf=False, momentum=False,
                                        text_locked="all", token_drop=0.75,
                                        unmasked_tuning_steps=150),
    ("pretrain", "data=flickr8k,recipe=cots"): dict(terms={"itc", "mlm", "mvm", "kl_align"},
                                                    amf=True, momentum=True, text_locked="none"),
    ("finetune_retrieval", None): dict(terms={"itc"}, amf=False, momentum=True,
                                       text_locked="none"),
    ("finetune_retrieval", "data=flickr8k"): dict(terms={"itc"}, amf=False, momentum=True,
                                                  text_locked="none"),
    ("finetune_retrieval", "model=base"): dict(terms={"itc"}, amf=False, momentum=True,
                                               text_locked="none"),
    ("cookie_pretrain", None): dict(terms={"cookie_cm", "cookie_vv", "cookie_tt"}, amf=False,
                                    momentum=False, text_locked="none"),
    ("cookie_pretrain", "intra=cross_model"): dict(
        terms={"cookie_cm", "cookie_vv", "cookie_tt"}, amf=False, momentum=False,
        text_locked="none"),
    ("video_retrieval", None): dict(terms={"itc"}, amf=False, momentum=True, text_locked="none"),
}


@pytest.mark.parametrize("module, arg", sorted(SHIPPED_OBJECTIVES, key=str))
def test_every_shipped_config_has_the_objective_its_docstring_names(module, arg):
  """Regression: configs/finetune_retrieval.py once left the AMF on (inherited from
  common.py), though fine-tuning runs without it (method.md §1.3.4)."""
  config = importlib.import_module(f"configs.{module}").get_config(arg)
  want = SHIPPED_OBJECTIVES[(module, arg)]
  terms = {name for name in config_validation.OBJECTIVES if config.loss[name] > 0}
  assert terms == want["terms"]
  assert config.amf.enabled == want["amf"]
  assert objectives.reads_momentum(config) == want["momentum"]
  assert config.model.text.locked == want["text_locked"]
  assert config.model.image.token_drop == want.get("token_drop", 0.0)  # the preset's alone
  assert config.model.image.unmasked_tuning_steps == want.get("unmasked_tuning_steps", 0)
  assert config.input.caption_noise == 0.0
