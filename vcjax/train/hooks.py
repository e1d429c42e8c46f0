"""Training-time changes to a loaded text encoder, made without touching the model code.

  * `add_new_tokens(text_encoder, ids, init)`: trainable embedding rows for new tokens ("<new1>") spliced
    into the token-embedding lookup; the embedding table itself stays frozen.

(The UNet's training changes are not hooks: gradient checkpointing is `UNet3DConfig.remat`, fixed when the
blocks are built, and Custom Diffusion's start-token detach is the "start_token_detach" attention variant,
`vcjax.nn.attention.set_attention(unet, "start_token_detach")`.)
"""

from __future__ import annotations

import jax.numpy as jnp
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


def add_new_tokens(text_encoder: nnx.Module, new_token_ids, init_rows) -> NewTokenEmbeddings:
  """Install `NewTokenEmbeddings` in a CLIPTextModel (in place); returns it."""
  tm = text_encoder.text_model
  tm.embeddings = NewTokenEmbeddings(tm.embeddings, new_token_ids, init_rows)
  return tm.embeddings
