"""The denoising step: classifier-free guidance, VideoMaker's reference frame, and CustomCrafter's
step-dependent LoRA scale, as one pure function compiled once and called for every step.

Why a jitted step in a Python loop rather than one `fori_loop`: the step index is a traced argument, so
the step compiles once for the whole run (and for every run of the same shapes), while the host loop
can drive a progress bar; the per-step dispatch costs microseconds next to a UNet evaluation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vcjax import compiler
from vcjax.diffusion.schedulers import Scheduler, add_noise


def interleave(a, b):
  """(B, ...), (B, ...) -> (2B, ...) as [a0, b0, a1, b1, ...]: each video's CFG pair stays adjacent,
  so splitting the batch across devices keeps a pair on one device."""
  return jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:])


def guided_eps(unet, latents, t, cond, uncond, guidance_scale, reference=None, windows=None):
  """Classifier-free guided noise prediction. latents `(B, F, h, w, 4)`, cond/uncond `(B, T, D)`,
  reference: None, `(B, 1, h, w, 4)`, or a pair (unconditional, conditional) of those. The unconditional
  branch gets the negative prompt and, for VideoMaker, an all-zero reference latent unless a pair says
  otherwise. guidance_scale None (or <= 1) disables CFG. windows: a FreeNoiseConfig to run the UNet on
  sliding frame windows (FreeNoise scope "unet", `context_windows.py`), or None."""
  b = latents.shape[0]
  ref_u, ref_c = reference if isinstance(reference, tuple) else (None, reference)
  if guidance_scale is None:
    return _eps(unet, latents, jnp.broadcast_to(t, (b,)), cond, ref_c, windows)
  x2 = interleave(latents, latents)
  ctx = interleave(uncond, cond)
  ref = None if ref_c is None else interleave(jnp.zeros_like(ref_c) if ref_u is None else ref_u, ref_c)
  eps = _eps(unet, x2, jnp.broadcast_to(t, (2 * b,)), ctx, ref, windows).astype(jnp.float32)
  eps_u, eps_c = eps[0::2], eps[1::2]
  return eps_u + guidance_scale * (eps_c - eps_u)


def _eps(unet, x, t, ctx, reference, windows=None):
  if windows is not None:
    from vcjax.diffusion.context_windows import windowed_eps
    return windowed_eps(lambda xs, c: _eps(unet, xs, t, c, reference), x, ctx, windows)
  if reference is None:
    return unet(x, t, ctx)
  from vcjax.methods.videomaker import unet_with_reference
  return unet_with_reference(unet, x, reference, t, ctx)


def noise_reference(scheduler: Scheduler, reference, latents, t, ratio: float):
  """VideoMaker's optional inference-time reference noising (the authors' `reference_image_noisy`): each
  step noises the reference latents `(B, 1, h, w, 4)` (either CFG branch's) to timestep int(ratio * t), with
  the frame mean of the current noisy latents as the noise; the result replaces the reference, so the
  noise accumulates over the steps. int() of the float32 product, as the authors' torch code computes it."""
  t_ref = jnp.floor(jnp.float32(t) * jnp.float32(ratio)).astype(jnp.int32)
  noise = jnp.mean(latents.astype(jnp.float32), axis=1, keepdims=True)
  return add_noise(scheduler.config, reference, noise.astype(reference.dtype), t_ref)


@compiler.jit(static_argnames=("graphdef", "use_cfg", "reference_noise", "windows"), donate_argnames=("latents",))
def denoise_step(graphdef, params, latents, sched_state, i, *, scheduler: Scheduler, cond, uncond,
                 guidance_scale, reference=None, lora_scales=None, noise_keys=None, use_cfg: bool = True,
                 reference_noise: float | None = None, windows=None):
  """One sampler step. params: the UNet's nnx state; i: step index (traced).

  reference: None, or (unconditional, conditional) reference latents `(B, 1, h, w, 4)` each.
  lora_scales: `(num_steps,)` LoRA scale per step (CustomCrafter's dynamic weighting) or None.
  noise_keys: `(B,)` per-video PRNG keys for stochastic schedulers (DDIM eta > 0): a video's noise
  depends only on its own seed, never on the batch it shares or the devices it runs on.
  reference_noise: the ratio of `noise_reference` (None: the reference stays clean, VideoMaker's default).
  windows: FreeNoise with scope "unet" (`guided_eps`), or None.
  Returns (latents, sched_state, reference).
  """
  if lora_scales is not None:
    from vcjax.nn.lora import with_lora_scale
    params = with_lora_scale(params, lora_scales[i])
  unet = nnx.merge(graphdef, params)
  t = scheduler.timestep(i)
  if reference is not None and reference_noise is not None:
    reference = tuple(noise_reference(scheduler, r, latents, t, reference_noise) for r in reference)
  eps = guided_eps(unet, scheduler.scale_input(latents, i), t, cond, uncond, guidance_scale if use_cfg else None,
                   reference, windows)
  noise = None
  if scheduler.needs_noise:
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), latents.shape[1:]))(noise_keys)
  latents, sched_state = scheduler.step(sched_state, eps, i, latents, noise=noise)
  return latents, sched_state, reference


def sample_loop(graphdef, params, latents, *, scheduler: Scheduler, cond, uncond, guidance_scale: float,
                reference=None, lora_scales=None, noise_keys=None, skip_steps=None, progress=None,
                reference_noise: float | None = None, windows=None) -> Any:
  """Run the steps of `scheduler` from initial latents (already times init_noise_sigma).

  reference: VideoMaker's reference latents `(B, 1, h, w, 4)` (the unconditional branch starts from zeros);
  reference_noise: see `noise_reference` (None: off). windows: see `denoise_step`.

  skip_steps: optional `(num_steps,)` bools; a skipped step leaves the latents as they are, so the next
  step starts from them at its own timestep (CustomCrafter's released sampler, see
  `vcjax.methods.customcrafter.schedule.skipped_steps`).
  """
  use_cfg = guidance_scale is not None and guidance_scale > 1.0
  state = scheduler.init_state(latents)
  steps = range(scheduler.num_steps)
  if skip_steps is not None:
    if len(skip_steps) != scheduler.num_steps:
      raise ValueError(f"skip_steps has {len(skip_steps)} entries for {scheduler.num_steps} steps")
    steps = [i for i in steps if not skip_steps[i]]
  if reference is not None:
    reference = (jnp.zeros_like(reference), reference)
  for i in (progress(steps) if progress else steps):
    latents, state, reference = denoise_step(
        graphdef, params, latents, state, jnp.int32(i), scheduler=scheduler, cond=cond, uncond=uncond,
        guidance_scale=jnp.float32(guidance_scale or 1.0), reference=reference, lora_scales=lora_scales,
        noise_keys=noise_keys, use_cfg=use_cfg, reference_noise=reference_noise, windows=windows)
  return latents
