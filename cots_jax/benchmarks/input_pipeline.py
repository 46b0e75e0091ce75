"""Input-pipeline throughput next to the train step's (issue: the pipeline must not limit a run).

  python -m cots_jax.benchmarks.input_pipeline --config=configs/pretrain.py:data=flickr8k \
      --out=pipeline.json [--config.input.cache_decoded=True]

Times the training stream of `--config` in one process with no read-ahead threads (so the rate is
what one grain worker delivers: read + decode + augment + tokenise + mask + batch), at the
config's image size and at 224 px, and the train step of the same config
(`benchmarks/train_step.py`). Prints and writes JSON: images/s per worker at each size, the
step's pairs/s, and the workers one run needs to keep the step fed. With input.cache_decoded the
images are decoded once before the timing starts (the log gives the time it took), so the rate
is that of cropping from memory.
"""

import json
import math
import time

from absl import app
from absl import flags

from cots_jax import benchmarks
from cots_jax.benchmarks import train_step
from cots_jax.data import pipeline

# --config, --out, --warmup_steps and --steps (of the train step) are train_step's flags.
_BATCHES = flags.DEFINE_integer("batches", 10, "Timed batches per image size.")
_SIZES = flags.DEFINE_list("sizes", ["224"], "Image sizes timed besides the config's.")
_TRAIN_STEP = flags.DEFINE_bool("train_step", True, "Also time the train step of the config.")


def images_per_second(config, image_size, num_batches):
  """Examples/s of the training stream of `config` at `image_size` px, one process, no threads."""
  config = config.copy_and_resolve_references()
  config.model.image.image_size = image_size
  config.input.num_workers, config.input.prefetch = 0, 0
  iterator = pipeline.make_train_iterator(config)
  next(iterator)  # tokenizer, source and file-system caches warm up outside the timing
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return num_batches * config.input.batch_size / (time.perf_counter() - start)


def benchmark(config, num_batches, sizes, with_train_step=True, warmup_steps=2, timed_steps=5):
  """The results dict (see the module docstring)."""
  sizes = sorted({config.model.image.image_size, *sizes})
  results = {"data": config.input.data.name, "batch_size": config.input.batch_size,
             "augment": config.input.augment, "cache_decoded": config.input.cache_decoded,
             "images_per_sec_per_worker": {str(size): images_per_second(config, size, num_batches)
                                           for size in sizes}}
  if with_train_step:
    step = train_step.benchmark(config, warmup_steps, timed_steps)
    own_rate = results["images_per_sec_per_worker"][str(config.model.image.image_size)]
    results["train_step_pairs_per_sec"] = step["pairs_per_sec"]
    results["workers_needed"] = math.ceil(step["pairs_per_sec"] / own_rate)
  return results


def main(argv):
  del argv
  results = benchmark(train_step.CONFIG.value, _BATCHES.value, [int(s) for s in _SIZES.value],
                      _TRAIN_STEP.value, train_step.WARMUP.value, train_step.STEPS.value)
  print(json.dumps(results, indent=2))
  benchmarks.write_results(results, train_step.OUT.value)


if __name__ == "__main__":
  app.run(main)
