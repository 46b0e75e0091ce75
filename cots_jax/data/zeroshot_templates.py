"""Prompt templates of zero-shot classification (cots_jax/zeroshot.py), by set name: each "{}"
is replaced by a class name. A Python module, not a JSON file, so that it installs with the
package (setup.cfg's package data names the vocab files only).

  clip       16 of open_clip's ImageNet templates: its 7 "simple" ones and 9 of OpenAI's 80.
  simple     the single prompt of CLIP's zero-shot baseline.
  synthetic  the frames of the synthetic captions (cots_jax/data/synthetic.py) around one object
             named without its article: "large red circle" -> "there is a large red circle".
"""

TEMPLATE_SETS = {
    "clip": (
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
        "a photo of a {}.",
        "a bad photo of a {}.",
        "a low resolution photo of a {}.",
        "a cropped photo of a {}.",
        "a close-up photo of a {}.",
        "a bright photo of a {}.",
        "a dark photo of a {}.",
        "a drawing of a {}.",
        "a blurry photo of a {}.",
    ),
    "simple": ("a photo of a {}.",),
    "synthetic": (
        "a {}",
        "there is a {}",
        "one shape: a {}",
    ),
}
