"""Layers shared by the UNet, VAE and CLIP: Linear (LoRA-ready), Conv, GroupNorm with per-frame or
across-frames statistics, GEGLU feed-forward and the sinusoidal timestep embedding.

Parameter names follow flax (`kernel`, `bias`, `scale`); module attribute names follow diffusers, so
that weight conversion is a rename plus a layout transpose (see vcjax/weights/keymaps.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
  """y = x @ kernel + bias, kernel `(in, out)`. Computes in `dtype`.

  Optionally carries an unmerged low-rank adapter (attached by vcjax.nn.lora, never by the constructor):
  y += lora_scale * (x @ lora_down) @ lora_up, with lora_down `(in, r)` and lora_up `(r, out)` of type
  LoRAParam (not nnx.Param, so base-weight loading and saving never see them) and lora_scale a LoRAScale
  float32 scalar that can change between calls (or be traced) without touching the weights.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    bound = 1.0 / math.sqrt(in_features)  # torch.nn.Linear's default init, for look-alike random models.
    init = jax.nn.initializers.uniform(2 * bound)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype) - bound)
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
    self.dtype = dtype
    # LoRA slots: data attributes (so that variables may be assigned later), empty by default.
    self.lora_down = nnx.data(None)
    self.lora_up = nnx.data(None)
    self.lora_scale = nnx.data(None)

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_down is not None:
      xr = jnp.dot(x.astype(self.dtype), self.lora_down[...].astype(self.dtype))
      y = y + self.lora_scale[...].astype(self.dtype) * jnp.dot(xr, self.lora_up[...].astype(self.dtype))
    return y


class Conv(nnx.Module):
  """2-D convolution over the two axes before channels; any leading axes are batch. kernel HWIO.

  padding is torch's symmetric integer padding unless given as explicit ((lo, hi), (lo, hi)).
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, *, stride: int = 1,
               padding=None, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    if padding is None:
      padding = kernel_size // 2
    if isinstance(padding, int):
      padding = ((padding, padding), (padding, padding))
    self.padding = tuple(tuple(p) for p in padding)
    self.stride = stride
    self.dtype = dtype
    fan_in = in_features * kernel_size * kernel_size
    bound = 1.0 / math.sqrt(fan_in)  # torch.nn.Conv2d's default init.
    init = jax.nn.initializers.uniform(2 * bound)
    shape = (kernel_size, kernel_size, in_features, out_features)
    self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype) - bound)
    self.bias = nnx.Param(init(rngs.params(), (out_features,), param_dtype) - bound)

  def __call__(self, x):
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    out_h, out_w = (_conv_out_size(x.shape[1 + i], kernel.shape[i], self.stride, self.padding[i])
                    for i in (0, 1))
    if out_h * out_w <= SMALL_CONV_PIXELS:
      y = _conv_as_matmul(x, kernel, self.stride, self.padding, (out_h, out_w))
    else:
      y = jax.lax.conv_general_dilated(x, kernel, window_strides=(self.stride, self.stride),
                                       padding=self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y + self.bias[...].astype(self.dtype)
    return y.reshape(*lead, *y.shape[-3:])


# Convolutions with at most this many output pixels run as one matmul over the stacked kernel taps
# (im2col). XLA:CPU's convolution takes 750-850 ms for a 3x3 conv on 8 x 2x2 x 1280 channels (SD1.5's
# lowest level at 128x128 pixels) against 12 ms as a matmul; at 4x4 the two are even (bench/RESULTS.md).
# The stacked taps cost kernel-area times a tiny activation, on any backend.
SMALL_CONV_PIXELS = 16


def _conv_out_size(size: int, kernel: int, stride: int, padding: tuple[int, int]) -> int:
  return (size + padding[0] + padding[1] - kernel) // stride + 1


def _conv_as_matmul(x, kernel, stride: int, padding, out_size):
  """`(N, H, W, Cin)` x HWIO kernel -> `(N, out_h, out_w, Cout)`, the same sum as the convolution."""
  kh, kw, cin, cout = kernel.shape
  (out_h, out_w), s = out_size, stride
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  taps = [xp[:, i:i + s * (out_h - 1) + 1:s, j:j + s * (out_w - 1) + 1:s]
          for i in range(kh) for j in range(kw)]
  cols = jnp.concatenate(taps, axis=-1)  # (N, out_h, out_w, kh * kw * Cin), tap-major like the kernel
  return jnp.dot(cols, kernel.reshape(kh * kw * cin, cout))


class GroupNorm(nnx.Module):
  """GroupNorm on channels-last input, statistics in float32.

  x is `(B, F, H, W, C)` (video) or `(N, H, W, C)` (images). With `across_frames=False` each frame is
  normalised on its own (torch GroupNorm on `(B*F, C, H, W)`); with `across_frames=True` the statistics
  pool all frames of a video (torch GroupNorm on `(B, C, F, H, W)`). For `(N, L, C)` token input set
  `spatial_axes=1`.
  """

  def __init__(self, num_groups: int, num_channels: int, *, epsilon: float, across_frames: bool = False,
               spatial_axes: int = 2, param_dtype=jnp.float32):
    self.num_groups = num_groups
    self.epsilon = epsilon
    self.across_frames = across_frames
    self.spatial_axes = spatial_axes
    self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

  def __call__(self, x):
    dtype = x.dtype
    c = x.shape[-1]
    xg = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
    # Axes of xg to reduce: the spatial axes, the channels within a group, and frames if pooled.
    first = xg.ndim - 2 - self.spatial_axes - (1 if self.across_frames else 0)
    axes = tuple(range(first, xg.ndim - 2)) + (xg.ndim - 1,)
    mean = xg.mean(axis=axes, keepdims=True)
    var = jnp.square(xg - mean).mean(axis=axes, keepdims=True)
    xg = (xg - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = xg.reshape(x.shape) * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32 (torch.nn.LayerNorm semantics)."""

  def __init__(self, num_features: int, *, epsilon: float = 1e-5, param_dtype=jnp.float32):
    self.epsilon = epsilon
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dtype)


class GEGLUFeedForward(nnx.Module):
  """diffusers FeedForward with GEGLU: proj C -> 2*4C, value * gelu_exact(gate), out 4C -> C.

  Attribute names: `proj_in` is diffusers' `ff.net.0.proj`, `proj_out` is `ff.net.2`.
  """

  def __init__(self, dim: int, *, mult: int = 4, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    inner = dim * mult
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj_in = Linear(dim, 2 * inner, **kw)
    self.proj_out = Linear(inner, dim, **kw)

  def __call__(self, x):
    value, gate = jnp.split(self.proj_in(x), 2, axis=-1)
    return self.proj_out(value * jax.nn.gelu(gate, approximate=False))


def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0):
  """Sinusoidal embedding of (possibly fractional) timesteps `(B,)` -> `(B, dim)` float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb
