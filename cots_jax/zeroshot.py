"""Zero-shot classification: images scored against class embeddings built from text prompts.

A class's embedding is the standard prompt ensemble (CLIP, open_clip): every template of a set
(cots_jax/data/zeroshot_templates.py) filled with each name of the class, embedded, each prompt
embedding scaled to unit length, averaged, and the mean scaled to unit length again. An image's
logits are its cosine similarities with the C class embeddings.

Scoring follows the tie rule of the retrieval metrics (cots_jax/evaluators/retrieval.py): the
true class's rank is 1 + the number of other classes whose logit is >= its own (a NaN counts as
ahead), so ties go against the image and a collapsed model (all logits equal) scores 0. The
predicted class of the confusion matrix is the true class when it ranks first, else the best
other class, so its diagonal is exactly the top-1 hits. `classify`, which knows no label, breaks
ties towards the lower class index. Top-k accuracy is reported for k <= C only (with fewer
than k classes every image would be a hit); accuracies and recalls are percentages.
"""

from typing import NamedTuple

import numpy as np

from cots_jax.data import class_folder
from cots_jax.data import pipeline
from cots_jax.data import transforms
from cots_jax.data import zeroshot_templates

# Confusion matrices with more classes are drawn without tick labels or counts.
_MAX_LABELLED_CLASSES = 40
_MAX_ANNOTATED_CLASSES = 16


def template_set(name):
  """The templates of set `name` of zeroshot_templates.TEMPLATE_SETS: a tuple of str, each with
  one "{}".

  Raises:
    ValueError naming the known sets when there is no such set.
  """
  sets = zeroshot_templates.TEMPLATE_SETS
  if name not in sets:
    raise ValueError(f"template set {name!r} is unknown; known: {sorted(sets)}")
  return sets[name]


def prompts(names, templates):
  """Every template with every name: list of len(names) * len(templates) str, name-major.

  Raises:
    ValueError when a template has no "{}" or more than one.
  """
  for template in templates:
    if template.count("{}") != 1:
      raise ValueError(f"template {template!r} must hold exactly one '{{}}'")
  return [template.replace("{}", name) for name in names for template in templates]


def unit_rows(x):
  """float32 [..., E] with each row scaled to unit length (a zero row stays zero)."""
  x = np.asarray(x, np.float32)
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norms, np.finfo(np.float32).tiny)


def ensemble(prompt_embeddings):
  """float [C, P, E] embeddings of the P prompts of each of C classes -> float32 [C, E]: the
  mean of each class's unit prompt embeddings, scaled to unit length."""
  return unit_rows(unit_rows(prompt_embeddings).mean(axis=1))


def class_embeddings(embed_texts, classnames, templates):
  """float32 [C, E] class embeddings: the `ensemble` of every template with every name of the
  class.

  Args:
    embed_texts: list of n str -> [n, E] embeddings (all prompts are embedded in one call).
    classnames: C entries, each a class name (str) or a tuple of names of the class.
    templates: template strings, each with one "{}".
  """
  names = [(entry,) if isinstance(entry, str) else tuple(entry) for entry in classnames]
  embeddings = np.asarray(embed_texts(prompts([n for group in names for n in group], templates)))
  ends = np.cumsum([len(group) * len(templates) for group in names])[:-1]
  return np.concatenate([ensemble(rows[None]) for rows in np.split(embeddings, ends)])


class Classification(NamedTuple):
  """What `classify` returns.

  Attributes:
    logits: float32 [N, C] cosine similarities (unit class rows dotted with unit image rows).
    top_k: int64 [N, min(k, C)] class indices by falling logit, ties to the lower index.
  """
  logits: np.ndarray
  top_k: np.ndarray


def classify(image_embeddings, classes, k=5):
  """Scores image embeddings [N, E] against class embeddings `classes` [C, E] (of
  `class_embeddings`) -> `Classification` with the top min(k, C)."""
  logits = unit_rows(image_embeddings) @ unit_rows(classes).T
  top_k = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return Classification(logits, top_k.astype(np.int64))


def _checked_labels(logits, labels):
  """(float [N, C] logits, labels as int64 [N] in [0, C))."""
  logits, labels = np.asarray(logits), np.asarray(labels)
  if logits.ndim != 2 or not logits.shape[0] or labels.shape != logits.shape[:1]:
    raise ValueError(f"logits must be [N, C] with N >= 1 and labels [N], got shapes "
                     f"{logits.shape} and {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or (
      labels.max() >= logits.shape[1]):
    raise ValueError(f"labels must be class indices in [0, {logits.shape[1]})")
  return logits, labels.astype(np.int64)


def true_class_ranks(logits, labels):
  """int64 [N] 1-based rank of each image's true class among the C logits (ties and NaN
  against it, see the module doc)."""
  logits, labels = _checked_labels(logits, labels)
  rows = np.arange(len(labels))
  true_logits = logits[rows, labels]
  is_ahead = ~(logits < true_logits[:, None])  # >=, or NaN on either side
  is_ahead[rows, labels] = False
  return 1 + np.count_nonzero(is_ahead, axis=1)


