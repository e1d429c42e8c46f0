"""Trainable embedding rows for new text tokens ("<new1>"), spliced into a loaded CLIP text encoder.

    token_id, init = add_placeholder_token(tokenizer, "<new1>", "dog", text_encoder)
    add_trainable_tokens(text_encoder, [token_id], init[None])   # in place; the table stays frozen

Custom Diffusion / CustomCrafter train only the new rows: they live in their own parameter
(`new_token_embedding`), so a trainable filter selects them without the 49k-row table. For inference
the learned rows go into the table itself (`vcjax.models.new_tokens.add_tokens`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax.models.clip_text import position_embeddings


class NewTokenEmbeddings(nnx.Module):
  """CLIP token + position embeddings where the ids in `new_token_ids` read trainable rows.

  Keeps the original submodules under their names (`token_embedding`, `position_embedding`), so frozen
  parameter paths do not change; the new rows live in `new_token_embedding` `(n_new, D)`. Ids outside
  the table (a tokenizer that grew) are safe: they are looked up as row 0 and then replaced.
  """

  def __init__(self, embeddings: nnx.Module, new_token_ids, init_rows):
    self.token_embedding = embeddings.token_embedding
    self.position_embedding = embeddings.position_embedding
    self.new_token_ids = tuple(int(i) for i in new_token_ids)
    init_rows = jnp.asarray(init_rows, jnp.float32).reshape(len(self.new_token_ids), -1)
    self.new_token_embedding = nnx.Param(init_rows.astype(self.token_embedding.embedding[...].dtype))

  def __call__(self, input_ids):
    t = input_ids.shape[-1]
    ids = jnp.asarray(input_ids)
    vocab = self.token_embedding.num_embeddings
    tok = self.token_embedding(jnp.where((ids >= 0) & (ids < vocab), ids, 0))
    new = self.new_token_embedding[...].astype(tok.dtype)
    for k, token_id in enumerate(self.new_token_ids):
      tok = jnp.where((ids == token_id)[..., None], new[k], tok)
    return tok + position_embeddings(self.position_embedding, t)


def add_trainable_tokens(text_encoder: nnx.Module, new_token_ids, init_rows) -> NewTokenEmbeddings:
  """Install `NewTokenEmbeddings` in a CLIPTextModel (in place); returns it."""
  tm = text_encoder.text_model
  tm.embeddings = NewTokenEmbeddings(tm.embeddings, new_token_ids, init_rows)
  return tm.embeddings


def add_placeholder_token(tokenizer, token: str, class_word: str, text_encoder) -> tuple[int, np.ndarray]:
  """Add `token` to the tokenizer; -> (its id, initial embedding = mean of the class word's token rows).

  (Custom Diffusion requires a single-token class word; the mean is the same thing then, and defined
  for words the tokenizer splits.)
  """
  if tokenizer.add_tokens([token]) == 0 and token not in tokenizer.get_vocab():
    raise ValueError(f"could not add token {token!r} to the tokenizer")
  token_id = int(tokenizer.convert_tokens_to_ids(token))
  class_ids = tokenizer(class_word, add_special_tokens=False)["input_ids"]
  if not class_ids:
    raise ValueError(f"class word {class_word!r} tokenizes to nothing")
  table = np.asarray(text_encoder.text_model.embeddings.token_embedding.embedding[...])
  return token_id, table[np.asarray(class_ids)].mean(axis=0)
