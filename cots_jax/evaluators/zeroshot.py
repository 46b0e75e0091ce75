"""Zero-shot classification of synthetic single-object images by shape and by colour.

The images are `synthetic.single_object_scenes` of the eval split (one object each, balanced
over the 8 colours and 4 shapes), rendered at the model's image size. The prompts are the
"synthetic" template set filled with every object phrase "<size> <colour> <shape>" (64 phrases);
each is embedded once, and a class's embedding is the ensemble (cots_jax/zeroshot.py) of the
prompts whose phrase holds it: a colour over every shape and size, a shape over every colour and
size. Metrics: `shape_top1`, `shape_mean_per_class_recall`, `colour_top1`, `colour_top5`,
`colour_mean_per_class_recall` (percent; no shape_top5: there are 4 shapes).
"""

import itertools

import numpy as np

from cots_jax import zeroshot
from cots_jax.data import eval_split
from cots_jax.data import synthetic
from cots_jax.data import tokenizer as tokenizer_lib
from cots_jax.data import transforms
from cots_jax.evaluators import retrieval

NUM_IMAGES = 224  # 7 of each (colour, shape) pair: 56 a shape, 28 a colour; one eval batch (250)
TEMPLATE_SET = "synthetic"
# Each classification: its name in the metric keys and its classes, in the order of a phrase's
# axes (colour, shape, size).
ATTRIBUTES = (("colour", tuple(synthetic.COLOURS)), ("shape", synthetic.SHAPES))


class SyntheticZeroShotEvaluator:
  """Classifies single-object synthetic images by shape and by colour with text prompts.

  Attributes:
    name: the evaluator's name (the trainer logs `eval/<name>/<metric>`).
    labels: {"colour": int64 [n], "shape": int64 [n]}: each image's class index in ATTRIBUTES.
  """

  def __init__(self, name, tokenizer, max_len, batch_size, image_size, ks=(1, 5), seed=0,
               num_images=NUM_IMAGES):
    """Renders the images and tokenizes the prompts.

    Args:
      name: the evaluator's name.
      tokenizer, max_len: the run's tokenizer and input.max_len.
      batch_size: rows per image and prompt batch (eval.batch_size: the eval split's shapes).
      image_size: the model's image side (the images are drawn at it).
      ks: the k of the top-k accuracies (k > the class count is left out).
      seed: the seed of `synthetic.single_object_scenes`.
      num_images: how many images.
    """
    self.name = name
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
      raise ValueError(f"evaluator {name!r}: ks must be positive ints, got {ks!r}")
    self._ks = tuple(ks)
    self._batch_size = batch_size
    scenes = synthetic.single_object_scenes(num_images, "eval", seed)
    self._images = np.stack([synthetic.render_scene(scene, image_size) for scene in scenes])
    self.labels = {attribute: np.asarray([classes.index(getattr(scene.objects[0], attribute))
                                          for scene in scenes], np.int64)
                   for attribute, classes in ATTRIBUTES}
    phrases = [f"{size} {colour} {shape}" for colour, shape, size in itertools.product(
        synthetic.COLOURS, synthetic.SHAPES, synthetic.SIZES)]
    self._text_ids, self._text_mask = tokenizer_lib.tokenize(
        tokenizer, zeroshot.prompts(phrases, zeroshot.template_set(TEMPLATE_SET)), max_len)

  def image_batches(self):
    """Yields {"image": float32 [b, S, S, 3] in [-1, 1], "valid": bool [b]}."""
    return eval_split.padded_batches(
        len(self._images), self._batch_size,
        lambda i: {"image": transforms.to_unit_range(self._images[i])})

  def text_batches(self):
    """Yields {"text_ids": int32 [b, L], "text_mask": int32 [b, L], "valid": bool [b]} of the
    prompts, phrase-major (colour, shape, size, template)."""
    return eval_split.padded_batches(
        len(self._text_ids), self._batch_size,
        lambda i: {"text_ids": self._text_ids[i], "text_mask": self._text_mask[i]})

  def class_embeddings(self, prompt_embeddings):
    """float [P, E] prompt embeddings (of `text_batches`) -> {attribute: float32 [C, E]}."""
    prompt_embeddings = np.asarray(prompt_embeddings)
    sizes = [len(classes) for _, classes in ATTRIBUTES]
    # [colours, shapes, sizes x templates, E]: a class set's axis first, the rest its prompts.
    grid = prompt_embeddings.reshape(*sizes, -1, prompt_embeddings.shape[-1])
    return {attribute: zeroshot.ensemble(np.moveaxis(grid, axis, 0).reshape(
                size, -1, grid.shape[-1]))
            for axis, ((attribute, _), size) in enumerate(zip(ATTRIBUTES, sizes))}

  def run(self, embed_image_fn, embed_text_fn):
    """Embeds the images and prompts; returns {"<attribute>_top<k>": percent for k <= C,
    "<attribute>_mean_per_class_recall": percent} for colour and shape.

    Args:
      embed_image_fn: image batch dict -> [b, E] embeddings.
      embed_text_fn: text batch dict -> [b, E] embeddings.
    """
    images = retrieval.embed_dataset(embed_image_fn, self.image_batches())
    classes = self.class_embeddings(retrieval.embed_dataset(embed_text_fn, self.text_batches()))
    results = {}
    for attribute, _ in ATTRIBUTES:
      logits = zeroshot.classify(images, classes[attribute]).logits
      metrics, _ = zeroshot.classification_metrics(logits, self.labels[attribute], self._ks)
      results.update({f"{attribute}_{key}": value for key, value in metrics.items()})
    return results
