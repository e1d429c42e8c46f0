"""FreeNoise at the scope of the whole UNet: each denoising step runs the UNet on sliding frame windows.

diffusers' FreeNoise (`vcjax.models.free_noise`, scope "motion") windows only the motion modules'
attention; every other layer still sees the whole video, so a step's activations grow with the video
length (bench/free_noise_memory.py measures it). With scope "unet" the UNet runs on one window of
`context_length` frames at a time (`lax.scan`: windows one after another), and each frame's noise prediction
is the weighted mean over the windows that hold it, with the window-position weights of FreeNoise's
`weighting_scheme`. What a step holds is then one window's activations plus the video's latents and
predictions `(B, F, h, w, 4)`: memory grows with the window, not with the length. This is the "context
window" sampling of AnimateDiff-Evolved / sd-webui-animatediff (there: "uniform" context), not a
computation diffusers has: the windows do not exchange anything inside the UNet (the motion modules'
GroupNorm sees one window), so it is not equal to scope "motion" beyond one window.

Windows: FreeNoise's starts, 0, stride, 2 stride, ... while a full window fits; if frames are left over,
one more window over the last `context_length` frames, whose frames all count with their own weights.
Per-frame context `(B, F + E, T, D)` (prompt travel) is windowed alike; its E extra frames (VideoMaker's
reference frame, `with_reference_frame`) join every window, as the reference latent does: each window is a
VideoMaker clip of `context_length` frames plus the reference.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vcjax.models.free_noise import FreeNoiseConfig, frame_weights, frame_windows


def window_starts(num_frames: int, length: int, stride: int) -> list[int]:
  """Start frames of the windows over `num_frames` frames (the last one flush with the end)."""
  if num_frames <= length:
    return [0]
  starts, tail = frame_windows(num_frames, length, stride)
  return starts + [num_frames - length] if tail else starts


def windowed_eps(eps_fn: Callable, latents, ctx, config: FreeNoiseConfig):
  """eps_fn(latents `(B, L, ...)`, ctx) -> `(B, L, ...)` over the windows of `config`, combined per frame.

  latents `(B, F, h, w, C)`; ctx `(B, T, D)` (shared by every window) or `(B, F + E, T, D)` per frame
  (E extra frames join every window). A video no longer than the window is one plain call."""
  f = latents.shape[1]
  length = config.context_length
  if f <= length:
    return eps_fn(latents, ctx)
  per_frame = ctx.ndim == 4
  extra = ctx[:, f:] if per_frame else None
  weights = jnp.asarray(frame_weights(length, config.weighting_scheme), jnp.float32)[None]  # (1, L)
  w = weights.reshape(1, length, *([1] * (latents.ndim - 2)))

  def add(carry, start):
    acc, total = carry
    x = jax.lax.dynamic_slice_in_dim(latents, start, length, axis=1)
    c = ctx
    if per_frame:
      c = jnp.concatenate([jax.lax.dynamic_slice_in_dim(ctx, start, length, axis=1), extra], axis=1)
    eps = eps_fn(x, c).astype(jnp.float32) * w
    acc = jax.lax.dynamic_update_slice_in_dim(acc, jax.lax.dynamic_slice_in_dim(acc, start, length, 1) + eps,
                                              start, axis=1)
    total = jax.lax.dynamic_update_slice_in_dim(
        total, jax.lax.dynamic_slice_in_dim(total, start, length, 1) + weights, start, axis=1)
    return (acc, total), None

  carry = (jnp.zeros(latents.shape, jnp.float32), jnp.zeros((1, f), jnp.float32))
  starts = jnp.asarray(window_starts(f, length, config.context_stride), jnp.int32)
  (acc, total), _ = jax.lax.scan(add, carry, starts)
  return (acc / total.reshape(1, f, *([1] * (latents.ndim - 2)))).astype(latents.dtype)