def scored_predictions(logits, labels):
  """int64 [N]: the true class where it ranks first, else the other class of highest logit
  (the first NaN, if any; ties to the lower index)."""
  logits, labels = _checked_labels(logits, labels)
  rows = np.arange(len(labels))
  others = np.array(logits, np.float64)
  others[rows, labels] = -np.inf
  return np.where(true_class_ranks(logits, labels) == 1, labels, np.argmax(others, axis=1))


def confusion_matrix(labels, predictions, num_classes):
  """int64 [C, C]: entry (t, p) counts the images of true class t predicted as p."""
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (np.asarray(labels), np.asarray(predictions)), 1)
  return confusion


def mean_per_class_recall(confusion):
  """Percent: the mean over classes with at least one image of their share of top-1 hits."""
  counts = confusion.sum(axis=1)
  present = counts > 0
  return float(100.0 * np.mean(np.diag(confusion)[present] / counts[present]))


def classification_metrics(logits, labels, ks=(1, 5)):
  """Top-k accuracies, mean per-class recall and the confusion matrix of N scored images.

  Args:
    logits: float [N, C] class scores.
    labels: int [N] true class indices.
    ks: the k of the top-k accuracies; k > C is left out.

  Returns:
    ({"top{k}": percent for k <= C, "mean_per_class_recall": percent}, int64 [C, C] confusion
    matrix, rows = true class).
  """
  logits, labels = _checked_labels(logits, labels)
  ranks = true_class_ranks(logits, labels)
  num_classes = logits.shape[1]
  metrics = {f"top{k}": float(100.0 * np.mean(ranks <= k)) for k in ks if k <= num_classes}
  confusion = confusion_matrix(labels, scored_predictions(logits, labels), num_classes)
  metrics["mean_per_class_recall"] = mean_per_class_recall(confusion)
  return metrics, confusion


def confusion_png(confusion, classnames, title):
  """PNG bytes of the [C, C] confusion matrix: rows (true classes) shaded by their share of
  each prediction, counts written in the cells of up to 16 classes, class names on the axes of
  up to 40."""
  # Imported here: the trainer's zero-shot evaluator imports this module, and needs no matplotlib.
  from cots_jax import plots  # pylint: disable=g-import-not-at-top
  confusion = np.asarray(confusion)
  num_classes = len(classnames)
  shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  side = min(5 + 0.3 * num_classes, 16)
  figure, axes = plots.subplots(figsize=(side, side), dpi=100)
  image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
  figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
  if num_classes <= _MAX_LABELLED_CLASSES:
    axes.set_xticks(range(num_classes), classnames, rotation=90)
    axes.set_yticks(range(num_classes), classnames)
  if num_classes <= _MAX_ANNOTATED_CLASSES:
    for (row, column), count in np.ndenumerate(confusion):
      axes.text(column, row, str(count), ha="center", va="center", fontsize=8,
                color="white" if shares[row, column] > 0.5 else "black")
  axes.set(xlabel="predicted class", ylabel="true class")
  axes.set_title(title, fontsize=10)
  figure.tight_layout()
  return plots.figure_png(figure)


class FolderResult(NamedTuple):
  """What `classify_folder` returns.

  Attributes:
    metrics: the dict of `classification_metrics`.
    confusion: int64 [C, C], rows = true class.
    num_images: images classified.
    num_skipped: files that did not decode.
  """
  metrics: dict
  confusion: np.ndarray
  num_images: int
  num_skipped: int


def classify_folder(embed_images, embed_texts, listing, templates, transform, batch_size,
                    on_bad_example="skip"):
  """Zero-shot classification of a class folder's images by its class names.

  Args:
    embed_images: float32 [b, S, S, 3] in [-1, 1] -> [b, E] embeddings, called with b =
      batch_size always (the last batch is padded), so one compiled shape serves all.
    embed_texts: list of n str -> [n, E] embeddings.
    listing: a class_folder.ClassFolder.
    templates: template strings (`template_set`).
    transform: a transforms.ImageTransform (the model's eval pixels).
    batch_size: images decoded and embedded at a time.
    on_bad_example: "skip" (count files that do not decode) or "fail".

  Raises:
    ValueError naming the class folders none of whose files decodes.
  """
  classes = class_embeddings(embed_texts, listing.classnames, templates)
  bad_examples = pipeline.BadExampleLog(f"zero-shot folder {listing.root}")
  logits, labels = [], []
  for pixels, batch_labels in class_folder.pixel_batches(listing, transform, batch_size,
                                                         bad_examples, on_bad_example):
    padded = np.concatenate([pixels, np.repeat(pixels[-1:], batch_size - len(pixels), axis=0)])
    embeddings = np.asarray(embed_images(transforms.to_unit_range(padded)))[:len(pixels)]
    logits.append(classify(embeddings, classes).logits)
    labels.append(batch_labels)
  labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
  unread = [folder for folder, count in zip(listing.folders,
                                            np.bincount(labels, minlength=len(listing.folders)))
            if not count]
  if unread:
    raise ValueError(f"zero-shot folder {listing.root!r}: no file of the class folder(s) "
                     f"{unread} is a readable image ({bad_examples.count} skipped)")
  metrics, confusion = classification_metrics(np.concatenate(logits), labels)
  return FolderResult(metrics, confusion, len(labels), bad_examples.count)
