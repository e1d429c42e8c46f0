"""VideoMaker (zero-shot subject customization): the reference frame and the UNet call around PISA.

The reference image (subject on white, pixels in [-1, 1]) is VAE-encoded and appended as an extra LAST
frame; the whole UNet runs on F+1 frames at the same timestep, with PISA replacing every spatial
self-attention (the "pisa" variant of `vcjax.nn.attention_variants`); the reference also goes through text
cross-attention and the motion modules like any frame. Its prediction is dropped at inference and
supervised by the GIRL loss in training.

    ref = encode_reference(vae, image[None], key)                       # (1, 1, h, w, 4)
    eps = unet_with_reference(unet, latents, ref, t, context)           # (B, F, h, w, 4)
    eps, eps_ref = unet_with_reference(..., return_reference=True)      # + (B, 1, h, w, 4)
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from vcjax.nn.attention import with_attention


def encode_reference(vae, image, key=None):
  """Reference image(s) `(B, H, W, 3)` in [-1, 1] -> scaled reference latents `(B, 1, h, w, 4)`.

  A posterior sample (what the authors feed the UNet) when `key` is given, the posterior mean when None;
  times the VAE scaling factor.
  """
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f"encode_reference: expected an image batch (B, H, W, 3), got shape {image.shape}")
  return vae.encode_video(image[:, None], key)


def unet_with_reference(unet, latents, reference, timesteps, context, *, return_reference: bool = False):
  """One UNet3D call with the reference latent as an extra last frame and PISA self-attention.

  latents `(B, F, h, w, C)` (the noisy video), reference `(B or 1, 1, h, w, C)` (clean at inference,
  lightly noised in training, zeros for the unconditional CFG branch), timesteps `(B,)` or scalar (the
  same t for every frame, the reference included), context `(B, T, D)`.
  Returns eps `(B, F, h, w, C)`, plus the reference's prediction `(B, 1, h, w, C)` if `return_reference`.

  PISA is set on a clone of `unet` that shares its arrays (`with_attention`; `unet` itself when it has
  PISA already): the caller's module, and so the graphdef a jitted caller was traced with, never changes,
  and the same UNet still runs plain text-to-video elsewhere.
  """
  b, f = latents.shape[:2]
  if reference.ndim != 5 or reference.shape[1] != 1 or reference.shape[2:] != latents.shape[2:]:
    raise ValueError(f"unet_with_reference: reference must be (B, 1, {', '.join(map(str, latents.shape[2:]))}),"
                     f" got {reference.shape}")
  reference = jnp.broadcast_to(reference, (b, *reference.shape[1:])).astype(latents.dtype)
  x = jnp.concatenate([latents, reference], axis=1)
  eps = with_attention(unet, "pisa")(x, timesteps, context)
  if return_reference:
    return eps[:, :f], eps[:, f:]
  return eps[:, :f]


def pad_to_aspect(image: np.ndarray, height: int, width: int, fill: int = 255) -> np.ndarray:
  """`(H, W, 3)` uint8 padded (centered, with `fill`, white by default) to the aspect ratio width:height.

  Nothing is cropped: a too-wide image gets rows above and below, a too-tall one columns left and right.
  """
  h, w = image.shape[:2]
  if w * height > h * width:
    new_h, new_w = max(h, round(w * height / width)), w
  else:
    new_h, new_w = h, max(w, round(h * width / height))
  top, left = (new_h - h) // 2, (new_w - w) // 2
  pad = ((top, new_h - h - top), (left, new_w - w - left)) + ((0, 0),) * (image.ndim - 2)
  return np.pad(image, pad, constant_values=fill)


def load_reference_image(path: str | os.PathLike, height: int, width: int) -> np.ndarray:
  """Read a reference image -> `(height, width, 3)` float32 in [-1, 1].

  Transparent pixels become white (the subject is expected on a white background); the image is padded
  with white, centered, to the target aspect, then resized (bicubic) to (height, width).
  Raises ValueError for a missing or unreadable file.
  """
  from vcjax import media
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ValueError(f"reference image not found: {path}")
  try:
    rgb = media.read_image(path)
  except (media.MediaError, OSError) as e:
    raise ValueError(f"cannot read reference image {e}") from None
  rgb = media.resize(pad_to_aspect(rgb, height, width), (height, width))
  return rgb.astype(np.float32) / 127.5 - 1.0
