"""CPU attention in whole-row blocks with a hand-written backward (used by `vcjax.nn.attention`).

When every query of a (batch, head) pair fits one cache-sized block of logits against all its keys (the
spatial attentions of small UNets: 64-256 tokens, head size 8-40), the CPU path is `lax.map` over groups of
pairs with a hand-written backward. Autodiff of the chunked / plain forms (row max with its argmax select,
row sums, rematerialised softmax) cost the 8.4M-parameter world UNet's training step more than all its
convolutions: XLA:CPU rewrites each 256-long row reduction into a slow reduce-window + reduce, in the
forward and again in the backward. Here the forward's only row reductions are the max and, folded into
the second matmul as a ones column of v, the row sum; the backward has none over keys (flash-attention
backward from the saved log-sum-exp `(pairs, Lq)`: every other op is a batched matmul or elementwise).
Level-0 self-attention of that UNet (64 frames x 256 tokens, 8 heads of 8), forward + backward: 3.5 s ->
1.4 s on the loaded 2-core CI machine (bench/RESULTS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _head_major(x, groups: int, group: int):
  """`(B, L, N, D)` -> `(groups, group, L, D)`, pairs zero-padded to groups * group."""
  b, length, n, d = x.shape
  x = x.transpose(0, 2, 1, 3).reshape(b * n, length, d)
  x = jnp.pad(x, ((0, groups * group - b * n), (0, 0), (0, 0)))
  return x.reshape(groups, group, length, d)


def _from_head_major(x, b: int, n: int, dtype):
  """Inverse of `_head_major`: `(groups, group, L, D)` -> `(B, L, N, D)` in `dtype`."""
  x = x.reshape(-1, *x.shape[2:])[:b * n]
  return x.reshape(b, n, *x.shape[1:]).transpose(0, 2, 1, 3).astype(dtype)


def _blocks_forward(q, k, v, scale, group):
  b, n = q.shape[0], q.shape[2]
  groups = -(-(b * n) // group)
  qh, kh, vh = (_head_major(x, groups, group) for x in (q, k, v))

  def one(args):
    qg, kg, vg = args
    s = jnp.einsum("gqd,gkd->gqk", qg, kg)
    s_max = s.max(axis=-1)
    e = jnp.exp((s - s_max[..., None]) * scale)
    v1 = jnp.concatenate([vg, jnp.ones((*vg.shape[:2], 1), vg.dtype)], axis=-1)  # last column: row sums
    o1 = jnp.einsum("gqk,gkd->gqd", e, v1)
    row_sum = o1[..., -1]
    return o1[..., :-1] / row_sum[..., None], s_max * scale + jnp.log(row_sum)

  out, lse = jax.lax.map(one, (qh, kh, vh))
  return _from_head_major(out, b, n, q.dtype), (qh, kh, vh, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def blocks_attention(q, k, v, scale, group):
  """Softmax attention, `group` (batch, head) pairs at a time, all keys at once. fp32 q, k, v `(B, L, N, D)`;
  scale: the logits' factor (1/sqrt(D)); group: (batch, head) pairs per block."""
  return _blocks_forward(q, k, v, scale, group)[0]


def _blocks_fwd(q, k, v, scale, group):
  return _blocks_forward(q, k, v, scale, group)


def _blocks_bwd(scale, group, saved, g):
  qh, kh, vh, oh, lse = saved
  b, n = g.shape[0], g.shape[2]
  gh = _head_major(g, qh.shape[0], group)

  def one(args):
    qg, kg, vg, og, lg, gg = args
    p = jnp.exp(jnp.einsum("gqd,gkd->gqk", qg, kg) * scale - lg[..., None])
    dv = jnp.einsum("gqk,gqd->gkd", p, gg)
    dp = jnp.einsum("gqd,gkd->gqk", gg, vg)
    ds = p * (dp - jnp.sum(gg * og, axis=-1)[..., None]) * scale  # softmax backward
    return jnp.einsum("gqk,gkd->gqd", ds, kg), jnp.einsum("gqk,gqd->gkd", ds, qg), dv

  dq, dk, dv = jax.lax.map(one, (qh, kh, vh, oh, lse, gh))
  return tuple(_from_head_major(x, b, n, jnp.float32) for x in (dq, dk, dv))


blocks_attention.defvjp(_blocks_fwd, _blocks_bwd)
