"""THE attention function of vcjax, and the projection module around it.

Every attention in every model (UNet spatial self/cross, PISA, temporal, VAE mid-block, CLIP) calls
`dot_product_attention`, so that fast kernels, sharding and method-specific variants change one place.

Layout convention: q, k, v are `(B, L, N, D)` (batch, tokens, heads, head size), as in
`jax.nn.dot_product_attention`.

Implementations (all compute the softmax in float32, whatever the input dtype):
  "xla"      plain: logits, softmax, weighted sum as XLA ops; materialises `(B, N, Lq, Lk)` logits.
  "chunked"  memory-efficient on any backend: (batch, head) pairs in groups and queries in chunks
             (`lax.map`), and for very long key sequences an online softmax over key chunks (`lax.scan`);
             each chunk is rematerialised in the backward pass, so neither pass holds more than one block
             of logits. Exact up to fp32 rounding. On CPU, with L2-sized blocks, also the fastest path.
             On CPU, without a mask and when all queries of a (batch, head) pair fit one block against all
             its keys, "chunked" and "xla" (beyond the short-sequence form) run `attention_blocks`: the same
             blocks with a hand-written flash-style backward (2.5x faster training of small UNets).
  "cudnn"    `jax.nn.dot_product_attention(implementation="cudnn")`: GPU only, bf16/fp16, head size a
             multiple of 8 and <= 128 (<= 256 on Hopper and later).
  "splash"   (alias "flash") the Pallas TPU splash-attention kernel; head size zero-padded to a multiple
             of 128 and sequences padded to a multiple of 128 (padded keys masked), then un-padded. Off TPU it
             runs in Pallas interpret mode (slow; for tests). Masks must be concrete (not traced) and shared
             by the batch.

Selection, first match wins:
  1. `implementation=` given to the call: always used (an unsupported case raises ValueError).
  2. Short sequences (max(Lq, Lk) <= `config.plain_max_tokens`, default 64: AnimateDiff's temporal
     attention over <= 32 frames): "xla". Padding 16 frames to a 128-token kernel tile, or chunking them,
     only costs time.
  3. `config.implementation` when it is not "auto" and supports the call; otherwise rule 4.
  4. Automatic: TPU -> "splash" (without a mask); GPU -> "cudnn" (bf16/fp16, no mask, supported head
     size); CPU -> "chunked"; otherwise "chunked" when the fp32 logits `B*N*Lq*Lk*4` would exceed
     `config.chunk_threshold_bytes`, else "xla".

`config` is an `AttentionConfig`: a frozen (hashable) dataclass that travels with the model, never a
process-wide setting. Models hold theirs in their own config (`UNet3DConfig.attention`, ...), and every
`Attention` layer keeps it as a static attribute, so it is part of the module's graphdef: a jitted function
that takes the graphdef as a static argument recompiles when the choice changes, and a cached compiled
function can never run with a stale one.

The `Attention` module also carries a static, named *variant* (what it computes between its projections
and `to_out`: plain, VideoMaker's PISA, Custom Diffusion's start-token detach; `vcjax.nn.attention_variants`),
chosen per layer with `set_attention(model, "pisa")`, like diffusers' attention processors.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax.nn import attention_variants as variants
from vcjax.nn.attention_blocks import blocks_attention
from vcjax.nn.layers import Linear

IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "splash")
_ALIASES = {"flash": "splash", "plain": "xla"}
_LANES = 128  # TPU kernels tile sequence and head axes in multiples of 128.
_CPU_BROADCAST_MAX_TOKENS = 32  # measured: faster than batched matmuls at 16 tokens, slower at 64


def _canonical(name: str | None) -> str | None:
  """An implementation name (aliases resolved); None for automatic ("auto", "" or None)."""
  if name in (None, "", "auto"):
    return None
  name = _ALIASES.get(name, name)
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {name!r}; known: "
                     f"{('auto',) + IMPLEMENTATIONS + tuple(_ALIASES)}")
  return name


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Attention kernel settings (static: hashed into the graphdef of every module that holds them).

  implementation: "auto" or one of IMPLEMENTATIONS (or an alias), used where it supports the call.
  plain_max_tokens: sequences this short always take the plain "xla" path (unless a call names another).
  chunk_threshold_bytes: off CPU, automatic selection chunks when the fp32 logits `B*N*Lq*Lk*4` exceed this.
  chunk_bytes: size of one block of fp32 logits in "chunked"; None = 2 MiB on CPU (an L2-sized block is
    what makes chunking faster than the plain path there), 256 MiB elsewhere.
  key_chunk: keys per online-softmax step, used when `min_query_chunk` queries against all keys would
    exceed `chunk_bytes`.
  min_query_chunk: the smallest query chunk.
  splash_interpret: run the splash kernel in Pallas interpret mode; None = only off TPU.
  """
  implementation: str = "auto"
  plain_max_tokens: int = 64
  chunk_threshold_bytes: int = 256 << 20
  chunk_bytes: int | None = None
  key_chunk: int = 1024
  min_query_chunk: int = 64
  splash_interpret: bool | None = None

  def __post_init__(self):
    object.__setattr__(self, "implementation", _canonical(self.implementation) or "auto")

  @classmethod
  def parse(cls, spec: "AttentionConfig | Mapping[str, Any] | str | None") -> "AttentionConfig":
    """An AttentionConfig from itself, a dict of fields (a saved model config), None (automatic) or a
    string: an implementation name, optionally followed by fields, as a command line gives it:
    "chunked", "chunked,chunk_bytes=8388608", "auto,plain_max_tokens=32"."""
    if isinstance(spec, cls):
      return spec
    if spec is None or spec == "":
      return cls()
    if isinstance(spec, Mapping):
      unknown = sorted(set(spec) - {f.name for f in dataclasses.fields(cls)})
      if unknown:
        raise ValueError(f"unknown attention setting(s) {unknown}")
      return cls(**spec)
    name, *items = (part.strip() for part in str(spec).split(","))
    fields = {}
    for item in items:
      key, sep, value = item.partition("=")
      if not sep:
        raise ValueError(f"attention setting {item!r} in {spec!r} is not key=value")
      fields[key] = None if value.lower() == "none" else (value.lower() == "true" if value.lower() in (
          "true", "false") else int(value))
    return cls.parse(dict(fields, implementation=name or "auto"))


