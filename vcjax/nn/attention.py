"""THE attention function of vcjax, and the projection module around it.

Every attention in every model (UNet spatial self/cross, PISA, temporal, VAE mid-block, CLIP) calls
`dot_product_attention`, so that fast kernels, sharding and method-specific variants change one place.

Layout convention: q, k, v are `(B, L, N, D)` (batch, tokens, heads, head size), as in
`jax.nn.dot_product_attention`.

Implementations (all compute the softmax in float32, whatever the input dtype):
  "xla"      plain: logits, softmax, weighted sum as XLA ops; materialises `(B, N, Lq, Lk)` logits.
  "chunked"  memory-efficient on any backend: queries in chunks (`lax.map`), and for long key sequences
             an online softmax over key chunks (`lax.scan`); each chunk is rematerialised in the backward
             pass, so neither pass holds more than one chunk of logits. Exact up to fp32 rounding.
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
  3. The global setting (`attention_implementation("chunked")` context manager, or `config.implementation`),
     when that implementation supports the call; otherwise rule 4.
  4. Automatic: TPU -> "splash" (without a mask); GPU -> "cudnn" (bf16/fp16, no mask, supported head
     size); otherwise "chunked" when the fp32 logits `B*N*Lq*Lk*4` would exceed `config.chunk_threshold_bytes`,
     else "xla".
The choice is made when the function is traced: change the setting before `jax.jit` traces the model
(a cached compiled function keeps the implementation it was traced with).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax.nn.layers import Linear

IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "splash")
_ALIASES = {"flash": "splash", "plain": "xla"}
_LANES = 128  # TPU kernels tile sequence and head axes in multiples of 128.


@dataclasses.dataclass
class AttentionConfig:
  """Process-wide attention settings (read at trace time).

  implementation: None (automatic) or one of IMPLEMENTATIONS, used where it supports the call.
  plain_max_tokens: sequences this short always take the plain "xla" path (unless a call names another).
  chunk_threshold_bytes: automatic selection chunks when the fp32 logits `B*N*Lq*Lk*4` exceed this.
  chunk_bytes: target size of one chunk of fp32 logits; sets the query chunk length.
  key_chunk: keys per online-softmax step when Lk is longer than this (and one query chunk of `min_query_chunk`
    queries against all keys would exceed `chunk_bytes`).
  min_query_chunk: the smallest query chunk.
  splash_interpret: run the splash kernel in Pallas interpret mode; None = only off TPU.
  """
  implementation: str | None = None
  plain_max_tokens: int = 64
  chunk_threshold_bytes: int = 256 << 20
  chunk_bytes: int = 32 << 20
  key_chunk: int = 1024
  min_query_chunk: int = 64
  splash_interpret: bool | None = None


config = AttentionConfig()


def _canonical(name: str | None) -> str | None:
  if name is None:
    return None
  name = _ALIASES.get(name, name)
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {name!r}; known: "
                     f"{IMPLEMENTATIONS + tuple(_ALIASES)}")
  return name


@contextlib.contextmanager
def attention_implementation(name: str | None, **options):
  """Temporarily set the global implementation (None = automatic) and any AttentionConfig field.

      with attention_implementation("chunked", chunk_bytes=8 << 20):
        out = jax.jit(model)(x)   # traced inside the block
  """
  global config
  previous = config
  config = dataclasses.replace(config, implementation=_canonical(name), **options)
  try:
    yield config
  finally:
    config = previous


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
                          backend: str | None = None) -> str:
  """The implementation `dot_product_attention` uses for these arguments (see the module docstring)."""
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
  name = config.implementation
  if name is not None and _unsupported(name, q, k, mask, backend) is None:
    return name
  if backend == "tpu" and mask is None:
    return "splash"
  if backend == "gpu" and mask is None and _unsupported("cudnn", q, k, None, backend) is None:
    return "cudnn"
  b, n = q.shape[0], q.shape[2]
  return "chunked" if b * n * lq * lk * 4 > config.chunk_threshold_bytes else "xla"


def dot_product_attention(q, k, v, *, mask=None, implementation: str | None = None):
  """Softmax attention. q `(B, Lq, N, D)`, k/v `(B, Lk, N, D)` -> `(B, Lq, N, D)` in q's dtype.

  mask: optional boolean, broadcastable to `(B, N, Lq, Lk)`; True means "may attend".
  implementation: None (automatic, see the module docstring) or one of "xla", "chunked", "cudnn",
  "splash"/"flash". The softmax is computed in float32 whatever the input dtype.
  """
  name = select_implementation(q, k, mask=mask, implementation=implementation)
  scale = 1.0 / math.sqrt(q.shape[-1])
  if name == "xla":
    return _plain(q, k, v, mask, scale)
  if name == "chunked":
    return _chunked(q, k, v, mask, scale)
  if name == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
  return _splash(q, k, v, mask, scale)


def _plain(q, k, v, mask, scale):
  """Logits `(B, N, Lq, Lk)` in fp32, softmax in fp32, weights cast to v's dtype for the second matmul."""
  logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnqk,bknd->bqnd", weights, v).astype(q.dtype)


# ----------------------------------------------------------------------------------------------- chunked

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


