"""FreeInit (Wu et al. 2023, https://arxiv.org/abs/2312.07537) as diffusers' `pipe.enable_free_init(...)` runs it
(diffusers/pipelines/free_init_utils.py), defaults included.

The whole denoising loop runs `num_iters` times. After iteration k the final latents are diffused back to the
last training timestep with the scheduler's own `add_noise` and the *first* iteration's initial latents as the
noise; a 3-D FFT over (frames, height, width) keeps their low frequencies (a Butterworth, Gaussian or ideal
low-pass filter) and takes the high frequencies from fresh noise; the next iteration starts from that mix (not
multiplied by init_noise_sigma, as diffusers). With `use_fast_sampling` iteration k runs
max(1, int(steps / num_iters * (k + 1))) steps (coarse to fine).

Random numbers: diffusers draws the initial latents, every stochastic step's noise and each re-init's fresh
noise `(B, C, F, h, w)` from one torch generator in that order, so a video depends on its batch and on how
many numbers the steps before consumed. vcjax gives each video its own streams, functions of its seed alone:
the fresh noise of iteration k >= 1 is `normal(fold_in(fold_in(key(seed), FREE_INIT_STREAM), k), (F, h, w, C))`
(`reinit_noise`), and iteration k >= 1 draws its per-step sampler noise from `fold_in(noise_key, 2**31 + k)`
instead of the noise key itself (iteration 0 uses the noise key as a run without FreeInit does, so one iteration
equals no FreeInit). Parity tests give diffusers these same noises.

Schedulers: DDIM, DPM-Solver++ and LCM (variance preserving). Euler and Euler ancestral are refused: diffusers
saves the initial latents after the init_noise_sigma scaling and uses them as unit noise in a VE add_noise, so
its FreeInit diffuses to sigma_max^2 instead of sigma_max there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vcjax import compiler
from vcjax.diffusion.schedulers import Scheduler, add_noise

METHODS = ("butterworth", "gaussian", "ideal")
FREE_INIT_STREAM = 16  # fold_in index of the re-init noise stream (pipeline.video_keys uses 0..2)
_ITERATION_OFFSET = 2 ** 31  # fold_in(noise_key, _ITERATION_OFFSET + k): iteration k's sampler-noise key


@dataclasses.dataclass(frozen=True)
class FreeInitConfig:
  """diffusers' `enable_free_init` arguments, with its defaults."""
  num_iters: int = 3
  use_fast_sampling: bool = False
  method: str = "butterworth"
  order: int = 4  # Butterworth only
  spatial_stop_frequency: float = 0.25  # d_s, normalized (0..1)
  temporal_stop_frequency: float = 0.25  # d_t

  def __post_init__(self):
    if isinstance(self.num_iters, bool) or not isinstance(self.num_iters, int) or self.num_iters < 1:
      raise ValueError(f"free_init num_iters must be an integer >= 1, got {self.num_iters!r}")
    if self.method not in METHODS:
      raise ValueError(f"free_init method {self.method!r} is unknown; expected one of {METHODS}")
    if not self.order > 0:
      raise ValueError(f"free_init order must be positive, got {self.order!r}")
    for name in ("spatial_stop_frequency", "temporal_stop_frequency"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"free_init {name} must be in [0, 1], got {getattr(self, name)!r}")

  @classmethod
  def from_dict(cls, d) -> "FreeInitConfig":
    """From a dict / ConfigDict of these fields (an "enabled" key is ignored; unknown keys raise)."""
    d = {k: v for k, v in dict(d).items() if k != "enabled"}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown free_init field(s) {unknown}; known: {sorted(known)}")
    return cls(**d)


def iteration_steps(config: FreeInitConfig, steps: int, iteration: int) -> int:
  """Steps of iteration `iteration` (0-based): all of them, or diffusers' coarse-to-fine count."""
  if not config.use_fast_sampling:
    return steps
  return max(1, int(steps / config.num_iters * (iteration + 1)))  # Python floats, as diffusers


