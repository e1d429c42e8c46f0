"""Turning pixel batches into what a latent-diffusion objective trains on (frozen VAE, latent-size masks).

    latents = encode(vae, pixels, key)              # (B, F, H, W, 3) -> (B, F, h, w, 4), no gradient
    mask = latent_mask(pixel_mask, latents.shape[2:4])
    clip = repeat_frames(image_latents, 16)          # (B, 1, ...) -> (B, 16, ...)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def latent_mask(mask, latent_hw):
  """Pixel loss mask `(B, F, H, W, 1)` -> latent mask `(B, F, h, w, 1)`: a latent pixel is valid only if
  its whole f x f pixel patch is (min-pool; Custom Diffusion likewise shrinks the valid box)."""
  b, f, hgt, wid, c = mask.shape
  h, w = latent_hw
  if hgt % h or wid % w:
    raise ValueError(f"mask {mask.shape[2:4]} is not a multiple of the latent size {latent_hw}")
  m = jnp.asarray(mask, jnp.float32).reshape(b, f, h, hgt // h, w, wid // w, c)
  return m.min(axis=(3, 5))


def encode(vae, pixels, key):
  """Frozen VAE posterior sample x scaling factor. `(B, F, H, W, 3)` -> `(B, F, h, w, 4)`."""
  return jax.lax.stop_gradient(vae.encode_video(pixels, key).astype(jnp.float32))


def repeat_frames(x, frames: int):
  """Images as single-frame clips `(B, 1, ...)` -> static clips `(B, frames, ...)`; None stays None."""
  if x is None or x.shape[1] == frames:
    return x
  if x.shape[1] != 1:
    raise ValueError(f"batch has {x.shape[1]} frames, config wants {frames}")
  return jnp.repeat(x, frames, axis=1)
