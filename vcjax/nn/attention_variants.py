"""Attention variants: what an `Attention` layer computes between its q/k/v projections and `to_out`.

The one hook point for changing attention (the analogue of diffusers' attention processors). Every
`vcjax.nn.attention.Attention` holds a static variant name; its `__call__` projects q/k/v, calls
`VARIANTS[name].fn`, and applies `to_out`. Which layers get a variant is chosen on the model tree:

    set_attention(unet, "start_token_detach")    # in place, at setup: Custom Diffusion's cross-attention
    unet = with_attention(unet, "pisa")          # a clone (arrays shared): VideoMaker's reference call

A variant is a function `fn(q, k, v, *, attend, frames, **options) -> out`:
  q `(N, Lq, H, D)`, k/v `(N, Lk, H, D)` (heads split), out `(N, Lq, H, Dv)`;
  attend(q, k, v): THE attention function, bound to the layer's kernel settings (`AttentionConfig`) and
    mask: variants never choose kernels, so every variant gets cuDNN / splash / chunked for free;
  frames: how many frames each batch element folded into N (given by the spatial transformer, read off
    the activations' shapes; None where tokens are not frames). PISA needs it to find the reference
    frame; deriving it from the shapes at every call, rather than storing it with the variant, means a
    UNet with PISA set is right for any clip length and nothing has to be set per call;
  options: the static keyword arguments given to `set_attention` (hashable; part of the graphdef).
and `where`, the regex on module paths that `set_attention` uses when the caller gives none.

Adding a variant: write its function here and add it to VARIANTS; then select it where a method sets up
its model (a config key, e.g. `detach_start_token`, calling `set_attention`). Nothing else changes.

Variants must keep the layer's parameters (the paths, so converted weights and LoRA names still apply).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

ALL = ""  # a `where` that selects every Attention layer
# The spatial transformers' blocks (down, mid, up), not the motion modules' (whose attn1/attn2 are both
# temporal self-attentions) nor the VAE's mid-block attention.
SPATIAL_ATTN1 = r"^(?!(.*\.)?motion_modules\.)(.*\.)?transformer_blocks\.\d+\.attn1$"
SPATIAL_ATTN2 = r"^(?!(.*\.)?motion_modules\.)(.*\.)?transformer_blocks\.\d+\.attn2$"


@dataclasses.dataclass(frozen=True)
class Variant:
  fn: Callable
  where: str  # default layer selection (regex on dotted module paths)


def default(q, k, v, *, attend, frames=None):
  """Plain softmax attention."""
  del frames
  return attend(q, k, v)


def start_token_detach(q, k, v, *, attend, frames=None):
  """Custom Diffusion's cross-attention: the key and value rows of context token 0 (start-of-text) carry
  no gradient, neither to the k/v projections (and their LoRA) nor to the text encoder; values unchanged.
  (stop_gradient on the context's token 0 alone would NOT do this: d(W c0)/dW = c0 is still non-zero;
  the k/v rows themselves must be detached.)"""
  del frames
  keep = (jnp.arange(k.shape[1]) > 0)[None, :, None, None]  # (1, T, 1, 1): False at token 0
  k = jnp.where(keep, k, jax.lax.stop_gradient(k))
  v = jnp.where(keep, v, jax.lax.stop_gradient(v))
  return attend(q, k, v)


def joint_frame_attention(q, k, v, num_frames: int, *, attend):
  """VideoMaker's Personalized Injection Self-Attention (PISA) on projected heads.

  q, k, v `(B*F', L, H, D)`, frames folded b-major, F' = video frames + 1, the reference image's latent
  LAST of every F' frames. Each video frame i attends jointly over `concat(frame_i, reference)` (frame
  first, 2L tokens, bidirectional). Returns `(B*F', L, H, D)`: rows of video frame i are the frame half
  of that attention; the reference's rows are the mean over i of the F reference halves.
  (The authors' processor applies `to_out` to all 2L tokens and then averages the reference halves;
  `to_out` is affine, so averaging before it — on half the tokens — is the same function.)
  Memory: the reference's k/v are repeated F times (token sets 2x the input), never F x F.
  """
  if num_frames is None or num_frames < 2:
    raise ValueError(f"PISA needs at least one video frame plus the reference, got num_frames={num_frames}")
  bf, length = q.shape[:2]
  if bf % num_frames:
    raise ValueError(f"PISA: leading dim {bf} is not a multiple of num_frames={num_frames}")
  b, f = bf // num_frames, num_frames - 1

  def pairs(x):  # (B*F', L, H, D) -> (B*F, 2L, H, D): [frame_i; ref] for every video frame i
    x = x.reshape(b, num_frames, *x.shape[1:])
    ref = jnp.broadcast_to(x[:, -1:], x[:, :-1].shape)
    return jnp.concatenate([x[:, :-1], ref], axis=2).reshape(b * f, 2 * length, *x.shape[3:])

  out = attend(pairs(q), pairs(k), pairs(v))
  out = out.reshape(b, f, 2 * length, *out.shape[2:])
  frames, ref = out[:, :, :length], out[:, :, length:]
  # Average in float32 so a low-precision compute dtype does not lose the small per-frame differences.
  ref = jnp.mean(ref.astype(jnp.float32), axis=1, keepdims=True).astype(out.dtype)
  return jnp.concatenate([frames, ref], axis=1).reshape(bf, length, *out.shape[3:])


def pisa(q, k, v, *, attend, frames):
  """PISA (see `joint_frame_attention`); `frames` counts the reference (video frames + 1)."""
  return joint_frame_attention(q, k, v, frames, attend=attend)


VARIANTS: dict[str, Variant] = {
    "default": Variant(default, ALL),
    "pisa": Variant(pisa, SPATIAL_ATTN1),  # METHODS.md §3: every spatial self-attention
    "start_token_detach": Variant(start_token_detach, SPATIAL_ATTN2),  # §4: text cross-attention
}
