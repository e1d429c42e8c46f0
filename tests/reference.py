"""Helpers shared by the parity tests: PyTorch references with random weights, and error measures."""

from __future__ import annotations

import numpy as np


def rel_err(a, b) -> float:
  """Relative L2 error ||a - b|| / ||b||, computed in float64."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def randomize_(model, seed: int = 0):
  """Give every parameter of a torch model random values of a sensible scale, in place.

  Default inits leave norms at 1/0 and some projections at zero (e.g. zero-initialised outputs), which
  would hide bugs in the layers they feed; parity tests must exercise every weight.
  """
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        base = 1.0 if name.endswith("weight") else 0.0
        p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
      else:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
  return model


def to_channels_last_video(x):
  """diffusers video layout `(B, C, F, H, W)` -> vcjax `(B, F, H, W, C)`."""
  return np.asarray(x).transpose(0, 2, 3, 4, 1)


def run_both(ref, unet, latents, timesteps, context):
  """A diffusers UNetMotionModel and a vcjax UNet3D on the same inputs: latents `(B, C, F, H, W)` (diffusers
  layout), timesteps `(B,)`, context `(B, T, D)` once per video. Returns (vcjax, diffusers) outputs, both
  channels-last `(B, F, H, W, C)`."""
  import jax.numpy as jnp
  import torch
  # diffusers' UNetMotionModel takes the prompt once per frame (its pipeline repeats it).
  per_frame_context = torch.from_numpy(np.repeat(context, latents.shape[2], axis=0))
  with torch.no_grad():
    want = ref(torch.from_numpy(latents), torch.from_numpy(np.asarray(timesteps)), per_frame_context).sample
  got = unet(jnp.asarray(to_channels_last_video(latents)), jnp.asarray(timesteps), jnp.asarray(context))
  return np.asarray(got), to_channels_last_video(want.numpy())
