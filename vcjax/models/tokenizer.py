"""The CLIP BPE tokenizer and prompt -> id arrays as the SD pipelines do.

`load_tokenizer` gives vcjax's own ClipBPE (vcjax.models.clip_bpe: transformers' CLIPTokenizer's ids, without
importing transformers, which costs a sampler ~1.7 s of its start); transformers' CLIPTokenizer only for a folder
ClipBPE does not reproduce (a tokenizer.json, AddedToken options) or when asked for. Nothing here imports torch
(ids come back as numpy).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

_BPE_FILES = ("vocab.json", "merges.txt")


def _tokenizer_dir(path: str | os.PathLike) -> str:
  """The folder holding the tokenizer files: `path` itself or its `tokenizer/` (diffusers model root)."""
  path = os.fspath(path)
  for folder in (path, os.path.join(path, "tokenizer")):
    if all(os.path.isfile(os.path.join(folder, f)) for f in _BPE_FILES):
      return folder
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
      return folder
  if not os.path.isdir(path):
    raise FileNotFoundError(f"CLIP tokenizer folder {path!r} does not exist")
  present = sorted(os.listdir(path))
  raise FileNotFoundError(
      f"no CLIP tokenizer in {path!r}: expected vocab.json and merges.txt (or tokenizer.json) there or in "
      f"its tokenizer/ subfolder; found {present[:12]}")


def load_tokenizer(path: str | os.PathLike, backend: str = "auto"):
  """The CLIP tokenizer of a local folder (vocab.json + merges.txt, optional tokenizer_config.json /
  special_tokens_map.json / added_tokens.json; or tokenizer.json), or of a diffusers model root's `tokenizer/`.

  backend: "auto" ClipBPE, or transformers' CLIPTokenizer where ClipBPE raises Unsupported (tokenizer.json, ...);
  "clip_bpe" ClipBPE or Unsupported; "transformers" CLIPTokenizer.from_pretrained (the reference, for tests).
  Raises FileNotFoundError naming the missing files. Never touches the network.
  """
  if backend not in ("auto", "clip_bpe", "transformers"):
    raise ValueError(f"backend {backend!r}: 'auto', 'clip_bpe' or 'transformers'")
  folder = _tokenizer_dir(path)
  if backend != "transformers":
    from vcjax.models.clip_bpe import ClipBPE, Unsupported
    try:
      return ClipBPE.from_folder(folder)
    except Unsupported:
      if backend == "clip_bpe":
        raise
  from transformers import CLIPTokenizer  # Imported here: ~1.7 s, for the folders ClipBPE does not take
  return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


# transformers' stand-in for "no limit" when a tokenizer folder sets no model_max_length.
_UNSET = 10 ** 6


def padded_length(tokenizer) -> int:
  """The length prompts are padded to: the tokenizer's `model_max_length` (what diffusers' pipelines use),
  77 (CLIP's) when its folder sets none."""
  n = int(getattr(tokenizer, "model_max_length", 0) or 0)
  return n if 0 < n < _UNSET else 77


def check_length(tokenizer, text_positions: int) -> int:
  """The tokenizer's padded length, checked against the text encoder's position table; ValueError if longer."""
  n = padded_length(tokenizer)
  if n > text_positions:
    raise ValueError(f"the tokenizer pads prompts to {n} tokens (model_max_length) but the text encoder has "
                     f"only {text_positions} positions (max_position_embeddings): use the tokenizer saved with "
                     "this text encoder, or set model_max_length in its tokenizer_config.json")
  return n


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
  """Prompts -> ids `(B, max_length)` int32: BOS, tokens, EOS, padded with the tokenizer's pad token
  and truncated to `max_length` (keeping a final EOS), as diffusers' SD pipelines call the tokenizer.
  max_length None: the tokenizer's own (`padded_length`).
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  if max_length is None:
    max_length = padded_length(tokenizer)
  enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="np")
  return np.asarray(enc["input_ids"], dtype=np.int32)