DEFAULT_CONFIG = AttentionConfig()  # immutable: what a call without a config uses


def _backend() -> str:
  return jax.default_backend()


def _cudnn_max_head_dim() -> int:
  try:
    capability = float(getattr(jax.devices()[0], "compute_capability", "0"))
  except (TypeError, ValueError):
    capability = 0.0
  return 256 if capability >= 9.0 else 128


def _unsupported(name: str, q, k, mask, backend: str) -> str | None:
  """Why `name` cannot run this call (None if it can)."""
  d = q.shape[-1]
  if name == "cudnn":
    if backend != "gpu":
      return f"cuDNN attention needs a GPU (backend is {backend})"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      return f"cuDNN attention needs bf16/fp16 inputs, got {q.dtype}"
    if d % 8 or d > _cudnn_max_head_dim():
      return f"cuDNN attention needs a head size that is a multiple of 8 and <= {_cudnn_max_head_dim()}, got {d}"
    if k.shape[-1] != d:
      return "cuDNN attention needs equal q/k head sizes"
  if name == "splash" and mask is not None:
    if isinstance(mask, jax.core.Tracer):
      return "splash attention needs a concrete (numpy) mask, not a traced one"
    shape = (1,) * (4 - np.ndim(mask)) + np.shape(mask)
    if shape[0] != 1:
      return "splash attention needs a mask shared by the batch (leading size 1)"
  return None


def select_implementation(q, k, *, mask=None, implementation: str | None = None,
                          backend: str | None = None, config: AttentionConfig | None = None) -> str:
  """The implementation `dot_product_attention` uses for these arguments (see the module docstring)."""
  config = config or DEFAULT_CONFIG
  backend = backend or _backend()
  name = _canonical(implementation)
  if name is not None:
    reason = _unsupported(name, q, k, mask, backend)
    if reason:
      raise ValueError(f"attention implementation {name!r}: {reason}")
    return name
  lq, lk = q.shape[1], k.shape[1]
  if max(lq, lk) <= config.plain_max_tokens:
    return "xla"
  name = _canonical(config.implementation)
  if name is not None and _unsupported(name, q, k, mask, backend) is None:
    return name
  if backend == "tpu" and mask is None:
    return "splash"
  if backend == "gpu" and mask is None and _unsupported("cudnn", q, k, None, backend) is None:
    return "cudnn"
  if backend == "cpu":
    return "chunked"  # cache-sized blocks: faster than the plain path at every length > 64 measured
  b, n = q.shape[0], q.shape[2]
  return "chunked" if b * n * lq * lk * 4 > config.chunk_threshold_bytes else "xla"


