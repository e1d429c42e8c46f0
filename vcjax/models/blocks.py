"""The per-frame (2-D) parts of the AnimateDiff UNet: resnet, spatial transformer, down/up samplers.

Every block takes video activations `(B, F, H, W, C)`; convolutions and attention treat frames as batch.
Attribute names mirror diffusers' UNetMotionModel so that checkpoints load by name.

Gradient checkpointing is a build-time choice (`UNet3DConfig.remat`): a block built with `remat=True` runs
its `__call__` under `nnx.remat` (only the block's inputs are kept; its activations are recomputed in the
backward pass). The flag is static, so it is part of the graphdef.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax import parallel
from vcjax.nn.attention import Attention, AttentionConfig
from vcjax.nn.layers import Conv, GEGLUFeedForward, GroupNorm, LayerNorm, Linear


def checkpointed(call):
  """Method decorator: run the block under `nnx.remat` when it was built with `remat=True`.

  Positional arguments are the block's arrays; keyword arguments (static settings) are closed over.
  """

  @functools.wraps(call)
  def wrapper(self, *args, **kwargs):
    if not self.remat:
      return call(self, *args, **kwargs)
    return nnx.remat(lambda module, *arrays: call(module, *arrays, **kwargs))(self, *args)

  return wrapper


class ResnetBlock(nnx.Module):
  """GroupNorm-SiLU-conv twice, the time embedding added in between; 1x1 conv shortcut if C changes.

  x `(B, F, H, W, Cin)`, temb `(B, Dt)` -> `(B, F, H, W, Cout)`. `across_frames` selects the norms'
  statistics (see GroupNorm).
  """

  def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, groups: int, eps: float,
               across_frames: bool, remat: bool = False, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.remat = remat
    norm_kw = dict(epsilon=eps, across_frames=across_frames, param_dtype=param_dtype)
    self.norm1 = GroupNorm(groups, in_channels, **norm_kw)
    self.conv1 = Conv(in_channels, out_channels, 3, **kw)
    self.time_emb_proj = Linear(temb_channels, out_channels, **kw)
    self.norm2 = GroupNorm(groups, out_channels, **norm_kw)
    self.conv2 = Conv(out_channels, out_channels, 3, **kw)
    self.conv_shortcut = Conv(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None

  @checkpointed
  def __call__(self, x, temb):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    return shortcut + h


class TransformerBlock(nnx.Module):
  """diffusers BasicTransformerBlock: pre-LN self-attention, cross-attention, GEGLU feed-forward.

  x `(N, L, C)`, context `(N, T, Dc)`. attn1 is self-attention; attn2 attends to `context`, or is a second
  self-attention when `cross_attention_dim` is None (the motion module's "double self-attention").
  `pos_embed`, if given, is added to the normed input of both attentions (AnimateDiff's temporal pe).
  """

  def __init__(self, dim: int, heads: int, cross_attention_dim: int | None, *,
               attention_config: AttentionConfig | None = None, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = LayerNorm(dim, epsilon=1e-5, param_dtype=param_dtype)
    self.attn1 = Attention(dim, heads, attention_config=attention_config, **kw)
    self.norm2 = LayerNorm(dim, epsilon=1e-5, param_dtype=param_dtype)
    self.attn2 = Attention(dim, heads, context_dim=cross_attention_dim, attention_config=attention_config, **kw)
    self.norm3 = LayerNorm(dim, epsilon=1e-5, param_dtype=param_dtype)
    self.ff = GEGLUFeedForward(dim, **kw)

  def __call__(self, x, context=None, *, pos_embed=None, frames: int | None = None):
    """frames: frames per batch element folded into x's leading axis, for the attention variants
    (see `Attention.__call__`); None for the motion module's `(positions, F, C)` tokens."""
    h = self.norm1(x)
    if pos_embed is not None:
      h = h + pos_embed
    x = x + self.attn1(h, frames=frames)
    h = self.norm2(x)
    if pos_embed is not None:
      h = h + pos_embed
    x = x + self.attn2(h, context, frames=frames)
    return x + self.ff(self.norm3(x))


class SpatialTransformer(nnx.Module):
  """diffusers Transformer2DModel applied to every frame: GroupNorm, proj_in, blocks, proj_out, residual.

  x `(B, F, H, W, C)`, context `(B, T, Dc)` (shared by all frames) or `(B, F, T, Dc)` (one per frame:
  prompt travel) -> `(B, F, H, W, C)`.
  proj_in/proj_out are 1x1 convolutions in SD1.5 and linears in SD2; both are a Linear on channels-last
  tokens (the weight loader reshapes 1x1 conv kernels).
  """

  def __init__(self, channels: int, heads: int, cross_attention_dim: int, *, depth: int = 1, groups: int,
               eps: float, attention_config: AttentionConfig | None = None, remat: bool = False,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.remat = remat
    self.norm = GroupNorm(groups, channels, epsilon=eps, param_dtype=param_dtype)
    self.proj_in = Linear(channels, channels, **kw)
    self.transformer_blocks = nnx.List(
        [TransformerBlock(channels, heads, cross_attention_dim, attention_config=attention_config, **kw)
         for _ in range(depth)])
    self.proj_out = Linear(channels, channels, **kw)

  @checkpointed
  def __call__(self, x, context):
    b, f, hgt, wid, c = x.shape
    x = parallel.constrain(x, "video")  # sequence parallelism: frames over the "seq" mesh axis
    h = self.proj_in(self.norm(x)).reshape(b * f, hgt * wid, c)
    h = parallel.constrain(h, "frame_tokens", batch=b)
    if context.ndim == 4:  # a prompt per frame, frames inner as in h: (B*F, T, Dc)
      ctx = context.reshape(b * f, *context.shape[2:])
    else:
      ctx = jnp.repeat(context, f, axis=0)  # frames share the prompt: (B*F, T, Dc)
    for block in self.transformer_blocks:
      h = block(h, ctx, frames=f)
    return x + self.proj_out(h).reshape(b, f, hgt, wid, c)


class Downsample(nnx.Module):
  """3x3 conv, stride 2, padding 1 (SD UNet). `(B, F, H, W, C)` -> `(B, F, H/2, W/2, C)`."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.conv = Conv(channels, channels, 3, stride=2, padding=1, rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype)

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2 (or to `size`) then 3x3 conv. `(..., H, W, C)` -> `(..., 2H, 2W, C)` or `size`.

  `size`: what diffusers' UNets pass as `upsample_size` when the latent is not a multiple of the UNet's overall
  factor (the stride-2 downsamplers rounded odd sizes up): the next skip connection's (h, w)."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.conv = Conv(channels, channels, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, size: tuple[int, int] | None = None):
    h, w = x.shape[-3:-1]
    if size is None or tuple(size) == (2 * h, 2 * w):
      x = jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
    else:
      x = jnp.take(jnp.take(x, nearest_indices(h, size[0]), axis=-3), nearest_indices(w, size[1]), axis=-2)
    return self.conv(x)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """Source rows of torch's `F.interpolate(mode="nearest", size=...)`: floor(i * in / out) in float32."""
  scale = np.float32(n_in / n_out)
  return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32), n_in - 1)
