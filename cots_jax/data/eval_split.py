"""The eval split: images (or clips) and their captions, decoded once, in padded batches for the
evaluators (design §4.1, cots_jax/evaluators/).
"""

import numpy as np

from cots_jax.data import pipeline
from cots_jax.data import registry
from cots_jax.data import tokenizer as tokenizer_lib
from cots_jax.data import transforms


def padded_batches(num_items, batch_size, get_batch):
  """Yields get_batch(indices) plus "valid" bool [batch_size] over 0..num_items-1; the last
  batch repeats the last item up to batch_size (static shapes) with valid=False. The batches of
  every evaluator (the eval split's, the zero-shot evaluator's)."""
  for start in range(0, num_items, batch_size):
    indices = np.arange(start, start + batch_size)
    batch = get_batch(np.minimum(indices, num_items - 1))
    batch["valid"] = indices < num_items
    yield batch


class EvalSplit:
  """The eval images and their captions, for retrieval (design §4.1).

  The images are decoded once, resized + centre-cropped, and kept as uint8 (1000 images at
  224 px: 150 MB). An image that does not decode and a blank caption are left out of the
  gallery (or stop the run when `on_bad_example` is "fail"); `num_skipped` counts them.
  `view_transform` (an ImageTransform) makes the augmented views of `view_batches` from those
  kept images. With `num_frames` > 0 the source holds clips: each keeps its `num_frames` segment-
  centre frames, and the batches carry `video` [b, T, H, W, 3] instead of `image`.

  Attributes:
    num_images, num_texts: gallery sizes.
    captions: list of num_texts str, in image order.
    txt2img: int32 [num_texts], the image index of each text.
    num_skipped: bad images and blank captions left out.
  """

  def __init__(self, source, tokenizer, max_len, batch_size, image_size,
               on_bad_example="skip", *, view_transform, num_frames=0):
    self._batch_size = batch_size
    self._view_transform = view_transform
    self._visual_key = "video" if num_frames else "image"
    transform = transforms.ImageTransform(image_size)
    log = pipeline.BadExampleLog("eval split")
    images, self.captions, txt2img = [], [], []
    for index in range(len(source)):
      try:
        item = source[index]
        images.append(transform.clip_pixels(item["video"], item["name"], num_frames)
                      if num_frames else transform.pixels(item["image"], item["name"]))
      except transforms.BadExampleError as error:
        log.add(pipeline.bad_example(error, on_bad_example)["bad_example"])
        continue
      for number, caption in enumerate(item["captions"]):
        if caption.strip():
          self.captions.append(caption)
          txt2img.append(len(images) - 1)
        else:
          error = transforms.BadExampleError(item["name"], f"caption {number} is empty")
          log.add(pipeline.bad_example(error, on_bad_example)["bad_example"])
    if not images:
      raise ValueError(f"the eval split has no readable image ({log.count} bad)")
    self._images = np.stack(images)
    self.num_images = len(images)
    self.num_texts = len(self.captions)
    self.num_skipped = log.count
    self.txt2img = np.asarray(txt2img, np.int32)
    self._text_ids, self._text_mask = tokenizer_lib.tokenize(tokenizer, self.captions, max_len)
    self._features = {}

  def attach_features(self, tables):
    """Makes the batches carry cached features (cots_jax/features.py): `tables` {"image":
    float32 [num_images, Di], "text": [num_texts, Dt]} (either may be absent; {} detaches)."""
    self._features = dict(tables)

  def image_pixels(self, indices):
    """uint8 [len(indices), H, W, 3] (clips: [len, T, H, W, 3]) of the eval images, resized and
    centre-cropped."""
    return self._images[indices]

  def image_batches(self):
    """Yields {"image": float32 [b, H, W, 3] in [-1, 1] (clips: "video" [b, T, H, W, 3]),
    "valid": bool [b]}; with attached image features, {"image_features": [b, Di], "valid"}."""
    if "image" in self._features:
      return padded_batches(self.num_images, self._batch_size,
                            lambda i: {"image_features": self._features["image"][i]})
    return padded_batches(self.num_images, self._batch_size,
                          lambda i: {self._visual_key: transforms.to_unit_range(self._images[i])})

  def view_batches(self, seed):
    """Yields {"image": float32 [b, H, W, 3] in [-1, 1], "valid": bool [b]}: an augmented view
    of every image, in the order of `image_batches`. Image i is drawn with the generator
    np.random.default_rng((seed, i)), so a seed fixes the views and two seeds differ. Images
    only: ValueError for clips."""
    if self._visual_key != "image":
      raise ValueError("view_batches: the eval split holds video clips, not images")

    def views(indices):
      return {"image": np.stack([
          self._view_transform(self._images[i], f"eval image {i}",
                               np.random.default_rng((seed, i)))
          for i in indices.tolist()])}
    return padded_batches(self.num_images, self._batch_size, views)

  def text_batches(self):
    """Yields {"text_ids": int32 [b, L], "text_mask": int32 [b, L], "valid": bool [b]}, plus
    "text_features" [b, Dt] when text features are attached."""
    def batch(i):
      rows = {"text_ids": self._text_ids[i], "text_mask": self._text_mask[i]}
      if "text" in self._features:
        rows["text_features"] = self._features["text"][i]
      return rows
    return padded_batches(self.num_texts, self._batch_size, batch)


def make_eval_split(config, batch_size=None):
  """The eval split of config.input.data in batches of `batch_size` (default eval.batch_size),
  its views made by `transforms.ImageTransform.for_views(config)`."""
  return EvalSplit(registry.make_source(config, "eval"),
                   tokenizer_lib.load_tokenizer(config.input.tokenizer), config.input.max_len,
                   batch_size or config.eval.batch_size, config.model.image.image_size,
                   config.input.on_bad_example,
                   view_transform=transforms.ImageTransform.for_views(config),
                   num_frames=config.model.num_frames if registry.is_video(config) else 0)
