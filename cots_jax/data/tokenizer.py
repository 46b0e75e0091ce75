"""WordPiece tokenisation of captions with a transformers fast BERT tokenizer, offline.

transformers 5.x trap (stack-notes §5): `BertTokenizerFast(vocab_file=...)` silently ignores the
file and builds a 5-token vocabulary, so the shipped vocab is passed as `vocab=path`.
"""

import importlib.resources

import numpy as np

SHIPPED_VOCAB = "bert-base-uncased-vocab.txt"


def load_tokenizer(path=""):
  """A fast BERT tokenizer: the shipped bert-base-uncased vocab when `path` is "", else the
  tokenizer saved in the local directory `path` (never downloads)."""
  # transformers takes seconds to import; only the processes that tokenise pay for it.
  from transformers import BertTokenizerFast
  if path:
    return BertTokenizerFast.from_pretrained(path, local_files_only=True)
  vocab = importlib.resources.files("cots_jax.data") / "vocab" / SHIPPED_VOCAB
  with importlib.resources.as_file(vocab) as vocab_path:
    return BertTokenizerFast(vocab=str(vocab_path), do_lower_case=True)


def tokenize(tokenizer, texts, max_len):
  """`[CLS] ... [SEP]` ids padded / truncated to `max_len`.

  Returns:
    (ids int32 [N, max_len], mask int32 [N, max_len]), mask 1 on real tokens and 0 on padding.
  """
  encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                      return_tensors="np")
  return (encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32))
