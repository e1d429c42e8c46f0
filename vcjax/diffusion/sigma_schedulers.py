"""Euler and Euler ancestral samplers (diffusers' EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)
on the VE sigmas sigma_t = ((1 - alpha_bar_t) / alpha_bar_t) ** 0.5, as pure functions of arrays.

As in `schedulers`, everything step-dependent is a small float32 table built once on the host
(`EulerTables`), in diffusers' float32 operations and order, so a step is a few gathers at a (possibly
traced) step index. Differences from DDIM / DPM-Solver++ that a sampler must honour:
  * the model input is scaled: `scale_input(x, i)` = x / sqrt(sigma_i^2 + 1) (diffusers'
    scale_model_input), `Scheduler.scale_input` does it for every scheduler (identity for the others);
  * the initial latents are noise times `init_noise_sigma`: the largest sigma of the schedule for
    "linspace"/"trailing" spacing, sqrt(sigma_max^2 + 1) for "leading" (diffusers' choice);
  * timesteps are float32 and fractional for "linspace" (e.g. 957.375) and with Karras sigmas; the UNet's
    sinusoidal embedding takes them as they are, like diffusers' does.
Euler: deterministic (s_churn 0, diffusers' default), `final_sigmas_type` "zero" or "sigma_min", Karras
sigmas with `use_karras_sigmas` (timesteps then interpolated from the sigmas, not rounded).
Euler ancestral: each step goes down to sigma_down and adds sigma_up * noise (standard normal, given by
the caller; diffusers draws it with randn_tensor); its final sigma is always 0 and it has no Karras
option in diffusers, so neither here; "sample" prediction is not implemented (as in diffusers).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vcjax.diffusion.schedulers import (SchedulerConfig, _check_num_steps, final_sigma, karras_sigmas,
                                        sigma_to_t, train_sigmas)

_f32 = np.float32


def euler_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
  """The spaced `(num_steps,)` float32 timesteps of EulerDiscreteScheduler.set_timesteps (no Karras)."""
  _check_num_steps(config, num_steps)
  n_train = config.num_train_timesteps
  if config.timestep_spacing == "linspace":
    return np.linspace(0, n_train - 1, num_steps, dtype=np.float32)[::-1].copy()
  if config.timestep_spacing == "leading":
    ratio = n_train // num_steps
    ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.float32)
    return ts + _f32(config.steps_offset)
  ratio = n_train / num_steps  # trailing
  return np.arange(n_train, 0, -ratio).round().copy().astype(np.float32) - _f32(1)


def euler_schedule(config: SchedulerConfig, num_steps: int, *, ancestral: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, float]:
  """-> (timesteps float32 `(N,)`, sigmas float32 `(N + 1,)` ending with the final sigma, init_noise_sigma)."""
  ts = euler_timesteps(config, num_steps)
  train = train_sigmas(config)
  sig = np.interp(ts, np.arange(0, len(train)), train)  # float64, as diffusers
  if config.use_karras_sigmas:
    if ancestral:
      raise ValueError("Euler ancestral has no use_karras_sigmas option")
    sig = karras_sigmas(sig[-1].item(), sig[0].item(), num_steps)
    ts = sigma_to_t(sig, np.log(train)).astype(np.float32)
  last = _f32(0) if ancestral else final_sigma(config)
  sigmas = np.concatenate([sig, [last]]).astype(_f32)
  m = sigmas.max()
  init = m if config.timestep_spacing in ("linspace", "trailing") else np.sqrt(m * m + _f32(1))
  return ts, sigmas, float(_f32(init))


class EulerTables(NamedTuple):
  """Per-step float32 scalars, each `(num_steps,)`."""
  sigma: jax.Array  # sigma_i
  sigma_next: jax.Array  # sigma_{i+1} (Euler) / sigma_down (Euler ancestral): where the ODE step lands
  c_in: jax.Array  # sqrt(sigma^2 + 1): the model input is x / c_in
  v_out: jax.Array  # -sigma / c_in (v-prediction: x0 = v_out * v + x / v_den)
  v_den: jax.Array  # sigma^2 + 1
  sigma_up: jax.Array  # Euler ancestral: the std of the fresh noise (0 for Euler)


def euler_tables(config: SchedulerConfig, sigmas: np.ndarray, *, ancestral: bool = False) -> EulerTables:
  """Tables from the `(N + 1,)` float32 sigmas of `euler_schedule`."""
  if ancestral and config.prediction_type == "sample":
    raise ValueError('Euler ancestral: prediction_type "sample" is not implemented (as in diffusers)')
  sigmas = np.asarray(sigmas, _f32)
  s, nxt = sigmas[:-1], sigmas[1:]
  v_den = s * s + _f32(1)
  c_in = np.sqrt(v_den)
  v_out = -s / c_in
  if ancestral:  # diffusers' float32 scalar operations, in its order
    a, b = nxt * nxt, s * s
    up = np.sqrt((a * (b - a)) / b)
    down = np.sqrt(a - up * up)
  else:
    up, down = np.zeros_like(s), nxt
  return EulerTables(*(jnp.asarray(t, jnp.float32) for t in (s, down, c_in, v_out, v_den, up)))


def euler_scale_input(tables: EulerTables, x, i):
  """diffusers' scale_model_input: x / sqrt(sigma_i^2 + 1), in float32, returned in x's dtype."""
  x = jnp.asarray(x)
  return (x.astype(jnp.float32) / tables.c_in[i]).astype(x.dtype)


def euler_step(config: SchedulerConfig, tables: EulerTables, model_output, step_index, x, *, noise=None):
  """One Euler (ancestral when tables.sigma_up > 0) step; step_index may be traced.

  x is the UNscaled sample (the model saw `euler_scale_input(x)`). noise: standard normal, shape of x,
  required for Euler ancestral (plain Euler's sigma_up is 0: noise, if given, adds nothing).
  Returns (x_prev, pred_original_sample), in x's dtype.
  """
  dtype = jnp.asarray(x).dtype
  x, out = jnp.asarray(x, jnp.float32), jnp.asarray(model_output, jnp.float32)
  sigma = tables.sigma[step_index]
  if config.prediction_type == "epsilon":
    x0 = x - sigma * out
  elif config.prediction_type == "v_prediction":
    x0 = out * tables.v_out[step_index] + x / tables.v_den[step_index]
  else:  # "sample"
    x0 = out
  derivative = (x - x0) / sigma
  x_prev = x + derivative * (tables.sigma_next[step_index] - sigma)
  if noise is not None:
    x_prev = x_prev + jnp.asarray(noise, jnp.float32) * tables.sigma_up[step_index]
  return x_prev.astype(dtype), x0.astype(dtype)
