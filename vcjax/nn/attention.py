"""THE attention function of vcjax, and the projection module around it.

Every attention in every model (UNet spatial self/cross, PISA, temporal, VAE mid-block, CLIP) calls
`dot_product_attention`, so that fast kernels, sharding and method-specific variants change one place.

Layout convention: q, k, v are `(B, L, N, D)` (batch, tokens, heads, head size), as in
`jax.nn.dot_product_attention`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vcjax.nn.layers import Linear


def dot_product_attention(q, k, v, *, mask=None, implementation: str | None = None):
  """Softmax attention. q `(B, Lq, N, D)`, k/v `(B, Lk, N, D)` -> `(B, Lq, N, D)`.

  mask: optional boolean, broadcastable to `(B, N, Lq, Lk)`; True means "may attend".
  The softmax is computed in float32 whatever the input dtype.
  """
  del implementation  # Dispatch to fused kernels lands with the performance work (issue D).
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnqk,bknd->bqnd", weights, v)


class Attention(nnx.Module):
  """Multi-head attention with diffusers' parameter names (to_q, to_k, to_v, to_out).

  x `(B, L, C)`, context `(B, T, Dc)` or None for self-attention -> `(B, L, C)`.
  """

  def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, qkv_bias: bool = False,
               out_bias: bool = True, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    context_dim = context_dim or dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.heads = heads
    self.to_q = Linear(dim, dim, use_bias=qkv_bias, **kw)
    self.to_k = Linear(context_dim, dim, use_bias=qkv_bias, **kw)
    self.to_v = Linear(context_dim, dim, use_bias=qkv_bias, **kw)
    self.to_out = Linear(dim, dim, use_bias=out_bias, **kw)

  def split_heads(self, x):
    return x.reshape(*x.shape[:-1], self.heads, x.shape[-1] // self.heads)

  def __call__(self, x, context=None, *, mask=None):
    context = x if context is None else context
    q = self.split_heads(self.to_q(x))
    k = self.split_heads(self.to_k(context))
    v = self.split_heads(self.to_v(context))
    out = dot_product_attention(q, k, v, mask=mask)
    return self.to_out(out.reshape(*out.shape[:-2], -1))
