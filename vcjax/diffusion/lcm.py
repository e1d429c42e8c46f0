"""Latent Consistency Model sampling (diffusers' LCMScheduler), for AnimateLCM's few-step videos.

Timesteps: the distillation schedule t_k = k * (num_train_timesteps // original_inference_steps) - 1,
k = 1..original_inference_steps (50: 19, 39, ..., 999), reversed, then num_steps of them picked at
floor(linspace(0, 50, num_steps, endpoint=False)) (4 steps: 999, 759, 499, 259). `timestep_spacing` and
`steps_offset` play no part (as in diffusers). Each step predicts x0 (epsilon / v / sample), applies the
consistency boundary condition denoised = c_out x0 + c_skip x with, for s = timestep * timestep_scaling,
c_skip = 0.25 / (s^2 + 0.25), c_out = s / sqrt(s^2 + 0.25) (sigma_data 0.5), and re-noises the denoised
sample to the next timestep with FRESH standard-normal noise: sqrt(alpha_bar_next) denoised +
sqrt(1 - alpha_bar_next) noise; the final step returns `denoised` itself. The noise is the caller's (per
video, like DDIM with eta > 0); diffusers draws it with randn_tensor. The model input is not scaled and
init_noise_sigma is 1.

AnimateLCM (G-U-N/AnimateLCM; wangfuyun/AnimateLCM on the Hub) ships two files, both read by
`convert/animatediff.py` as they are:
  * `AnimateLCM_sd15_t2v.ckpt`: a motion module in the original AnimateDiff key naming, v2 layout (motion
    modules in the down, up AND mid blocks; its config: 8 heads, 1 transformer block, two Temporal_Self
    attentions, temporal position encoding), keys like
    `down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight`,
    `...temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight` (to_k, to_v,
    to_out.0.{weight,bias}), `...attention_blocks.{0,1}.pos_encoder.pe`, `...norms.{0,1}`, `...ff.net.0.proj`,
    `...ff.net.2`, `...ff_norm`, `mid_block.motion_modules.0.temporal_transformer....`
    -> `--motion-module AnimateLCM_sd15_t2v.ckpt` (v2 is detected from the mid block; 8 heads is the default).
  * `AnimateLCM_sd15_t2v_lora.safetensors`: a kohya-style LoRA on the spatial SD1.5 UNet,
    `lora_unet_<diffusers module path, "." written "_">.lora_down.weight` `(r, in[, kh, kw])`,
    `.lora_up.weight` `(out, r[, 1, 1])`, `.alpha` (scale alpha / r), e.g.
    `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`
    -> `--lora AnimateLCM_sd15_t2v_lora.safetensors:0.8` (merged at 0.8, the adapter weight of diffusers' docs).
Then sample with `--config.scheduler.name=lcm --config.steps=4 --config.guidance_scale=1.5` and linear betas
(diffusers' AnimateLCM example: `LCMScheduler.from_config(base_config, beta_schedule="linear")`, so
original_inference_steps 50: 4 steps are 999, 759, 499, 259; the authors' own inference config uses 100:
`--config.scheduler.original_inference_steps=100` gives their 999, 749, 499, 249).
tests/test_sigma_schedulers.py builds both layouts at tiny size (random weights), converts and samples them,
and compares with diffusers' AnimateDiffPipeline + LCMScheduler + load_lora_weights.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vcjax.diffusion.schedulers import SchedulerConfig, _pred_x0_eps, alphas_cumprod

_f32 = np.float32


def lcm_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
  """The `(num_steps,)` int64 timesteps of LCMScheduler.set_timesteps(num_steps) (strength 1)."""
  orig = config.original_inference_steps
  if orig > config.num_train_timesteps:
    raise ValueError(f"original_inference_steps={orig} > num_train_timesteps={config.num_train_timesteps}")
  if not 1 <= num_steps <= orig:
    raise ValueError(f"num_steps={num_steps} must be in [1, original_inference_steps={orig}]")
  k = config.num_train_timesteps // orig
  origin = (np.arange(1, orig + 1) * k - 1)[::-1].copy()
  idx = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
  return origin[idx].astype(np.int64)


class LCMTables(NamedTuple):
  """Per-step float32 scalars, each `(num_steps,)`."""
  sqrt_alpha: jax.Array  # sqrt(alpha_bar_t)
  sqrt_beta: jax.Array  # sqrt(1 - alpha_bar_t)
  c_skip: jax.Array
  c_out: jax.Array
  sqrt_alpha_prev: jax.Array  # sqrt(alpha_bar) of the next timestep (unused at the last step)
  sqrt_beta_prev: jax.Array
  last: jax.Array  # bool: the final step (no re-noising)


def lcm_tables(config: SchedulerConfig, num_steps: int) -> LCMTables:
  # diffusers' float32 scalar operations, in its order.
  ac = alphas_cumprod(config)
  ts = lcm_timesteps(config, num_steps)
  prev = np.concatenate([ts[1:], ts[-1:]])  # the last step's "previous" timestep is itself (unused)
  a_t, a_prev = ac[ts], ac[prev]
  s = ts.astype(_f32) * _f32(config.timestep_scaling)  # timestep * timestep_scaling, float32
  s2 = s * s + _f32(0.25)
  c_skip = _f32(0.25) / s2
  c_out = s / np.sqrt(s2)
  last = np.arange(num_steps) == num_steps - 1
  return LCMTables(*(jnp.asarray(a, jnp.float32) for a in
                     (np.sqrt(a_t), np.sqrt(_f32(1) - a_t), c_skip, c_out, np.sqrt(a_prev),
                      np.sqrt(_f32(1) - a_prev))), jnp.asarray(last))


def lcm_step(config: SchedulerConfig, tables: LCMTables, model_output, step_index, x, noise=None):
  """One LCM step; step_index may be traced. noise: standard normal, shape of x (required; unused at the
  last step). Returns (x_prev, denoised)."""
  dtype = jnp.asarray(x).dtype
  x, out = jnp.asarray(x, jnp.float32), jnp.asarray(model_output, jnp.float32)
  x0, _ = _pred_x0_eps(config, out, x, tables.sqrt_alpha[step_index], tables.sqrt_beta[step_index])
  if config.clip_sample:
    x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
  denoised = tables.c_out[step_index] * x0 + tables.c_skip[step_index] * x
  if noise is None:
    raise ValueError("lcm_step needs `noise` (standard normal, shape of x)")
  renoised = tables.sqrt_alpha_prev[step_index] * denoised + tables.sqrt_beta_prev[step_index] * jnp.asarray(
      noise, jnp.float32)
  x_prev = jnp.where(tables.last[step_index], denoised, renoised)
  return x_prev.astype(dtype), denoised.astype(dtype)
