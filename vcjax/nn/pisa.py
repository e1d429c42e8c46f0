"""VideoMaker's Personalized Injection Self-Attention (PISA), as a replacement for spatial `attn1`.

The reference image's latent rides along as the LAST frame of the video. In every spatial self-attention,
each video frame i attends jointly over `concat(frame_i tokens, reference tokens)` (frame first, 2L tokens,
bidirectional, the layer's own q/k/v/out). The frame half of the result becomes the new frame i; the
reference half is computed once per video frame, and the F copies are averaged into the new reference.
(Authors' processor: F.scaled_dot_product_attention over `(b*f, 2L)` token sets, `to_out` applied to all
of them, then the mean of the reference halves; no residual or rescale, as in the stock attn1. `to_out` is
affine, so taking the mean before it — what is done here, on half the tokens — is the same function.)

Layout: the UNet folds frames into the batch b-major, so `h` is `(B*F', L, C)` with F' = video frames + 1
and the reference at index F'-1 of each batch element.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from vcjax.nn.attention import Attention, dot_product_attention


def joint_frame_attention(q, k, v, num_frames: int):
  """PISA on projected heads. q, k, v `(B*F', L, N, D)`, reference last of every F' frames.

  Returns `(B*F', L, N, D)`: rows of video frame i are the frame half of attention over
  `[frame_i; ref]`; the reference's rows are the mean over i of the reference halves.
  Memory: the reference's k/v are repeated F times (so the token sets are 2x the input), never F x F.
  """
  if num_frames < 2:
    raise ValueError(f"PISA needs at least one video frame plus the reference, got num_frames={num_frames}")
  bf, length = q.shape[:2]
  if bf % num_frames:
    raise ValueError(f"PISA: leading dim {bf} is not a multiple of num_frames={num_frames}")
  b, f = bf // num_frames, num_frames - 1

  def pairs(x):  # (B*F', L, N, D) -> (B*F, 2L, N, D): [frame_i; ref] for every video frame i
    x = x.reshape(b, num_frames, *x.shape[1:])
    ref = jnp.broadcast_to(x[:, -1:], x[:, :-1].shape)
    return jnp.concatenate([x[:, :-1], ref], axis=2).reshape(b * f, 2 * length, *x.shape[3:])

  out = dot_product_attention(pairs(q), pairs(k), pairs(v))
  out = out.reshape(b, f, 2 * length, *out.shape[2:])
  frames, ref = out[:, :, :length], out[:, :, length:]
  # Average in float32 so a low-precision compute dtype does not lose the small per-frame differences.
  ref = jnp.mean(ref.astype(jnp.float32), axis=1, keepdims=True).astype(out.dtype)
  return jnp.concatenate([frames, ref], axis=1).reshape(bf, length, *out.shape[3:])


def pisa_self_attention(num_frames: int) -> Callable[[Attention, jnp.ndarray], jnp.ndarray]:
  """The UNet3D `self_attention` hook for PISA.

  num_frames: frames per batch element INCLUDING the reference (video frames + 1).
  Returns `fn(attn1, h)`: h `(B*num_frames, L, C)` -> `(B*num_frames, L, C)`, using attn1's
  to_q / to_k / to_v / to_out (q/k/v are projected once for all frames, then paired).
  """
  if num_frames < 2:
    raise ValueError(f"PISA needs at least one video frame plus the reference, got num_frames={num_frames}")

  def self_attention(attn1: Attention, h):
    q = attn1.split_heads(attn1.to_q(h))
    k = attn1.split_heads(attn1.to_k(h))
    v = attn1.split_heads(attn1.to_v(h))
    out = joint_frame_attention(q, k, v, num_frames)
    return attn1.to_out(out.reshape(*out.shape[:-2], -1))

  return self_attention
