"""CustomCrafter subject-clip augmentation (METHODS.md §4, §6): random rescale with prompt prefixes, flip, a
loss mask of the valid (non-padded) region, and the image repeated into a static clip.

Two distributions (RescaleConfig.mode):
  "authors" (AUTHORS_RESCALE, the default; the authors' training code): with probability 2/3 the scale is
  one of {0.3, 0.4, ..., 1.0} (randint(3, 11) / 10), else one of {1.2, 1.3, 1.4} (randint(12, 15) / 10),
  uniform within each set. Only a scale below `far_threshold` (0.6) shrinks the image and pastes it at a
  random place on a black (-1) canvas ("a far away"/"very small" prefix); 0.6-1.0 resizes it to the full
  frame; above 1 it is enlarged and randomly cropped ("zoomed in"/"close up"). Class images: not flipped.
  "paper" (PAPER_RESCALE; Custom Diffusion's recipe as the paper states it): with probability `p_zoom_out`
  scale ~ U(0.3, 1.0), shrunk and pasted on a `pad_value` canvas, else U(1.2, 1.4); class images flipped too.
The loss mask is 1 where the output shows real image content: not the paste canvas, and not the white
square padding added when the dataset was stored (for a square source image and scale 0.6-1.0 in
"authors" mode that is the all-ones mask of the authors' code).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vcjax import media
from vcjax.data import captions


@dataclasses.dataclass(frozen=True)
class RescaleConfig:
  """mode: "paper" (continuous ranges) or "authors" (discrete scales in steps of 0.1, see module doc).
  p_zoom_out: probability of the shrink branch (else enlarge). zoom_out / zoom_in: scale ranges relative
  to the output side (both ends included in "authors" mode). far_threshold: shrink scales below it get a
  "far away" prefix (and, in "authors" mode, are the only ones pasted on a canvas). pad_value: canvas value
  in [-1, 1] where the shrunk image does not reach (masked out of the loss anyway). flip_prior: whether
  class (prior) images get the random flip."""
  mode: str = "paper"
  p_zoom_out: float = 0.66
  zoom_out: tuple[float, float] = (0.3, 1.0)
  zoom_in: tuple[float, float] = (1.2, 1.4)
  far_threshold: float = 0.6
  flip_prob: float = 0.5
  pad_value: float = 0.0
  flip_prior: bool = True


PAPER_RESCALE = RescaleConfig()
AUTHORS_RESCALE = RescaleConfig(mode="authors", p_zoom_out=2 / 3, pad_value=-1.0, flip_prior=False)
RESCALE_PRESETS = {"paper": PAPER_RESCALE, "authors": AUTHORS_RESCALE}


def _discrete(u: float, lo: float, hi: float) -> float:
  """u in [0, 1) -> one of lo, lo + 0.1, ..., hi, uniformly (the authors' randint(10 lo, 10 hi + 1) / 10)."""
  a, b = int(round(10 * lo)), int(round(10 * hi))
  return (a + min(int(u * (b - a + 1)), b - a)) / 10


def to_unit_range(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def rescale_augment(image: np.ndarray, valid: np.ndarray, rng: np.random.Generator, out_size: int,
                    config: RescaleConfig = PAPER_RESCALE, augment: bool = True, flip: bool = True):
  """One subject image -> (pixels `(R, R, 3)` float32 in [-1, 1], loss mask `(R, R)` float32 {0, 1},
  prompt prefix str, branch "out" | "in" | "none", scale float), R = out_size.

  image: `(S, S, 3)` uint8; valid: `(S, S)` bool, True on real content. With augment=False only the flip
  is random (prior-preservation class images); flip=False turns the flip off too. The number of rng draws
  does not depend on the branch or the flags.
  """
  if config.mode not in RESCALE_PRESETS:
    raise ValueError(f"unknown rescale mode {config.mode!r}: one of {sorted(RESCALE_PRESETS)}")
  do_flip = (rng.random() < config.flip_prob) and flip
  zoom_out = rng.random() < config.p_zoom_out
  u = float(rng.random())
  offset = rng.random(2)
  if do_flip:
    image, valid = image[:, ::-1], valid[:, ::-1]
  rng_range = _discrete if config.mode == "authors" else (lambda x, lo, hi: lo + x * (hi - lo))
  if not augment:
    branch, scale = "none", 1.0
  elif zoom_out:
    branch, scale = "out", rng_range(u, *config.zoom_out)
  else:
    branch, scale = "in", rng_range(u, *config.zoom_in)
  prefix = captions.scale_prefix(rng, branch, scale, config.far_threshold)

  # The authors shrink only below far_threshold; 0.6-1.0 fills the frame (no paste, no canvas).
  fill = config.mode == "authors" and branch == "out" and scale >= config.far_threshold
  side = out_size if fill else max(1, int(round(scale * out_size)))
  img = to_unit_range(media.resize(np.ascontiguousarray(image), (side, side)))
  val = media.resize(np.ascontiguousarray(valid).astype(np.uint8) * 255, (side, side), nearest=True) > 0
  if side <= out_size:
    # Paste at a random place; the rest of the canvas is not content.
    top, left = (int(o * (out_size - side + 1)) for o in offset)
    pixels = np.full((out_size, out_size, 3), config.pad_value, dtype=np.float32)
    mask = np.zeros((out_size, out_size), dtype=np.float32)
    pixels[top:top + side, left:left + side] = img
    mask[top:top + side, left:left + side] = val
  else:
    top, left = (int(o * (side - out_size + 1)) for o in offset)
    pixels = img[top:top + out_size, left:left + out_size]
    mask = val[top:top + out_size, left:left + out_size].astype(np.float32)
  return np.ascontiguousarray(pixels), mask, prefix, branch, scale


def static_clip(pixels: np.ndarray, mask: np.ndarray, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
  """`(H, W, 3)`, `(H, W)` -> a static clip `(F, H, W, 3)` and its loss mask `(F, H, W, 1)`."""
  clip = np.broadcast_to(pixels[None], (num_frames,) + pixels.shape).copy()
  m = np.broadcast_to(mask[None, :, :, None], (num_frames,) + mask.shape + (1,)).copy()
  return clip, m


def downsample_mask(mask: np.ndarray, factor: int = 8, mode: str = "all") -> np.ndarray:
  """A pixel loss mask `(..., H, W, 1)` -> latent resolution `(..., H/f, W/f, 1)` (H, W divisible by f).

  mode "all": 1 where every pixel of the f x f block is valid (no padding leaks into the loss); "any": 1
  where some pixel is; "mean": the valid fraction.
  """
  *lead, h, w, c = mask.shape
  if h % factor or w % factor:
    raise ValueError(f"mask size {(h, w)} not divisible by {factor}")
  blocks = mask.reshape(*lead, h // factor, factor, w // factor, factor, c)
  if mode == "all":
    return blocks.min(axis=(-4, -2))
  if mode == "any":
    return blocks.max(axis=(-4, -2))
  if mode == "mean":
    return blocks.mean(axis=(-4, -2), dtype=np.float32)
  raise ValueError(f"unknown mode {mode!r}: 'all', 'any' or 'mean'")