def dot_product_attention(q, k, v, *, mask=None, implementation: str | None = None,
                          config: AttentionConfig | None = None):
  """Softmax attention. q `(B, Lq, N, D)`, k/v `(B, Lk, N, D)` -> `(B, Lq, N, D)` in q's dtype.

  mask: optional boolean, broadcastable to `(B, N, Lq, Lk)`; True means "may attend".
  implementation: None (the config's choice, see the module docstring) or one of "xla", "chunked",
  "cudnn", "splash"/"flash". config: the kernel settings (None: `DEFAULT_CONFIG`, automatic).
  The softmax is computed in float32 whatever the input dtype.
  """
  config = config or DEFAULT_CONFIG
  name = select_implementation(q, k, mask=mask, implementation=implementation, config=config)
  scale = 1.0 / math.sqrt(q.shape[-1])
  if name in ("xla", "chunked") and _backend() == "cpu":
    if name == "xla" and max(q.shape[1], k.shape[1]) <= _CPU_BROADCAST_MAX_TOKENS:
      return _short(q, k, v, mask, scale)
    group, q_chunk, k_chunk = chunk_plan(q.shape[0] * q.shape[2], q.shape[1], k.shape[1], config=config)
    if mask is None and q_chunk == q.shape[1] and k_chunk == k.shape[1]:
      return blocks_attention(_f32(q), _f32(k), _f32(v), scale, group).astype(q.dtype)
  if name == "xla":
    return _plain(q, k, v, mask, scale)
  if name == "chunked":
    return _chunked(q, k, v, mask, scale, config=config)
  if name == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
  return _splash(q, k, v, mask, scale, config=config)


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _plain(q, k, v, mask, scale):
  """All logits at once (fp32), softmax in fp32. A `jax.checkpoint`: the backward pass recomputes the
  logits from q/k/v instead of storing `(B, N, Lq, Lk)` probabilities per attention layer.

  Normalisation is deferred: the second matmul takes exp(s - max) and its `(.., Lq, D)` result is divided
  by the row sums, one pass over the `(B, N, Lq, Lk)` block fewer than normalising the probabilities.
  The 1/sqrt(D) scale is folded into the exponent; q/k/v are made head-major first (XLA:CPU's batched
  matmul is ~2x faster on contiguous heads).
  """
  qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, N, L, D)
  s = jnp.einsum("bnqd,bnkd->bnqk", qh, kh, preferred_element_type=jnp.float32)
  if mask is not None:
    s = jnp.where(mask, s, _NEG)
  p = jnp.exp((s - s.max(axis=-1, keepdims=True)) * scale)
  out = jnp.einsum("bnqk,bnkd->bnqd", p.astype(v.dtype), vh, preferred_element_type=jnp.float32)
  return (out / p.sum(axis=-1)[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)


# ------------------------------------------------------------------------------------ short sequences (CPU)
# The temporal attention runs over 16-32 frames for each of thousands of pixels. XLA:CPU runs thousands of
# tiny batched matmuls ~3x slower than one fused broadcast-multiply-reduce over `(B, Lq, Lk, N, D)`. The
# forward fuses into reductions that never materialise that 5-D product; autodiff of it does not (XLA kept
# 16x-logits-sized products alive from the forward to the backward: 730 MiB of the tiny UNet's 16-frame
# training step). So the gradient is written by hand, in forms XLA fuses, and keeps only q, k, v, the
# output and the fp32 log-sum-exp `(B, Lq, N)`: no probabilities, no products.

def _f32(x):
  return x.astype(jnp.float32)


def _short_logits(q, k, mask, scale):
  """Scaled fp32 logits `(B, Lq, Lk, N)`, masked."""
  s = jnp.sum(_f32(q)[:, :, None] * _f32(k)[:, None], axis=-1) * scale
  return s if mask is None else jnp.where(_mask4(mask).transpose(0, 2, 3, 1), s, _NEG)


def _short_forward(q, k, v, mask, scale):
  s = _short_logits(q, k, mask, scale)
  s_max = s.max(axis=2, keepdims=True)
  e = jnp.exp(s - s_max)
  row_sum = e.sum(axis=2)  # (B, Lq, N)
  out = jnp.sum(e[..., None] * _f32(v)[:, None], axis=2) / row_sum[..., None]  # (B, Lq, N, D)
  return out.astype(q.dtype), s_max[:, :, 0] + jnp.log(row_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _short(q, k, v, mask, scale):
  """Softmax attention for short sequences as broadcast-multiply-reduce, all fp32 inside."""
  return _short_forward(q, k, v, mask, scale)[0]


def _short_fwd(q, k, v, mask, scale):
  out, lse = _short_forward(q, k, v, mask, scale)
  return out, (q, k, v, mask, out, lse)


def _short_bwd(scale, residuals, g):
  # The barrier makes the backward's broadcasts of q/k/v distinct from the forward's: XLA would otherwise
  # merge the identical `(B, Lq, Lk, N, D)` broadcasts (CSE) and keep them materialised from the forward
  # until the backward.
  q, k, v, mask, out, lse = residuals
  q, k, v, out, lse, g = jax.lax.optimization_barrier((q, k, v, out, lse, g))
  g = _f32(g)
  p = jnp.exp(_short_logits(q, k, mask, scale) - lse[:, :, None])  # (B, Lq, Lk, N)
  dp = jnp.sum(g[:, :, None] * _f32(v)[:, None], axis=-1)  # (B, Lq, Lk, N)
  ds = p * (dp - jnp.sum(g * _f32(out), axis=-1)[:, :, None]) * scale  # softmax backward
  # Each product below is reduced over its last axis (a query or key axis moved there first): the
  # forms XLA:CPU fuses into one reduction without materialising the 5-D product.
  minor = lambda x, axis: jnp.moveaxis(_f32(x), axis, -1)
  dv = jnp.sum(minor(p, 1)[..., None, :] * minor(g, 1)[:, None], axis=-1)  # (B, Lk, N, D)
  dq = jnp.sum(minor(ds, 2)[..., None, :] * minor(k, 1)[:, None], axis=-1)  # (B, Lq, N, D)
  dk = jnp.sum(minor(ds, 1)[..., None, :] * minor(q, 1)[:, None], axis=-1)  # (B, Lk, N, D)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_short.defvjp(_short_fwd, _short_bwd)


# ----------------------------------------------------------------------------------------------- chunked

_NEG = float(np.finfo(np.float32).min)


def _mask4(mask):
  """A boolean mask as 4-D `(Bm, Nm, Lqm, Lkm)` with each axis 1 or full size."""
  mask = jnp.asarray(mask, bool)
  return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def _pad_axis(x, axis: int, size: int, value=0):
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _divisor_at_most(n: int, limit: int, *, multiple: int = 1) -> int:
  """The largest divisor of n that is <= limit (and a multiple of `multiple` if one exists), else limit
  rounded down to `multiple` (then n gets padded)."""
  limit = max(1, min(n, limit))
  for c in range(limit, 0, -1):
    if n % c == 0 and (c % multiple == 0 or c == n):
      if c * 2 > limit or c == n:  # do not accept a divisor much smaller than the target
        return c
      break
  return max(multiple, limit // multiple * multiple) if limit >= multiple else limit


def chunk_plan(pairs: int, lq: int, lk: int, chunk_bytes: int | None = None,
               config: AttentionConfig | None = None) -> tuple[int, int, int]:
  """(pairs per group, query chunk, key chunk) for `pairs` = B*N (batch, head) pairs, so that one block of
  fp32 logits (group x query chunk x key chunk) is about `chunk_bytes` (default: the config's, else per
  backend)."""
  config = config or DEFAULT_CONFIG
  budget = max(1, (chunk_bytes or _default_chunk_bytes(config)) // 4)
  k_chunk = lk
  if lk * config.min_query_chunk > budget and lk > config.key_chunk:
    k_chunk = config.key_chunk  # even a few queries against all keys are too many: online softmax
  q_chunk = _divisor_at_most(lq, max(config.min_query_chunk, budget // k_chunk), multiple=8)
  group = _divisor_at_most(pairs, max(1, budget // (q_chunk * k_chunk)))
  return group, q_chunk, min(k_chunk, lk)


def _default_chunk_bytes(config: AttentionConfig) -> int:
  if config.chunk_bytes is not None:
    return config.chunk_bytes
  # CPU: a block that stays in L2 is what makes chunking faster than the plain path there.
  return (2 << 20) if _backend() == "cpu" else (256 << 20)


def _chunked(q, k, v, mask, scale, *, q_chunk: int | None = None, k_chunk: int | None = None,
             group: int | None = None, config: AttentionConfig | None = None):
  """Exact attention one `(group, q_chunk, k_chunk)` block of fp32 logits at a time.

  The B*N (batch, head) pairs are processed `group` at a time (`lax.map`), each group's queries in chunks
  (`lax.map`); when `k_chunk < Lk` each query chunk runs an online softmax over key chunks (`lax.scan`;
  running max, running sum and rescaled accumulator in fp32). Odd lengths are padded: padded queries are
  dropped, padded keys masked. The query-chunk body is a `jax.checkpoint`, so the backward pass keeps
  q/k/v instead of probabilities.
  """
  b, lq, n, d = q.shape
  lk, dv = k.shape[1], v.shape[-1]
  pairs = b * n
  plan = chunk_plan(pairs, lq, lk, config=config)
  group = min(group or plan[0], pairs)
  q_chunk = min(q_chunk or plan[1], lq)
  k_chunk = min(k_chunk or plan[2], lk)
  n_groups, nq, nk = -(-pairs // group), -(-lq // q_chunk), -(-lk // k_chunk)
  pairs_pad, lq_pad, lk_pad = n_groups * group, nq * q_chunk, nk * k_chunk

  def head_major(x, length):  # (B, L, N, D) -> (groups, group, L_pad, D)
    x = x.transpose(0, 2, 1, 3).reshape(pairs, x.shape[1], x.shape[3])
    x = _pad_axis(_pad_axis(x, 0, pairs_pad), 1, length)
    return x.reshape(n_groups, group, length, x.shape[-1])

  qh, kh, vh = head_major(q, lq_pad), head_major(k, lk_pad), head_major(v, lk_pad)
  m = None if mask is None else _mask4(mask)
  if lk_pad != lk:  # padded keys must never be attended to
    valid = jnp.arange(lk_pad) < lk
    m = valid[None, None, None] if m is None else (
        _pad_axis(jnp.broadcast_to(m, (*m.shape[:3], lk)), 3, lk_pad, False) & valid)
  if m is not None and m.shape[2] != 1:
    m = _pad_axis(m, 2, lq_pad, True)

  def group_mask(g):
    """The mask rows of group g: `(group or 1, Lqm, Lkm)`."""
    if m.shape[0] == 1 and m.shape[1] == 1:
      return m[0]
    p = jnp.minimum(g * group + jnp.arange(group), pairs - 1)
    return m[p // n if m.shape[0] > 1 else 0, p % n if m.shape[1] > 1 else 0]

  def slice_mask(mg, axis, start, size):
    return mg if mg.shape[axis] == 1 else jax.lax.dynamic_slice_in_dim(mg, start, size, axis)

  def logits(qc, kc, mc):  # (G, qc, D) x (G, kc, D) -> (G, qc, kc) fp32, masked
    s = jnp.einsum("gqd,gkd->gqk", qc, kc, preferred_element_type=jnp.float32)
    return s if mc is None else jnp.where(mc, s, _NEG)

  def one_group(args):
    g, qg, kg, vg = args
    mg = None if m is None else group_mask(g)

    @jax.checkpoint
    def one_query_chunk(j):
      qc = jax.lax.dynamic_slice_in_dim(qg, j * q_chunk, q_chunk, 1)
      mq = None if mg is None else slice_mask(mg, 1, j * q_chunk, q_chunk)
      if nk == 1:
        s = logits(qc, kg, mq)
        p = jnp.exp((s - s.max(axis=-1, keepdims=True)) * scale)
        o = jnp.einsum("gqk,gkd->gqd", p.astype(vg.dtype), vg, preferred_element_type=jnp.float32)
        return o / p.sum(axis=-1)[..., None]

      def step(carry, i):
        run_max, run_sum, acc = carry
        kc = jax.lax.dynamic_slice_in_dim(kg, i * k_chunk, k_chunk, 1)
        vc = jax.lax.dynamic_slice_in_dim(vg, i * k_chunk, k_chunk, 1)
        s = logits(qc, kc, None if mq is None else slice_mask(mq, 2, i * k_chunk, k_chunk))
        new_max = jnp.maximum(run_max, s.max(axis=-1))
        correction = jnp.exp((run_max - new_max) * scale)
        p = jnp.exp((s - new_max[..., None]) * scale)
        acc = acc * correction[..., None] + jnp.einsum(
            "gqk,gkd->gqd", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32)
        return (new_max, run_sum * correction + p.sum(axis=-1), acc), None

      init = (jnp.full((group, q_chunk), _NEG, jnp.float32), jnp.zeros((group, q_chunk), jnp.float32),
              jnp.zeros((group, q_chunk, dv), jnp.float32))
      (_, run_sum, acc), _ = jax.lax.scan(step, init, jnp.arange(nk))
      return acc / run_sum[..., None]

    out = jax.lax.map(one_query_chunk, jnp.arange(nq))  # (nq, G, qc, Dv)
    return out.swapaxes(0, 1).reshape(group, lq_pad, dv)

  out = jax.lax.map(one_group, (jnp.arange(n_groups), qh, kh, vh))  # (groups, G, Lq_pad, Dv)
  out = out.reshape(pairs_pad, lq_pad, dv)[:pairs, :lq].reshape(b, n, lq, dv).transpose(0, 2, 1, 3)
  return out.astype(q.dtype)


# ------------------------------------------------------------------------------------------------ splash

def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _block(length: int) -> int:
  """The largest of 512/256/128 dividing `length` (a multiple of 128)."""
  return next(b for b in (512, 256, 128) if length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, lq: int, lk: int, mask_bytes: bytes | None, interpret: bool):
  """A splash kernel for `(heads, Lq, Lk)` padded to multiples of 128; `mask_bytes` a packed `(heads, Lq,
  Lk)` boolean mask or None. Cached: building the block-sparsity tables is numpy work at trace time."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  lq_pad, lk_pad = _round_up(lq, _LANES), _round_up(lk, _LANES)
  full = np.zeros((heads, lq_pad, lk_pad), bool)
  full[:, :, :lk] = True  # padded keys masked; padded queries attend to the real keys (and are dropped)
  if mask_bytes is not None:
    full[:, :lq, :lk] = np.unpackbits(np.frombuffer(mask_bytes, np.uint8))[:heads * lq * lk].reshape(
        heads, lq, lk).astype(bool)
  bq, bk = _block(lq_pad), _block(lk_pad)
  blocks = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                         block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  mask = sa.MultiHeadMask([sa.NumpyMask(m) for m in full])
  return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, mask, scale, *, config: AttentionConfig):
  """Pallas splash attention: `(B, L, N, D)` -> kernel layout `(B, N, L, D)` padded to 128s, and back."""
  b, lq, n, d = q.shape
  lk = k.shape[1]
  d_pad, lq_pad, lk_pad = _round_up(d, _LANES), _round_up(lq, _LANES), _round_up(lk, _LANES)
  mask_bytes = None
  if mask is not None:
    user = np.asarray(mask, bool)
    user = user.reshape((1,) * (4 - user.ndim) + user.shape)[0]  # the batch axis has size 1
    mask_bytes = np.packbits(np.broadcast_to(user, (n, lq, lk))).tobytes()
  interpret = config.splash_interpret if config.splash_interpret is not None else _backend() != "tpu"
  kernel = _splash_kernel(n, lq, lk, mask_bytes, interpret)

  def prep(x, length):  # zero-padding the head size leaves q.k unchanged and adds zero output columns
    return _pad_axis(_pad_axis(x, 3, d_pad), 1, length).transpose(0, 2, 1, 3)

  # The kernel does not scale the logits: scale q in fp32 before the (possible) cast back.
  qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
  out = jax.vmap(kernel)(prep(qs, lq_pad), prep(k, lk_pad), prep(v, lk_pad))
  return out.transpose(0, 2, 1, 3)[:, :lq, :, :d].astype(q.dtype)


# ------------------------------------------------------------------------------------------------ module

class Attention(nnx.Module):
  """Multi-head attention with diffusers' parameter names (to_q, to_k, to_v, to_out).

  x `(B, L, C)`, context `(B, T, Dc)` or None for self-attention -> `(B, L, C)`.

  Static attributes (part of the graphdef, so `jit` sees them): `attention_config` (the kernel choice,
  from the model's config), `variant` and `variant_options` (what runs between the projections and
  `to_out`, see `vcjax.nn.attention_variants`; set with `set_attention`, never by the call).
  """

  def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, qkv_bias: bool = False,
               out_bias: bool = True, attention_config: AttentionConfig | None = None, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    context_dim = context_dim or dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.heads = heads
    self.attention_config = attention_config or DEFAULT_CONFIG
    self.variant = "default"
    self.variant_options: tuple = ()
    self.to_q = Linear(dim, dim, use_bias=qkv_bias, **kw)
    self.to_k = Linear(context_dim, dim, use_bias=qkv_bias, **kw)
    self.to_v = Linear(context_dim, dim, use_bias=qkv_bias, **kw)
    self.to_out = Linear(dim, dim, use_bias=out_bias, **kw)

  def split_heads(self, x):
    return x.reshape(*x.shape[:-1], self.heads, x.shape[-1] // self.heads)

  def __call__(self, x, context=None, *, mask=None, implementation: str | None = None,
               frames: int | None = None):
    """frames: how many frames each batch element folded into the leading axis of x (the spatial
    transformer's `(B*F, L, C)` tokens; None where tokens are not frames). Layout information read off
    the shapes by the caller, for variants that mix frames (PISA)."""
    context = x if context is None else context
    q = self.split_heads(self.to_q(x))
    k = self.split_heads(self.to_k(context))
    v = self.split_heads(self.to_v(context))
    attend = functools.partial(dot_product_attention, mask=mask, implementation=implementation,
                               config=self.attention_config)
    out = variants.VARIANTS[self.variant].fn(q, k, v, attend=attend, frames=frames,
                                             **dict(self.variant_options))
    return self.to_out(out.reshape(*out.shape[:-2], -1))


def attention_layers(model: nnx.Module, where: str = variants.ALL) -> list[tuple[str, Attention]]:
  """(dotted module path, layer) of every `Attention` in `model` whose path matches the regex `where`
  (`re.search`; "" = every layer, `model` itself included when it is one)."""
  pattern = re.compile(where)
  layers = []
  for path, node in nnx.iter_graph(model):
    name = ".".join(str(p) for p in path)
    if isinstance(node, Attention) and pattern.search(name):
      layers.append((name, node))
  return layers


def _selection(variant: str, where: str | None) -> str:
  if variant not in variants.VARIANTS:
    raise ValueError(f"unknown attention variant {variant!r}; known: {sorted(variants.VARIANTS)}")
  return variants.VARIANTS[variant].where if where is None else where


def set_attention(model: nnx.Module, variant: str = "default", *, where: str | None = None,
                  **options) -> int:
  """Give the `Attention` layers of `model` selected by `where` (a regex on module paths; None: the
  variant's own selection, e.g. spatial attn1 for "pisa") the named variant, in place. `options`:
  static (hashable) keyword arguments of the variant function. Returns the number of layers set.

  Call it while setting a model up, not inside a jitted function on a module that outlives the call
  (the variant is part of the graphdef); for a per-call change use `with_attention`.
  """
  opts = tuple(sorted(options.items()))
  hash(opts)  # static: must be hashable, or jit could not key its cache on it
  layers = attention_layers(model, _selection(variant, where))
  for _, layer in layers:
    layer.variant, layer.variant_options = variant, opts
  return len(layers)


def with_attention(model: nnx.Module, variant: str, *, where: str | None = None, **options) -> nnx.Module:
  """`model` with `variant` set (see `set_attention`), leaving `model` itself unchanged: `model` when
  its layers already have it, else a clone sharing its arrays (so gradients still flow to them). Safe
  inside traced code: the caller's module, and so its graphdef, is never modified."""
  opts = tuple(sorted(options.items()))
  selected = attention_layers(model, _selection(variant, where))
  if all(layer.variant == variant and layer.variant_options == opts for _, layer in selected):
    return model
  model = nnx.clone(model)
  set_attention(model, variant, where=where, **options)
  return model
