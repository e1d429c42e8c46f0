"""The Stable Diffusion VAE (diffusers' AutoencoderKL) in Flax NNX, channels-last.

Attribute names mirror diffusers' state-dict names (encoder.down_blocks.0.resnets.0.conv1, ...,
encoder.mid_block.attentions.0.to_q, quant_conv, post_quant_conv, decoder.up_blocks.0.upsamplers.0.conv),
so `vcjax.weights.keymaps.load_state_dict` loads a diffusers checkpoint without extra renames.

Architecture facts (diffusers Encoder / Decoder):
  * every GroupNorm has eps 1e-6 (resnets, mid-block attention, conv_norm_out);
  * resnet: norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a 1x1 conv_shortcut when the
    channel count changes; no time embedding;
  * downsample: zero-pad right and bottom by one, then a 3x3 stride-2 conv with no padding;
  * upsample: nearest-neighbour x2, then a 3x3 conv;
  * mid block: resnet, single-head self-attention over the H*W tokens (GroupNorm first, q/k/v with bias,
    residual), resnet;
  * the encoder outputs 2*latent channels (mean, logvar), passed through a 1x1 quant_conv; the decoder
    starts with a 1x1 post_quant_conv.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vcjax.models.configs import VAEConfig
from vcjax.nn.attention import Attention
from vcjax.nn.layers import Conv, GroupNorm

_NORM_EPS = 1e-6
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0  # diffusers' DiagonalGaussianDistribution clamp.


def _dtypes(config: VAEConfig):
  return jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)


class ResnetBlock(nnx.Module):
  """diffusers ResnetBlock2D without time embedding. x `(N, H, W, Cin)` -> `(N, H, W, Cout)`."""

  def __init__(self, in_channels: int, out_channels: int, groups: int, *, rngs: nnx.Rngs, dtype,
               param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = GroupNorm(groups, in_channels, epsilon=_NORM_EPS, param_dtype=param_dtype)
    self.conv1 = Conv(in_channels, out_channels, 3, **kw)
    self.norm2 = GroupNorm(groups, out_channels, epsilon=_NORM_EPS, param_dtype=param_dtype)
    self.conv2 = Conv(out_channels, out_channels, 3, **kw)
    self.conv_shortcut = Conv(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class MidAttention(Attention):
  """The VAE mid-block attention: GroupNorm, one head over all H*W tokens, residual.

  x `(N, H, W, C)` -> `(N, H, W, C)`. The projections and `dot_product_attention` come from the shared
  `Attention`; diffusers keeps the norm in the same module, hence `group_norm` here.
  """

  def __init__(self, channels: int, groups: int, *, attention_config=None, rngs: nnx.Rngs, dtype, param_dtype):
    super().__init__(channels, 1, qkv_bias=True, out_bias=True, attention_config=attention_config, rngs=rngs,
                     dtype=dtype, param_dtype=param_dtype)
    self.group_norm = GroupNorm(groups, channels, epsilon=_NORM_EPS, param_dtype=param_dtype)

  def __call__(self, x):
    n, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(n, h * w, c)
    return x + super().__call__(tokens).reshape(n, h, w, c)


class MidBlock(nnx.Module):
  """diffusers UNetMidBlock2D as used by the VAE: resnets.0, attentions.0, resnets.1."""

  def __init__(self, channels: int, groups: int, *, attention_config=None, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, **kw) for _ in range(2)])
    self.attentions = nnx.List([MidAttention(channels, groups, attention_config=attention_config, **kw)])

  def __call__(self, x):
    x = self.resnets[0](x)
    x = self.attentions[0](x)
    return self.resnets[1](x)


class Downsample(nnx.Module):
  """Pad (0, 1) on H and W, then a 3x3 stride-2 conv with no padding (diffusers Downsample2D, padding 0)."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.conv = Conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype)

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then a 3x3 conv (diffusers Upsample2D)."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.conv = Conv(channels, channels, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
    return self.conv(x)


class DownBlock(nnx.Module):
  """diffusers DownEncoderBlock2D: `num_layers` resnets, then an optional downsampler."""

  def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool,
               *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List([
        ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, **kw)
        for i in range(num_layers)])
    self.downsamplers = nnx.List([Downsample(out_channels, **kw)]) if add_downsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    return x


