"""New text tokens in a loaded tokenizer + CLIP text encoder (textual inversion, CustomCrafter's "<new1>").

Pure model surgery, no file I/O (files: `vcjax.weights.textual_inversion`):

  * `add_tokens(tokenizer, text_encoder, {token: (D,)})`: each token enters the (transformers) tokenizer as
    an added token and its row the encoder's token-embedding table, which grows to hold the new ids;
    existing rows stay bit-identical. What diffusers' `load_textual_inversion` does (it resizes the
    table to len(tokenizer) + n and writes the rows at the tokenizer's new ids).
  * `grow_token_embedding(text_encoder, {id: (D,)})`: just the table part.
  * `expand_prompt(tokenizer, prompt)`: a multi-vector token "name" (added with name_1, name_2, ...) spelled
    out as all its tokens, as diffusers' `maybe_convert_prompt` does before tokenizing.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np


def token_table(text_encoder):
  """The nnx.Embed of token embeddings of a vcjax CLIPTextModel."""
  return text_encoder.text_model.embeddings.token_embedding


def grow_token_embedding(text_encoder, rows: Mapping[int, np.ndarray]) -> int:
  """Write `rows` ({token id: (D,)}) into the token-embedding table, first growing it (zero rows) to hold
  the largest id; the other rows keep their values bit for bit. Updates the table's num_embeddings and the
  config's vocab_size. In place; returns the new number of rows."""
  emb = token_table(text_encoder)
  table = emb.embedding[...]
  old, width = table.shape
  if not rows:
    return old
  ids = sorted(int(i) for i in rows)
  if ids[0] < 0:
    raise ValueError(f"token id {ids[0]} is negative")
  vals = np.stack([np.asarray(rows[i], np.float32).reshape(-1) for i in ids])
  if vals.shape[1] != width:
    raise ValueError(f"token embeddings of width {vals.shape[1]} do not fit the text encoder's {width}")
  n = max(old, ids[-1] + 1)
  if n > old:
    table = jnp.concatenate([table, jnp.zeros((n - old, width), table.dtype)])
  table = table.at[jnp.asarray(ids)].set(jnp.asarray(vals).astype(table.dtype))
  emb.embedding.set_value(table)
  emb.num_embeddings = n
  config = getattr(text_encoder, "config", None)
  if dataclasses.is_dataclass(config) and hasattr(config, "vocab_size") and config.vocab_size != n:
    text_encoder.config = dataclasses.replace(config, vocab_size=n)
  return n


def add_tokens(tokenizer, text_encoder, embeddings: Mapping[str, np.ndarray]) -> dict[str, int]:
  """Add each token of `embeddings` ({token: (D,)}) to the tokenizer and its row to the text encoder.

  A token the tokenizer already has is accepted only if its row already holds that embedding (loading the
  same file twice is a no-op); with another row, or a token of the base vocabulary, it is a ValueError,
  as is a width other than the encoder's. Nothing is changed when any token fails. -> {token: id}.
  """
  table = token_table(text_encoder).embedding[...]
  width = table.shape[1]
  vocab = tokenizer.get_vocab()
  added = getattr(tokenizer, "added_tokens_encoder", {})
  new, ids = {}, {}
  for token, value in embeddings.items():
    row = np.asarray(value, np.float32)
    if row.ndim != 1 or row.shape[0] != width:
      raise ValueError(f"the embedding of {token!r} has shape {row.shape}; this text encoder's tokens are "
                       f"({width},) (an embedding trained for another base model?)")
    if token in vocab:
      i = int(vocab[token])
      same = (token in added and i < table.shape[0]
              and np.array_equal(np.asarray(table[i]), row.astype(table.dtype)))
      if not same:
        what = "an added token with another embedding" if token in added else "a token of the base vocabulary"
        raise ValueError(f"token {token!r} already exists in the tokenizer as {what}; rename the new token "
                         "(load_textual_inversion(path, token=...)) or load it into a fresh pipeline")
      ids[token] = i
      continue
    new[token] = row
  if new:
    tokenizer.add_tokens(list(new))
    rows = {}
    for token, row in new.items():
      i = int(tokenizer.convert_tokens_to_ids(token))
      if i == getattr(tokenizer, "unk_token_id", None) or i < 0:
        raise ValueError(f"the tokenizer did not take the token {token!r}")
      rows[i] = row
      ids[token] = i
    grow_token_embedding(text_encoder, rows)
  return {token: ids[token] for token in embeddings}


def expand_prompt(tokenizer, prompt: str) -> str:
  """diffusers' `TextualInversionLoaderMixin.maybe_convert_prompt`: every added token "t" of the prompt
  that has companions t_1, t_2, ... (a multi-vector embedding) becomes "t t_1 t_2 ..."."""
  added = getattr(tokenizer, "added_tokens_encoder", None) or {}
  if not any(f"{token}_1" in added for token in added):  # no multi-vector token: nothing to expand (and no
    return prompt                                          # tokenizer call warning about over-long prompts)
  for token in set(tokenizer.tokenize(prompt)):
    if token in added:
      replacement, i = token, 1
      while f"{token}_{i}" in added:
        replacement += f" {token}_{i}"
        i += 1
      prompt = prompt.replace(token, replacement)
  return prompt