def low_pass_filter(shape: Sequence[int], config: FreeInitConfig) -> np.ndarray:
  """The `(F, h, w, 1)` float32 low-pass mask over the fftshift-ed spectrum of latents `(B, F, h, w, C)`.

  d^2 = (d_s / d_t * (2 t / F - 1))^2 + (2 y / h - 1)^2 + (2 x / w - 1)^2 (float64, diffusers' Python floats):
  Butterworth 1 / (1 + (d^2 / d_s^2)^order), Gaussian exp(-d^2 / (2 d_s^2)), ideal 1 where d^2 <= 2 d_s (sic:
  diffusers compares d^2 with 2 d_s). All zero when a stop frequency is 0.
  """
  f, h, w = (int(s) for s in shape)
  d_s, d_t = float(config.spatial_stop_frequency), float(config.temporal_stop_frequency)
  if d_s == 0 or d_t == 0:
    return np.zeros((f, h, w, 1), np.float32)
  t = (d_s / d_t) * (2 * np.arange(f, dtype=np.float64) / f - 1)
  y = 2 * np.arange(h, dtype=np.float64) / h - 1
  x = 2 * np.arange(w, dtype=np.float64) / w - 1
  d2 = t[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2
  if config.method == "butterworth":
    mask = 1 / (1 + (d2 / d_s ** 2) ** config.order)
  elif config.method == "gaussian":
    mask = np.exp(-1 / (2 * d_s ** 2) * d2)
  else:
    mask = (d2 <= d_s * 2).astype(np.float64)
  return mask.astype(np.float32)[..., None]


@compiler.jit
def mix_frequencies(x, noise, mask):
  """Low frequencies of x, high frequencies of noise: x, noise `(B, F, h, w, C)`, mask `(F, h, w, 1)` (the
  fftshift-ed low-pass of `low_pass_filter`). diffusers' `_apply_freq_filter`: FFT over (F, h, w), shift,
  x * mask + noise * (1 - mask), unshift, inverse FFT, real part; float32 in, float32 out."""
  axes = (1, 2, 3)
  spec = lambda a: jnp.fft.fftshift(jnp.fft.fftn(a.astype(jnp.float32), axes=axes), axes=axes)
  mixed = spec(x) * mask + spec(noise) * (1 - mask)
  return jnp.fft.ifftn(jnp.fft.ifftshift(mixed, axes=axes), axes=axes).real.astype(jnp.float32)


def index_for_timestep(scheduler: Scheduler, t: int) -> int:
  """The step index diffusers' `index_for_timestep` finds for timestep t in the scheduler's schedule: the second
  match when t repeats (Karras sigmas at few steps), the last step when DPM-Solver++ does not have t."""
  matches = np.flatnonzero(np.asarray(scheduler.timesteps) == t)
  if len(matches) == 0:
    if scheduler.name == "dpmsolver++":
      return scheduler.num_steps - 1
    raise ValueError(f"timestep {t} is not in the {scheduler.name} schedule {list(scheduler.timesteps)}")
  return int(matches[1] if len(matches) > 1 else matches[0])


def scheduler_add_noise(scheduler: Scheduler, x0, noise, t: int):
  """The scheduler's own `add_noise(x0, noise, t)` as diffusers computes it for that scheduler class: alpha_bar
  of t (DDIM, LCM), alpha and sigma of t's step (DPM-Solver++: differs from alpha_bar under Karras sigmas), or
  x0 + sigma noise (Euler). x0, noise `(B, F, h, w, C)`; t a Python int."""
  if scheduler.name in ("ddim", "lcm"):
    return add_noise(scheduler.config, x0, noise, jnp.int32(t))
  i = index_for_timestep(scheduler, t)
  x0, noise = jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32)
  if scheduler.name == "dpmsolver++":
    return scheduler.tables.alpha[i] * x0 + scheduler.tables.sigma[i] * noise
  return x0 + noise * scheduler.tables.sigma[i]  # euler, euler_a (VE)


def stream_keys(seeds: Sequence[int], stream: int):
  """`(B,)` keys fold_in(key(seed), stream): a per-video stream that depends on its seed alone."""
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
  return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def reinit_noise(keys, iteration: int, shape: Sequence[int]):
  """`(B, *shape)` fresh standard normal noise of re-init `iteration` (>= 1), one key of `stream_keys(seeds,
  FREE_INIT_STREAM)` per video; shape `(F, h, w, C)`."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, iteration), tuple(shape)))(keys)


def iteration_noise_keys(noise_keys, iteration: int):
  """The sampler-noise keys of iteration `iteration`: the run's own for 0, fold_in(key, 2**31 + k) after."""
  if iteration == 0 or noise_keys is None:
    return noise_keys
  return jax.vmap(lambda k: jax.random.fold_in(k, _ITERATION_OFFSET + iteration))(noise_keys)


def check_scheduler(name: str):
  if name in ("euler", "euler_a"):
    raise ValueError(f"free_init does not support the {name} scheduler (diffusers' FreeInit uses the "
                     "init_noise_sigma-scaled initial latents as unit noise); use ddim, dpmsolver++ or lcm")


def sample_with_free_init(denoise: Callable[[Any, Scheduler, Any], Any], latents, *, config: FreeInitConfig,
                          make: Callable[[int], Scheduler], steps: int, reinit_keys, noise_keys=None,
                          fresh_noise: Callable[[int], Any] | None = None):
  """The FreeInit iterations around a denoising loop.

  denoise(latents, scheduler, noise_keys) -> final latents: one full loop (`sampling.sample_loop`).
  latents `(B, F, h, w, C)`: iteration 0's initial latents, already times init_noise_sigma.
  make(num_steps) -> the Scheduler of that many steps. reinit_keys: `(B,)` `stream_keys(seeds,
  FREE_INIT_STREAM)`; fresh_noise(k) -> `(B, F, h, w, C)` overrides `reinit_noise` (tests).
  """
  initial = jnp.array(latents, copy=True)  # the sampler step donates its input latents
  mask = None
  scheduler = None
  for k in range(config.num_iters):
    if k > 0:
      if mask is None:
        mask = jnp.asarray(low_pass_filter(latents.shape[1:4], config))
      # diffused with the previous iteration's scheduler, as diffusers (set_timesteps comes after)
      t = scheduler.config.num_train_timesteps - 1
      z_t = scheduler_add_noise(scheduler, latents, initial, t)
      fresh = fresh_noise(k) if fresh_noise is not None else reinit_noise(reinit_keys, k, latents.shape[1:])
      latents = mix_frequencies(z_t, jnp.asarray(fresh, jnp.float32), mask)
    scheduler = make(iteration_steps(config, steps, k))
    latents = denoise(latents, scheduler, iteration_noise_keys(noise_keys, k))
  return latents