def _chunk_sizes(b: int, n: int, lq: int, lk: int) -> tuple[int, int]:
  """(query chunk, key chunk) so that one chunk of fp32 logits stays near `config.chunk_bytes`."""
  per_query = b * n * lk * 4
  q_chunk = config.chunk_bytes // max(per_query, 1)
  k_chunk = lk
  if q_chunk < config.min_query_chunk and lk > config.key_chunk:
    # Even a small query chunk against all keys is too big: online softmax over key chunks.
    k_chunk = config.key_chunk
    q_chunk = config.chunk_bytes // max(b * n * k_chunk * 4, 1)
  q_chunk = max(config.min_query_chunk, q_chunk)
  if q_chunk >= lq:
    return lq, k_chunk
  # Prefer a chunk that divides Lq (no padding), else a multiple of 8.
  for c in range(q_chunk, max(q_chunk // 2, 1) - 1, -1):
    if lq % c == 0:
      return c, k_chunk
  return max(8, q_chunk // 8 * 8), k_chunk


def _chunked(q, k, v, mask, scale, *, q_chunk: int | None = None, k_chunk: int | None = None):
  """Exact attention holding one `(B, N, q_chunk, k_chunk)` block of logits at a time.

  Queries are split into chunks mapped with `lax.map`; if `k_chunk < Lk` each query chunk runs an online
  softmax (running max, running sum, rescaled accumulator, all fp32) over key chunks. Odd lengths are
  padded: padded queries are dropped, padded keys masked. Each query chunk is a `jax.checkpoint`, so the
  backward pass stores q/k/v rather than the probabilities.
  """
  b, lq, n, d = q.shape
  lk = k.shape[1]
  auto_q, auto_k = _chunk_sizes(b, n, lq, lk)
  q_chunk = min(q_chunk or auto_q, lq)
  k_chunk = min(k_chunk or auto_k, lk)
  nq, nk = -(-lq // q_chunk), -(-lk // k_chunk)
  lq_pad, lk_pad = nq * q_chunk, nk * k_chunk

  m = None if mask is None else _mask4(mask)
  if lk_pad != lk:  # padded keys must never be attended to
    key_valid = jnp.arange(lk_pad) < lk
    if m is None:
      m = key_valid[None, None, None, :]
    else:
      m = _pad_axis(jnp.broadcast_to(m, (*m.shape[:3], lk)), 3, lk_pad, False) & key_valid
    k, v = _pad_axis(k, 1, lk_pad), _pad_axis(v, 1, lk_pad)
  q = _pad_axis(q, 1, lq_pad)
  qs = q.reshape(b, nq, q_chunk, n, d).swapaxes(0, 1)  # (nq, B, qc, N, D)
  mask_per_query = m is not None and m.shape[2] != 1
  if mask_per_query:
    m = _pad_axis(m, 2, lq_pad, True)
    ms = m.reshape(*m.shape[:2], nq, q_chunk, m.shape[3]).transpose(2, 0, 1, 3, 4)  # (nq, Bm, Nm, qc, Lkm)
  else:
    ms = jnp.zeros((nq,), bool)  # placeholder scanned alongside the queries

  neg = jnp.finfo(jnp.float32).min

  def logits(qc, kc, mc):
    """Masked fp32 logits `(B, N, qc, kc)` of one query chunk against one key chunk."""
    s = jnp.einsum("bqnd,bknd->bnqk", qc, kc, preferred_element_type=jnp.float32) * scale
    if mc is not None:
      s = jnp.where(mc, s, neg)
    return s

  @jax.checkpoint
  def one_query_chunk(args):
    qc, mq = args
    mq = mq if mask_per_query else m  # (Bm, Nm, qc or 1, Lkm) or None
    if nk == 1:
      s = logits(qc, k, mq)
      p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
      return jnp.einsum("bnqk,bknd->bqnd", p, v, preferred_element_type=jnp.float32)
    ks = k.reshape(b, nk, k_chunk, n, d).swapaxes(0, 1)
    vs = v.reshape(b, nk, k_chunk, n, v.shape[-1]).swapaxes(0, 1)
    if mq is not None and mq.shape[3] != 1:
      mks = mq.reshape(*mq.shape[:3], nk, k_chunk).transpose(3, 0, 1, 2, 4)
    else:
      mks = jnp.zeros((nk,), bool)

    def step(carry, xs):
      run_max, run_sum, acc = carry
      kc, vc, mk = xs
      mk = mk if (mq is not None and mq.shape[3] != 1) else mq
      s = logits(qc, kc, mk)  # (B, N, qc, kc)
      new_max = jnp.maximum(run_max, s.max(axis=-1))
      correction = jnp.exp(run_max - new_max)
      p = jnp.exp(s - new_max[..., None])
      run_sum = run_sum * correction + p.sum(axis=-1)
      pv = jnp.einsum("bnqk,bknd->bnqd", p.astype(v.dtype), vc, preferred_element_type=jnp.float32)
      acc = acc * correction[..., None] + pv
      return (new_max, run_sum, acc), None

    init = (jnp.full((b, n, q_chunk), neg, jnp.float32), jnp.zeros((b, n, q_chunk), jnp.float32),
            jnp.zeros((b, n, q_chunk, v.shape[-1]), jnp.float32))
    (_, run_sum, acc), _ = jax.lax.scan(step, init, (ks, vs, mks))
    return (acc / run_sum[..., None]).transpose(0, 2, 1, 3)

  out = jax.lax.map(one_query_chunk, (qs, ms))  # (nq, B, qc, N, Dv)
  out = out.swapaxes(0, 1).reshape(b, lq_pad, n, v.shape[-1])[:, :lq]
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


def _splash(q, k, v, mask, scale):
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

  def __call__(self, x, context=None, *, mask=None, implementation: str | None = None):
    context = x if context is None else context
    q = self.split_heads(self.to_q(x))
    k = self.split_heads(self.to_k(context))
    v = self.split_heads(self.to_v(context))
    out = dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return self.to_out(out.reshape(*out.shape[:-2], -1))
