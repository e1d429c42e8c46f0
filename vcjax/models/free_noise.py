"""FreeNoise (Qiu et al. 2023) in the motion module: temporal attention over sliding frame windows.

As diffusers' `FreeNoiseTransformerBlock` (what `AnimateDiffPipeline.enable_free_noise` swaps into every
motion module): for a video longer than the window, each temporal transformer block runs its two
self-attentions on windows of `context_length` frames starting every `context_stride` frames, with the
positional encoding of a `context_length`-frame clip in every window, and averages the windows' outputs
per frame with weights over the window's positions ("flat", "pyramid", "delayed_reverse_sawtooth"). The
feed-forward (per frame) then runs on the averaged frames. The motion module's GroupNorm, proj_in and
proj_out still see the whole video, as in diffusers.

A video whose length is not `context_length + k * context_stride` gets one more window, the last
`context_length` frames, that only adds to the frames no earlier window reached; diffusers counts each of
those frames with the weight of the window's position `context_length - k` (k: how many such frames),
not its own, and so does vcjax (only "flat" is unaffected).

The windows run one after another (`lax.scan`): what one window's attention holds (queries, keys, logits
`(positions, heads, L, L)`) is bounded by the window, whatever the video length; so is the feed-forward's
(run `context_length` frames at a time). The video's own activations `(N, F, C)` (and the rest of the
UNet's) still grow with the length.

The config is static: `UNet3DConfig.free_noise` (set with `reconfigure(unet, free_noise=...)`), held by
each `MotionModule`, so it is part of the graphdef and a compiled step keys its cache on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTING_SCHEMES = ("flat", "pyramid", "delayed_reverse_sawtooth")
NOISE_TYPES = ("shuffle_context", "repeat_context", "random")


@dataclasses.dataclass(frozen=True)
class FreeNoiseConfig:
  """diffusers' `enable_free_noise` arguments (and their defaults).

  extra_frames: frames after the video (VideoMaker's reference frame) that join EVERY window, after its
  `context_length` frames (so with the positional encoding of position `context_length`); their outputs
  are the plain mean over the windows. Set per call by `with_extra_frames`, not by users.
  noise_type: how the pipeline draws the initial noise (`vcjax.methods.long_video.initial_noise`); the UNet
  ignores it.
  """
  context_length: int = 16
  context_stride: int = 4
  weighting_scheme: str = "pyramid"
  noise_type: str = "shuffle_context"
  extra_frames: int = 0

  def __post_init__(self):
    for name in ("context_length", "context_stride"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"free_noise.{name} must be a positive integer, got {value!r}")
    if self.context_stride > self.context_length:
      raise ValueError(f"free_noise.context_stride {self.context_stride} exceeds context_length "
                       f"{self.context_length}: frames between the windows would be left out")
    if self.weighting_scheme not in WEIGHTING_SCHEMES:
      raise ValueError(f"free_noise.weighting_scheme must be one of {WEIGHTING_SCHEMES}, "
                       f"got {self.weighting_scheme!r}")
    if self.noise_type not in NOISE_TYPES:
      raise ValueError(f"free_noise.noise_type must be one of {NOISE_TYPES}, got {self.noise_type!r}")

  @classmethod
  def parse(cls, spec: "FreeNoiseConfig | Mapping[str, Any] | None") -> "FreeNoiseConfig | None":
    """From itself, a dict of fields (a saved model config, a CLI ConfigDict's to_dict()) or None (off).
    A dict with `enabled: False` is off; a `context_length` of None is diffusers' default (16)."""
    if spec is None or isinstance(spec, cls):
      return spec
    spec = dict(spec)
    if not spec.pop("enabled", True):
      return None
    unknown = sorted(set(spec) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown free_noise setting(s) {unknown}")
    if spec.get("context_length", 16) is None:
      spec.pop("context_length")
    return cls(**spec)


def frame_windows(num_frames: int, length: int, stride: int) -> tuple[list[int], int]:
  """diffusers' window starts over `num_frames` frames -> (starts of the full windows, k): k > 0 when the
  last `length` frames form one more window that only adds to its last k frames."""
  starts = list(range(0, num_frames - length + 1, stride))
  tail = num_frames - (starts[-1] + length)
  return starts, tail


def frame_weights(length: int, scheme: str) -> np.ndarray:
  """`(length,)` float32 weights of a window's positions (diffusers' `_get_frame_weights`)."""
  if scheme == "flat":
    weights = [1.0] * length
  elif scheme == "pyramid":
    mid = length // 2 if length % 2 == 0 else (length + 1) // 2
    rise = list(range(1, mid + 1))
    weights = rise + rise[::-1] if length % 2 == 0 else rise[:-1] + [mid] + rise[:-1][::-1]
  elif scheme == "delayed_reverse_sawtooth":
    if length % 2 == 0:
      mid = length // 2
      weights = [0.01] * (mid - 1) + [mid] + list(range(mid, 0, -1))
    else:  # diffusers' docstring's [0.01, 0.01, 3, 2, 1]; its code makes length + 1 weights (and fails)
      mid = (length + 1) // 2
      weights = [0.01] * (mid - 1) + list(range(mid, 0, -1))
  else:
    raise ValueError(f"unknown weighting scheme {scheme!r}; known: {WEIGHTING_SCHEMES}")
  return np.asarray(weights, np.float32)


def _attentions(block, x, pe):
  """The block's two temporal self-attentions with their residuals (TransformerBlock minus the FF)."""
  x = x + block.attn1(block.norm1(x) + pe)
  return x + block.attn2(block.norm2(x) + pe)


def free_noise_block(block, x, config: FreeNoiseConfig, positions):
  """One motion-module TransformerBlock with FreeNoise windows. x `(N, F + E, C)`: N = B*H*W tokens, F
  video frames, then E = `config.extra_frames` frames that join every window. positions: `(L + E, C)`
  the sinusoidal encoding of a window. -> `(N, F + E, C)`."""
  e = config.extra_frames
  f = x.shape[1] - e
  length = config.context_length
  if f <= length:  # one window: the plain block (diffusers requires f >= length; f == length is this)
    return block(x, pos_embed=positions[None, :f + e])
  starts, tail = frame_windows(f, length, config.context_stride)
  video, extra = x[:, :f], x[:, f:]
  pe = positions[None].astype(x.dtype)
  w = jnp.asarray(frame_weights(length, config.weighting_scheme), x.dtype)[None, :, None]

  def window(start):
    chunk = jax.lax.dynamic_slice_in_dim(video, start, length, axis=1)
    out = _attentions(block, jnp.concatenate([chunk, extra], axis=1), pe)
    return out[:, :length], out[:, length:]

  def add(carry, start):
    acc, count, extra_sum = carry
    out, out_extra = window(start)
    acc = jax.lax.dynamic_update_slice_in_dim(
        acc, jax.lax.dynamic_slice_in_dim(acc, start, length, axis=1) + out * w, start, axis=1)
    count = jax.lax.dynamic_update_slice_in_dim(
        count, jax.lax.dynamic_slice_in_dim(count, start, length, axis=1) + w[..., 0].astype(jnp.float32),
        start, axis=1)
    return (acc, count, extra_sum + out_extra), None

  carry = (jnp.zeros_like(video), jnp.zeros((1, f), jnp.float32), jnp.zeros_like(extra))
  (acc, count, extra_sum), _ = jax.lax.scan(add, carry, jnp.asarray(starts, jnp.int32))
  windows = len(starts)
  if tail:  # the last `length` frames: only its last `tail` frames add, counted with one weight (diffusers)
    out, out_extra = window(f - length)
    acc = acc.at[:, f - tail:].add(out[:, -tail:] * w[:, -tail:])
    count = count.at[:, f - tail:].add(w[0, length - tail, 0].astype(jnp.float32))
    extra_sum, windows = extra_sum + out_extra, windows + 1
  count = count[..., None]
  h = jnp.where(count > 0, acc / count, acc).astype(x.dtype)
  if e:
    h = jnp.concatenate([h, (extra_sum / windows).astype(x.dtype)], axis=1)
  # The FF is per token: run it a window's worth of frames at a time, so that its 8x-wide GEGLU activations
  # (the motion module's largest) are bounded by the window too. Same values as one call.
  return h + frame_chunks(lambda c: block.ff(block.norm3(c)), h, length)


def frame_chunks(fn, x, size: int):
  """`fn` on `(N, size, C)` frame chunks of x `(N, F, C)` one after another (`lax.map`; the remainder last),
  concatenated on frames."""
  n, f = x.shape[:2]
  k = f // size
  if k <= 1:
    return fn(x)
  main = jnp.moveaxis(x[:, :k * size].reshape(n, k, size, *x.shape[2:]), 1, 0)
  out = jnp.moveaxis(jax.lax.map(fn, main), 0, 1)
  out = out.reshape(n, k * size, *out.shape[3:])
  return jnp.concatenate([out, fn(x[:, k * size:])], axis=1) if f % size else out


def with_extra_frames(unet, frames: int):
  """`unet` whose motion modules treat the last `frames` frames as extras that join every FreeNoise window
  (VideoMaker's reference frame); `unet` itself when FreeNoise is off or already so. A clone sharing its
  arrays otherwise, so the caller's module (and graphdef) never changes."""
  from flax import nnx
  modules = [m for _, m in nnx.iter_graph(unet)
             if isinstance(m, nnx.Module) and getattr(m, "free_noise", None) is not None]
  if not modules or all(m.free_noise.extra_frames == frames for m in modules):
    return unet
  unet = nnx.clone(unet)
  extra = dataclasses.replace(unet.config.free_noise, extra_frames=frames)
  for _, m in nnx.iter_graph(unet):
    if not isinstance(m, nnx.Module):  # (the config is a node too)
      continue
    if getattr(m, "free_noise", None) is not None:
      m.free_noise = dataclasses.replace(m.free_noise, extra_frames=frames)
    if hasattr(m, "frame_chunk"):
      m.frame_chunk = frame_chunk(unet.config, extra)
  return unet


def set_free_noise(unet, config: FreeNoiseConfig | None) -> None:
  """Turn FreeNoise on (`config`) or off (None) on a built UNet3D, in place: its config and every motion
  module. Keeps attached LoRA and attention variants (unlike `configs.reconfigure`, which rebuilds)."""
  from flax import nnx
  for _, m in nnx.iter_graph(unet):
    if not isinstance(m, nnx.Module):
      continue
    if hasattr(m, "free_noise") and hasattr(m, "transformer_blocks"):
      m.free_noise = config
    if hasattr(m, "frame_chunk"):  # UNet3D's down / mid / up blocks
      m.frame_chunk = frame_chunk(unet.config, config)
  unet.config = dataclasses.replace(unet.config, free_noise=config)


def over_frames(fn, x, *shared, framed=(), size: int | None = None):
  """`fn(x, *shared, *framed)` for a per-frame block (resnet, spatial transformer, sampler), `size` frames at
  a time (`lax.map`, the remainder last) when FreeNoise bounds the video's memory: x `(B, F, ...)`; `framed`:
  arguments with frames on axis 1 too (per-frame context), chunked alike; `shared` go to every chunk. One
  call when size is None, the video is short, or sequence parallelism splits the frames across devices."""
  from vcjax import parallel
  b, f = x.shape[:2]
  if size is None or f <= size or parallel.seq_parallel_active():
    return fn(x, *shared, *framed)
  k = f // size
  split = lambda a: jnp.moveaxis(a[:, :k * size].reshape(b, k, size, *a.shape[2:]), 1, 0)
  out = jax.lax.map(lambda xs: fn(xs[0], *shared, *xs[1:]), (split(x), *map(split, framed)))
  out = jnp.moveaxis(out, 0, 1)
  out = out.reshape(b, k * size, *out.shape[3:])
  if f % size:
    out = jnp.concatenate([out, fn(x[:, k * size:], *shared, *(a[:, k * size:] for a in framed))], axis=1)
  return out


def frame_chunk(unet_config, free_noise: FreeNoiseConfig | None) -> int | None:
  """How many frames the UNet's per-frame blocks take at once under FreeNoise: a window's worth; None (all)
  without it, when its norms pool statistics over frames (original v1 semantics), or with extra frames
  (VideoMaker's PISA mixes every frame with the reference in spatial attention)."""
  if free_noise is None or free_noise.extra_frames or unet_config.resnet_norm_across_frames:
    return None
  return free_noise.context_length
