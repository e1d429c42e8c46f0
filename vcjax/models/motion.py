"""The AnimateDiff motion module: a transformer over the frame axis, one per spatial position.

Names follow diffusers' AnimateDiffTransformer3D (norm, proj_in, transformer_blocks.i.{attn1, attn2, ff},
proj_out); the original checkpoints' names are mapped onto them in vcjax/weights/motion_keys.py.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax import parallel
from vcjax.models.blocks import TransformerBlock, checkpointed
from vcjax.models.free_noise import FreeNoiseConfig, free_noise_block
from vcjax.nn.attention import AttentionConfig
from vcjax.nn.layers import GroupNorm, Linear


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
  """AnimateDiff's interleaved pe: pe[:, 0::2] = sin, pe[:, 1::2] = cos. `(length, dim)` float32."""
  position = np.arange(length, dtype=np.float32)[:, None]
  div_term = np.exp(np.arange(0, dim, 2, dtype=np.float32) * (-math.log(10000.0) / dim))
  pe = np.zeros((length, dim), np.float32)
  pe[:, 0::2] = np.sin(position * div_term)
  pe[:, 1::2] = np.cos(position * div_term)
  return pe


class MotionModule(nnx.Module):
  """Temporal transformer with residual. x `(B, F, H, W, C)` -> same shape.

  GroupNorm(eps 1e-6) with statistics per frame (original AnimateDiff) or across frames (diffusers),
  Linear proj_in, `depth` blocks of two temporal self-attentions + GEGLU FF with the sinusoidal pe added
  to the normed input of each attention, Linear proj_out, + x. Attention runs over F for every (b, h, w).

  proj_out starts at zero (AnimateDiff's zero_initialize): a freshly built module is the identity, so a
  motion module trained from scratch starts from the image model's output. zero_init_out=False keeps the
  random init (tests that want every weight to matter). Loaded weights overwrite it either way.
  remat: gradient checkpointing of the whole module (see `blocks.checkpointed`).
  free_noise: None, or FreeNoise's sliding windows over frames in every block (`models.free_noise`):
  then any number of frames runs, each window within the positional encoding.
  """

  def __init__(self, channels: int, heads: int, *, depth: int = 1, max_seq_length: int = 32, groups: int = 32,
               across_frames: bool = True, zero_init_out: bool = True,
               attention_config: AttentionConfig | None = None, remat: bool = False,
               free_noise: FreeNoiseConfig | None = None, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.max_seq_length = max_seq_length
    self.remat = remat
    self.free_noise = free_noise  # static: part of the graphdef
    self.norm = GroupNorm(groups, channels, epsilon=1e-6, across_frames=across_frames, param_dtype=param_dtype)
    self.proj_in = Linear(channels, channels, **kw)
    self.transformer_blocks = nnx.List(
        [TransformerBlock(channels, heads, None, attention_config=attention_config, **kw) for _ in range(depth)])
    self.proj_out = Linear(channels, channels, **kw)
    if zero_init_out:
      self.proj_out.kernel.set_value(jnp.zeros_like(self.proj_out.kernel.get_value()))
      self.proj_out.bias.set_value(jnp.zeros_like(self.proj_out.bias.get_value()))

  @checkpointed
  def __call__(self, x):
    b, f, hgt, wid, c = x.shape
    fn = self.free_noise
    window = f if fn is None else min(f, fn.context_length + fn.extra_frames)
    if window > self.max_seq_length:
      raise ValueError(f"{window} frames exceed the motion module's positional encoding length "
                       f"{self.max_seq_length}")
    h = self.proj_in(self.norm(x))
    h = h.transpose(0, 2, 3, 1, 4).reshape(b * hgt * wid, f, c)  # tokens (b h w) x f
    # Sequence parallelism: frames-split -> positions-split over "seq" (an all-to-all), and back below.
    h = parallel.constrain(h, "temporal_tokens", batch=b)
    if fn is None:
      pe = jnp.asarray(sinusoidal_positions(f, c), h.dtype)[None]
    else:  # a window's encoding: every window sees positions 0..L-1 (+ the extra frames')
      pe = jnp.asarray(sinusoidal_positions(fn.context_length + fn.extra_frames, c), h.dtype)
    for block in self.transformer_blocks:
      h = block(h, pos_embed=pe) if fn is None else free_noise_block(block, h, fn, pe)
    h = parallel.constrain(self.proj_out(h).reshape(b, hgt, wid, f, c).transpose(0, 3, 1, 2, 4), "video")
    return x + h
