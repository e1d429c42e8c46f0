"""UNet3D: the SD1.5 UNet applied per frame plus AnimateDiff motion modules (down / mid / up wiring).

Names mirror diffusers' UNetMotionModel (down_blocks.i.{resnets, attentions, motion_modules,
downsamplers}, mid_block, up_blocks, conv_in, time_embedding, conv_norm_out, conv_out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vcjax.models.blocks import Downsample, ResnetBlock, SpatialTransformer, Upsample
from vcjax.models.configs import UNet3DConfig
from vcjax.models.free_noise import frame_chunk, over_frames
from vcjax.models.motion import MotionModule
from vcjax.nn.layers import Conv, GroupNorm, Linear, timestep_embedding


class TimestepEmbedding(nnx.Module):
  """Linear -> SiLU -> Linear on the sinusoidal embedding."""

  def __init__(self, in_dim: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.linear_1 = Linear(in_dim, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.linear_2 = Linear(dim, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class UNetBlock(nnx.Module):
  """One resolution level: `layers` x (resnet [+ spatial transformer] [+ motion module]) and an optional
  down- or up-sampler. Down blocks return every layer's output as skip connections; up blocks consume
  one skip per layer (concatenated on channels before the resnet)."""

  def __init__(self, cfg: UNet3DConfig, in_channels: list[int], out_channels: int, *, attention: bool,
               heads: int, sampler: str | None, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    temb = cfg.block_out_channels[0] * 4
    self.resnets = nnx.List([
        ResnetBlock(c, out_channels, temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                    across_frames=cfg.resnet_norm_across_frames, remat=cfg.remat, **kw) for c in in_channels])
    self.attentions = nnx.List([
        SpatialTransformer(out_channels, heads, cfg.cross_attention_dim,
                           depth=cfg.transformer_layers_per_block, groups=cfg.norm_num_groups,
                           eps=cfg.transformer_norm_eps, attention_config=cfg.attention, remat=cfg.remat, **kw)
        for _ in in_channels] if attention else [])
    self.motion_modules = nnx.List([
        MotionModule(out_channels, cfg.motion_num_heads, depth=cfg.motion_layers,
                     max_seq_length=cfg.motion_max_seq_length, groups=cfg.norm_num_groups,
                     across_frames=cfg.motion_norm_across_frames, attention_config=cfg.attention,
                     remat=cfg.remat, free_noise=cfg.free_noise, **kw)
        for _ in in_channels] if cfg.use_motion_modules else [])
    self.downsamplers = nnx.List([Downsample(out_channels, **kw)] if sampler == "down" else [])
    self.upsamplers = nnx.List([Upsample(out_channels, **kw)] if sampler == "up" else [])
    # static: FreeNoise runs the per-frame blocks a window's frames at a time (memory bounded by the window)
    self.frame_chunk = frame_chunk(cfg, cfg.free_noise)

  def __call__(self, x, temb, context, *, skips=None):
    outputs = []
    size = self.frame_chunk
    framed = (context,) if context.ndim == 4 else ()  # a prompt per frame: chunked with the frames
    shared = () if framed else (context,)
    for i, resnet in enumerate(self.resnets):
      if skips is not None:
        x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = over_frames(resnet, x, temb, size=size)
      if self.attentions:
        x = over_frames(self.attentions[i], x, *shared, framed=framed, size=size)
      if self.motion_modules:
        x = self.motion_modules[i](x)
      outputs.append(x)
    for sampler in self.downsamplers:
      x = over_frames(sampler, x, size=size)
      outputs.append(x)
    for sampler in self.upsamplers:  # to the next skip's size: odd latent sizes were rounded up going down
      up_size = skips[-1].shape[-3:-1] if skips else None
      x = over_frames(lambda v: sampler(v, size=up_size), x, size=size)
      outputs.append(x)
    return x, outputs


class MidBlock(nnx.Module):
  """resnet, then (spatial transformer, [motion module], resnet)."""

  def __init__(self, cfg: UNet3DConfig, channels: int, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    temb = cfg.block_out_channels[0] * 4
    resnet = lambda: ResnetBlock(channels, channels, temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                                 across_frames=cfg.resnet_norm_across_frames, remat=cfg.remat, **kw)
    self.resnets = nnx.List([resnet(), resnet()])
    self.attentions = nnx.List([
        SpatialTransformer(channels, cfg.heads(len(cfg.block_out_channels) - 1), cfg.cross_attention_dim,
                           depth=cfg.transformer_layers_per_block, groups=cfg.norm_num_groups,
                           eps=cfg.transformer_norm_eps, attention_config=cfg.attention, remat=cfg.remat, **kw)])
    use_motion = cfg.use_motion_modules and cfg.motion_mid_block
    self.motion_modules = nnx.List([
        MotionModule(channels, cfg.motion_num_heads, depth=cfg.motion_layers,
                     max_seq_length=cfg.motion_max_seq_length, groups=cfg.norm_num_groups,
                     across_frames=cfg.motion_norm_across_frames, attention_config=cfg.attention,
                     remat=cfg.remat, free_noise=cfg.free_noise, **kw)] if use_motion else [])
    self.frame_chunk = frame_chunk(cfg, cfg.free_noise)  # as UNetBlock's

  def __call__(self, x, temb, context):
    size = self.frame_chunk
    framed = (context,) if context.ndim == 4 else ()
    x = over_frames(self.resnets[0], x, temb, size=size)
    x = over_frames(self.attentions[0], x, *(() if framed else (context,)), framed=framed, size=size)
    if self.motion_modules:
      x = self.motion_modules[0](x)
    return over_frames(self.resnets[1], x, temb, size=size)


class UNet3D(nnx.Module):
  """Predicts the noise of video latents.

  __call__(latents `(B, F, H, W, Cin)`, timesteps `(B,)` (or scalar), context `(B, T, D)`, or
    `(B, F, T, D)` one per frame (prompt travel)) -> `(B, F, H, W, Cout)`.

  The attention kernel (`config.attention`) and gradient checkpointing (`config.remat`) are fixed when the
  model is built; attention variants (PISA, start-token detach) are set on its layers with
  `vcjax.nn.attention.set_attention` / `with_attention`.
  """

  def __init__(self, config: UNet3DConfig, *, rngs: nnx.Rngs):
    cfg = self.config = config
    kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    ch = cfg.block_out_channels
    n = len(ch)
    self.conv_in = Conv(cfg.in_channels, ch[0], 3, **kw)
    self.time_embedding = TimestepEmbedding(ch[0], ch[0] * 4, **kw)

    down, skip_channels, prev = [], [ch[0]], ch[0]
    for i, block_type in enumerate(cfg.down_block_types):
      ins = [prev] + [ch[i]] * (cfg.layers_per_block - 1)
      last = i == n - 1
      down.append(UNetBlock(cfg, ins, ch[i], attention=block_type.startswith("CrossAttn"),
                            heads=cfg.heads(i), sampler=None if last else "down", rngs=rngs))
      skip_channels += [ch[i]] * (cfg.layers_per_block + (0 if last else 1))
      prev = ch[i]
    self.down_blocks = nnx.List(down)
    self.mid_block = MidBlock(cfg, ch[-1], rngs=rngs)

    up, rev = [], list(reversed(ch))
    for i, block_type in enumerate(cfg.up_block_types):
      ins = []
      for _ in range(cfg.layers_per_block + 1):
        ins.append(prev + skip_channels.pop())
        prev = rev[i]
      up.append(UNetBlock(cfg, ins, rev[i], attention=block_type.startswith("CrossAttn"),
                          heads=cfg.heads(n - 1 - i), sampler=None if i == n - 1 else "up", rngs=rngs))
    self.up_blocks = nnx.List(up)
    self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], epsilon=cfg.norm_eps,
                                   across_frames=cfg.out_norm_across_frames, param_dtype=kw["param_dtype"])
    self.conv_out = Conv(ch[0], cfg.out_channels, 3, **kw)

  def __call__(self, latents, timesteps, context):
    cfg = self.config
    b = latents.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    temb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                              freq_shift=cfg.freq_shift)
    temb = self.time_embedding(temb.astype(jnp.dtype(cfg.dtype)))
    context = context.astype(jnp.dtype(cfg.dtype))

    x = self.conv_in(latents.astype(jnp.dtype(cfg.dtype)))
    skips = [x]
    for block in self.down_blocks:
      x, outs = block(x, temb, context)
      skips += outs
    x = self.mid_block(x, temb, context)
    for block in self.up_blocks:
      x, _ = block(x, temb, context, skips=skips)
    x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
    return x
