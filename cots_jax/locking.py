"""Locked towers (open_clip's `--lock-image` / `--lock-text`, big_vision's LiT) and the momentum
copy of the trainable parameters (design §9.2).

`config.model.{image,text}.locked` is "none" (the tower trains), "all" (it is frozen) or an integer
N (its top N blocks train, with the ViT's final norm; embeddings and lower blocks are frozen, as
open_clip's unlocked layers). Projection heads, MLM / MVM heads, the WST and the temperature always
train.

A locked parameter is read under `stop_gradient` in the step (`stop_locked`), so XLA computes no
backward for it; the optimizer keeps no moments for it (state.make_optimizer's `set_to_zero`
group); and `params_ema` holds the trainable leaves only: a locked leaf's momentum value is its
online value (`momentum_tree` merges them back), so no second copy is stored.

Trees here are the nested dicts of flax parameters; a path is the tuple of their keys.
"""

from flax import traverse_util
import jax

TOWERS = ("image", "text")
NONE, ALL = "none", "all"


def unlocked_blocks(lock, depth, field):
  """The number of a tower's top blocks that train under `lock` ("none": all `depth`, "all": 0,
  "N": N).

  Raises:
    ValueError naming `field` when `lock` is neither "none", "all" nor an integer in [0, depth].
  """
  if lock == NONE:
    return depth
  if lock == ALL:
    return 0
  if isinstance(lock, str) and lock.strip().isdigit() and 0 <= int(lock) <= depth:
    return int(lock)
  raise ValueError(f"config.{field}={lock!r}: use 'none', 'all' or the number of top blocks "
                   f"that train, 0..{depth}")


def tower_lock(config, tower):
  """`config.model.<tower>.locked` as the number of trainable top blocks (unlocked_blocks)."""
  group = config.model[tower]
  return unlocked_blocks(group.locked, group.depth, f"model.{tower}.locked")


def fully_locked(config, tower):
  """True when no parameter of `tower` trains."""
  return tower_lock(config, tower) == 0


def any_locked(config):
  """True when some parameter of a tower is locked."""
  return any(config.model[tower].locked != NONE for tower in TOWERS)


def _block_index(tower, path):
  """The block number of a tower parameter's path (after the tower key), or None outside the
  blocks: ViT `block_{i}/...`, BERT `encoder/layer_{i}/...`."""
  name = path[0] if tower == "image" else (path[1] if path[:1] == ("encoder",) else "")
  prefix, _, index = name.rpartition("_")
  return int(index) if prefix in ("block", "layer") and index.isdigit() else None


def is_trainable(config, path):
  """Whether the parameter at `path` (tuple of keys from the params root) trains."""
  tower = path[0]
  if tower not in TOWERS or config.model[tower].locked == NONE:
    return True
  unlocked = tower_lock(config, tower)
  if unlocked == 0:
    return False
  depth = config.model[tower].depth
  block = _block_index(tower, path[1:])
  if block is not None:
    return block >= depth - unlocked
  return tower == "image" and path[1] == "norm"  # the ViT's final norm trains with its top


def trainable_mask(config, params):
  """A tree like `params` (arrays or ShapeDtypeStructs) of bools: True where a leaf trains."""
  return traverse_util.unflatten_dict({
      path: is_trainable(config, path) for path in traverse_util.flatten_dict(params)})


def trainable_leaves(config, params):
  """The subtree of `params` that trains (the shape of `params_ema`)."""
  return traverse_util.unflatten_dict({
      path: leaf for path, leaf in traverse_util.flatten_dict(params).items()
      if is_trainable(config, path)})


def like(tree, template):
  """The leaves of `tree` at the paths of `template` (a subtree of it), as a tree like
  `template`."""
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict({path: flat[path]
                                       for path in traverse_util.flatten_dict(template)})


def momentum_tree(params, params_ema):
  """The full momentum parameters: `params_ema`'s leaves where it has them, the online (locked)
  leaves of `params` elsewhere."""
  flat = traverse_util.flatten_dict(params)
  flat.update(traverse_util.flatten_dict(params_ema))
  return traverse_util.unflatten_dict(flat)


def stop_locked(config, params):
  """`params` with every locked leaf under `stop_gradient` (its gradient is zero and XLA drops
  its backward pass)."""
  if not any_locked(config):
    return params
  return traverse_util.unflatten_dict({
      path: leaf if is_trainable(config, path) else jax.lax.stop_gradient(leaf)
      for path, leaf in traverse_util.flatten_dict(params).items()})


def optimizer_group(config, path):
  """The optimizer group of the parameter at `path`: "locked", "image" / "text" (a tower's
  trainable leaves, at `optim.lr_mult_<tower>` times the learning rate) or "rest"."""
  if not is_trainable(config, path):
    return "locked"
  return path[0] if path[0] in TOWERS else "rest"


def encoder_trees(trees):
  """{"params": online tree, "params_ema": full momentum tree} from a state or restore whose
  "params_ema" holds the trainable leaves only; without one (no momentum encoder), "params"
  alone."""
  encoders = {"params": trees["params"]}
  if "params_ema" in trees:
    encoders["params_ema"] = momentum_tree(trees["params"], trees["params_ema"])
  return encoders
