"""Training-time changes to a loaded model, made without touching the model code.

Each one swaps the class of existing module instances for a subclass (the parameter paths stay the
same, so checkpoints, LoRA names and sharding rules are unaffected) or wraps one submodule:

  * `enable_remat(unet)`: gradient checkpointing per ResnetBlock / SpatialTransformer / MotionModule
    (their activations are recomputed in the backward pass; only block inputs are kept).
  * `detach_start_token(unet)`: Custom Diffusion's trick in every spatial cross-attention (attn2): the
    key and value of context token 0 (start-of-text) carry no gradient, neither to the k/v projections
    (and their LoRA) nor to the text encoder. NOTE: stop_gradient on the context's token 0 alone would NOT
    do this: d(W c0)/dW = c0 is still non-zero; the k/v rows themselves must be detached.
  * `add_new_tokens(text_encoder, ids, init)`: trainable embedding rows for new tokens ("<new1>") spliced
    into the token-embedding lookup; the embedding table itself stays frozen.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax.models.blocks import ResnetBlock, SpatialTransformer, TransformerBlock
from vcjax.models.motion import MotionModule
from vcjax.nn.attention import Attention, dot_product_attention

REMAT_TYPES = (ResnetBlock, SpatialTransformer, MotionModule)


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray))


@functools.cache
def remat_class(base: type) -> type:
  """A subclass of `base` whose __call__ runs under jax.checkpoint (module state passed explicitly).

  Non-array arguments (None, callables such as the PISA hook) are closed over as static values.
  """

  def __call__(self, *args, **kwargs):
    graphdef, state = nnx.split(self)
    leaves, treedef = jax.tree.flatten((args, kwargs))
    mask = [_is_array(x) for x in leaves]
    arrays = [x for x, m in zip(leaves, mask) if m]

    def run(state, arrays):
      it = iter(arrays)
      a, kw = jax.tree.unflatten(treedef, [next(it) if m else x for x, m in zip(leaves, mask)])
      return base.__call__(nnx.merge(graphdef, state), *a, **kw)

    return jax.checkpoint(run)(state, arrays)

  return type(f"Remat{base.__name__}", (base,), {"__call__": __call__, "__module__": __name__})


def _swap(module: nnx.Module, new_cls: type) -> None:
  # Same attributes, new behaviour; the graphdef records the new type.
  module.__class__ = new_cls


def enable_remat(model: nnx.Module, types: tuple[type, ...] = REMAT_TYPES) -> int:
  """Gradient checkpointing on every instance of `types` in `model` (in place). Returns the count."""
  n = 0
  for _, m in list(nnx.iter_graph(model)):
    if isinstance(m, types) and type(m) in types:
      _swap(m, remat_class(type(m)))
      n += 1
  return n


class StartTokenDetachedAttention(Attention):
  """Cross-attention whose key/value rows of context token 0 are stop_gradient'ed (same values)."""

  def __call__(self, x, context=None, *, mask=None, implementation: str | None = None):
    context = x if context is None else context
    q = self.split_heads(self.to_q(x))
    k = self.to_k(context)
    v = self.to_v(context)
    keep = (jnp.arange(context.shape[1]) > 0)[None, :, None]  # (1, T, 1): False at token 0
    k = self.split_heads(jnp.where(keep, k, jax.lax.stop_gradient(k)))
    v = self.split_heads(jnp.where(keep, v, jax.lax.stop_gradient(v)))
    out = dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return self.to_out(out.reshape(*out.shape[:-2], -1))


def detach_start_token(unet: nnx.Module) -> int:
  """Swap every spatial transformer block's attn2 (text cross-attention) for the detached version.

  Motion modules (whose attn2 is a temporal self-attention) are left alone. Returns the count.
  """
  n = 0
  for path, m in list(nnx.iter_graph(unet)):
    if isinstance(m, TransformerBlock) and "motion_modules" not in [str(p) for p in path]:
      if type(m.attn2) is Attention:
        _swap(m.attn2, StartTokenDetachedAttention)
        n += 1
  return n


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
    return tok + self.position_embedding(jnp.arange(t))


def add_new_tokens(text_encoder: nnx.Module, new_token_ids, init_rows) -> NewTokenEmbeddings:
  """Install `NewTokenEmbeddings` in a CLIPTextModel (in place); returns it."""
  tm = text_encoder.text_model
  tm.embeddings = NewTokenEmbeddings(tm.embeddings, new_token_ids, init_rows)
  return tm.embeddings