class UpBlock(nnx.Module):
  """diffusers UpDecoderBlock2D: `num_layers` resnets, then an optional upsampler."""

  def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool,
               *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List([
        ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, **kw)
        for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample(out_channels, **kw)]) if add_upsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class Encoder(nnx.Module):
  """Image `(N, H, W, in_channels)` -> moments `(N, H/2^(k-1), W/2^(k-1), 2*latent_channels)`."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    dtype, param_dtype = _dtypes(config)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    ch, groups = config.block_out_channels, config.norm_num_groups
    self.conv_in = Conv(config.in_channels, ch[0], 3, **kw)
    self.down_blocks = nnx.List([
        DownBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, i < len(ch) - 1, **kw)
        for i in range(len(ch))])
    self.mid_block = MidBlock(ch[-1], groups, attention_config=config.attention, **kw)
    self.conv_norm_out = GroupNorm(groups, ch[-1], epsilon=_NORM_EPS, param_dtype=param_dtype)
    self.conv_out = Conv(ch[-1], 2 * config.latent_channels, 3, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latents `(N, h, w, latent_channels)` -> image `(N, h*2^(k-1), w*2^(k-1), out_channels)`."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    dtype, param_dtype = _dtypes(config)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    ch, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
    self.conv_in = Conv(config.latent_channels, ch[0], 3, **kw)
    self.mid_block = MidBlock(ch[0], groups, attention_config=config.attention, **kw)
    self.up_blocks = nnx.List([
        UpBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, groups, i < len(ch) - 1, **kw)
        for i in range(len(ch))])
    self.conv_norm_out = GroupNorm(groups, ch[-1], epsilon=_NORM_EPS, param_dtype=param_dtype)
    self.conv_out = Conv(ch[-1], config.out_channels, 3, **kw)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def _chunked(fn, x, chunk_size: int | None):
  """Apply `fn` to `x` `(N, ...)` in chunks of `chunk_size` along N with `jax.lax.map`.

  N need not divide: the tail is zero-padded to a full chunk (every op of the VAE is per sample, so the
  padding cannot leak into real samples) and cut off afterwards. One compiled body, bounded memory.
  """
  n = x.shape[0]
  if chunk_size is None or chunk_size >= n:
    return fn(x)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  num_chunks = -(-n // chunk_size)
  pad = num_chunks * chunk_size - n
  x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
  out = jax.lax.map(fn, x.reshape(num_chunks, chunk_size, *x.shape[1:]))
  return jax.tree.map(lambda o: o.reshape(num_chunks * chunk_size, *o.shape[2:])[:n], out)


class AutoencoderKL(nnx.Module):
  """diffusers AutoencoderKL. Images are channels-last with pixels in [-1, 1].

  With the SD config (four blocks) latents are 8x smaller than the image; in general the factor is
  2^(len(block_out_channels) - 1).
  """

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = _dtypes(config)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    z = config.latent_channels
    self.encoder = Encoder(config, rngs=rngs)
    self.decoder = Decoder(config, rngs=rngs)
    self.quant_conv = Conv(2 * z, 2 * z, 1, **kw)
    self.post_quant_conv = Conv(z, z, 1, **kw)

  @property
  def dtype(self):
    return jnp.dtype(self.config.dtype)

  def encode(self, x):
    """x `(N, H, W, in_channels)` -> (mean, logvar), each `(N, h, w, latent_channels)`, unscaled.

    logvar is clamped to [-30, 20] like diffusers' `latent_dist.logvar`.
    """
    moments = self.quant_conv(self.encoder(x.astype(self.dtype)))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, _LOGVAR_MIN, _LOGVAR_MAX)

  @staticmethod
  def sample(mean, logvar, key):
    """A draw from N(mean, exp(logvar)); the noise and arithmetic are float32, the result mean's dtype."""
    logvar = jnp.clip(logvar.astype(jnp.float32), _LOGVAR_MIN, _LOGVAR_MAX)
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar) * noise).astype(mean.dtype)

  def decode(self, z):
    """Unscaled latents `(N, h, w, latent_channels)` -> image `(N, H, W, out_channels)`."""
    return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

  def encode_video(self, x, key=None, *, chunk_size: int | None = None):
    """Video `(B, F, H, W, in_channels)` -> scaled latents `(B, F, h, w, latent_channels)`.

    The posterior mean if `key` is None, else a sample (independent noise per frame); multiplied by
    `config.scaling_factor`. chunk_size: frames encoded at once (None: all).
    """
    b, f = x.shape[:2]
    mean, logvar = _chunked(self.encode, x.reshape(b * f, *x.shape[2:]), chunk_size)
    z = mean if key is None else self.sample(mean, logvar, key)
    return (z * self.config.scaling_factor).reshape(b, f, *z.shape[1:])

  def decode_video(self, latents, *, chunk_size: int | None = 8):
    """Scaled latents `(B, F, h, w, latent_channels)` -> video `(B, F, H, W, out_channels)`.

    Divides by `config.scaling_factor`, then decodes `chunk_size` frames at a time (None: all at once)
    so that peak memory is bounded by the chunk, not the video length.
    """
    b, f = latents.shape[:2]
    z = latents.reshape(b * f, *latents.shape[2:]) / self.config.scaling_factor
    video = _chunked(self.decode, z, chunk_size)
    return video.reshape(b, f, *video.shape[1:])
