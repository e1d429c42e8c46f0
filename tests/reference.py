"""Helpers shared by the parity tests: error measures and layouts (random torch weights: vcjax.testing.randomize_)."""

from __future__ import annotations

import numpy as np


def rel_err(a, b) -> float:
  """Relative L2 error ||a - b|| / ||b||, computed in float64."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


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
  got = call_compiled(unet, jnp.asarray(to_channels_last_video(latents)), jnp.asarray(timesteps),
                      jnp.asarray(context))
  return np.asarray(got), to_channels_last_video(want.numpy())


def call_compiled(module, *args):
  """`module(*args)` as one compiled program. Run eagerly, every op at a new shape compiles on its own:
  minutes for a UNet at an odd size, against seconds for one jit."""
  from flax import nnx
  from vcjax import compiler
  graphdef, state = nnx.split(module)
  return compiler.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))(state, *args)
