"""Training losses for the diffusion objectives, as pure functions of arrays.

Conventions: predictions and targets are `(B, ...)` (video latents `(B, F, h, w, C)`); "per-sample"
functions reduce every axis but the batch and return `(B,)`; reductions compute in float32 whatever
the input dtype (bf16 training keeps fp32 losses).

  * `min_snr_weight`: Min-SNR-gamma loss weights (Hang et al. 2023), diffusers' `compute_snr` recipe.
  * `masked_error`: L2 / L1 error averaged over the valid (mask = 1) elements (CustomCrafter, Custom
    Diffusion's padded-image mask).
  * `girl_loss`: VideoMaker's Guidance Information Recognition Loss (METHODS.md §3).
  * `prior_preservation_loss`: instance loss + w * class-prior loss within one mixed batch (§4).
"""

from __future__ import annotations

import jax.numpy as jnp


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def per_sample_mean(x):
  """Mean over all axes but the first. `(B, ...)` -> `(B,)`, float32."""
  x = _f32(x)
  return x.reshape(x.shape[0], -1).mean(axis=1)


def eps_mse(pred, target):
  """Per-sample mean squared error `(B,)` (the plain epsilon-prediction loss before the batch mean)."""
  return per_sample_mean(jnp.square(_f32(pred) - _f32(target)))


def min_snr_weight(snr, gamma: float = 5.0, prediction_type: str = "epsilon"):
  """Min-SNR-gamma weights `(B,)` from SNR(t) `(B,)`.

  epsilon prediction: min(snr, gamma) / snr; v prediction: min(snr, gamma) / (snr + 1).
  """
  snr = _f32(snr)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "epsilon":
    return clipped / snr
  if prediction_type == "v_prediction":
    return clipped / (snr + 1.0)
  raise ValueError(f"min_snr_weight: unsupported prediction_type {prediction_type!r}")


def masked_error(pred, target, mask=None, *, kind: str = "l2", eps: float = 1e-8):
  """Per-sample error `(B,)` averaged over the valid elements.

  pred, target `(B, ..., C)`; mask broadcastable to them (e.g. `(B, F, h, w, 1)`), 1 = valid, or None
  (all valid). kind "l2" squared error, "l1" absolute error. The denominator counts valid elements
  after broadcasting to the channels, so an all-ones mask gives exactly the unmasked mean. (Custom
  Diffusion divides by valid PIXELS, i.e. C times larger; Adam is invariant to that constant.)
  """
  diff = _f32(pred) - _f32(target)
  if kind == "l2":
    err = jnp.square(diff)
  elif kind == "l1":
    err = jnp.abs(diff)
  else:
    raise ValueError(f"masked_error: kind must be 'l2' or 'l1', got {kind!r}")
  if mask is None:
    return per_sample_mean(err)
  m = jnp.broadcast_to(_f32(mask), err.shape)
  b = err.shape[0]
  num = (err * m).reshape(b, -1).sum(axis=1)
  den = m.reshape(b, -1).sum(axis=1)
  return num / jnp.maximum(den, eps)


def weighted_batch_mean(values, weights=None):
  """Mean over the batch of `values (B,)` after per-sample `weights (B,)` (None: plain mean)."""
  values = _f32(values)
  return values.mean() if weights is None else (values * _f32(weights)).mean()


def prior_preservation_loss(per_sample, is_prior, prior_weight: float = 1.0):
  """Instance loss + prior_weight * class-prior loss from one mixed batch.

  per_sample `(B,)` losses; is_prior `(B,)` bool / {0, 1}. Each part is the mean over its own samples
  (0 when the batch has none of that kind), which equals Custom Diffusion's/DreamBooth's
  `mean(instance) + w * mean(prior)` over a batch that is half instance, half class images.
  Returns (total, instance_loss, prior_loss).
  """
  per_sample = _f32(per_sample)
  p = _f32(is_prior)
  i = 1.0 - p
  inst = (per_sample * i).sum() / jnp.maximum(i.sum(), 1.0)
  prior = (per_sample * p).sum() / jnp.maximum(p.sum(), 1.0)
  return inst + prior_weight * prior, inst, prior


def remind_timesteps(t):
  """VideoMaker's reference "remind" timestep t' = int(0.01 * t) for integer t `(B,)` (= t // 100)."""
  return jnp.asarray(t) // 100


def girl_loss(eps_video, noise_video, eps_ref, noise_ref, snr_t, *, gamma: float | None = 5.0,
              ref_weight: float = 0.1, prediction_type: str = "epsilon"):
  """GIRL: Min-SNR-weighted eps-MSE on the video frames + ref_weight * MSE(reference pred, remind noise).

  eps_video, noise_video `(B, F, h, w, C)`; eps_ref, noise_ref `(B, 1, h, w, C)`; snr_t `(B,)` the SNR
  of the video timestep. gamma None disables Min-SNR (plain MSE). Returns (total, l_video, l_ref).
  """
  per = eps_mse(eps_video, noise_video)
  w = None if gamma is None else min_snr_weight(snr_t, gamma, prediction_type)
  l_video = weighted_batch_mean(per, w)
  l_ref = eps_mse(eps_ref, noise_ref).mean()
  return l_video + ref_weight * l_ref, l_video, l_ref
