"""Subject Highlight Preprocessing (SHP, VideoMaker, METHODS.md §3) and the square-canvas helpers it uses.

SHP turns a frame (or subject image) plus a subject mask into a reference image: background -> white, crop to
the subject's box with a random 1-20% cut on one side, pad to a square with white, resize, random affine
(rotation / translation / scale, white fill) and random horizontal flip. Pure numpy + PIL; every random
number comes from the numpy Generator passed in, so the output is a function of (inputs, rng state).
Masks come from an external detector/segmenter; vcjax only consumes them.

Arrays: images `(H, W, 3)` uint8, masks `(H, W)` uint8 (0 background .. 255 subject), boxes
`(y0, x0, y1, x1)` ints, end-exclusive.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from vcjax import media

WHITE = 255


@dataclasses.dataclass(frozen=True)
class SHPConfig:
  """SHP parameters. Ranges are (low, high) of uniform draws; 0 / (1, 1) disables a step.

  crop_to_box: crop to the subject's mask box (else keep the whole valid image).
  cut: fraction of the box's extent cut from ONE random side (top, bottom, left or right).
  rotation: max |angle| in degrees. translate: max |shift| as a fraction of the side. scale: zoom range.
  flip_prob: probability of a horizontal flip.
  """
  crop_to_box: bool = True
  cut: tuple[float, float] = (0.01, 0.2)
  rotation: float = 0.0
  translate: float = 0.0
  scale: tuple[float, float] = (0.8, 1.2)
  flip_prob: float = 0.5


# VideoBooth-style objects: box crop with a cut, scale 0.8-1.2, flip.
SHP_OBJECT = SHPConfig()
# CelebV-Text humans: whole (white-background) head frame; rotation 30, translate 0.1, scale 0.6-1.2, flip.
SHP_HUMAN = SHPConfig(crop_to_box=False, cut=(0.0, 0.0), rotation=30.0, translate=0.1, scale=(0.6, 1.2))
SHP_PRESETS = {"object": SHP_OBJECT, "human": SHP_HUMAN}


# ------------------------------------------------------------------------------------------ canvases

def fit_in_square(image: np.ndarray, size: int, fill: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
  """Resize (aspect kept) so the longer side is `size`, center on a `size x size` canvas filled with `fill`.

  image: `(H, W, 3)` (bicubic) or a `(H, W)` mask (bilinear) uint8. Returns (canvas, box of the image on
  the canvas).
  """
  h, w = image.shape[:2]
  s = size / max(h, w)
  nh, nw = max(1, round(h * s)), max(1, round(w * s))
  top, left = (size - nh) // 2, (size - nw) // 2
  canvas = np.full((size, size) + image.shape[2:], fill, dtype=np.uint8)
  canvas[top:top + nh, left:left + nw] = _resize_soft(image, (nh, nw))
  return canvas, (top, left, top + nh, left + nw)


def _resize_soft(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bicubic for images, bilinear for masks (bicubic overshoot would leak subject into a white background)."""
  if array.ndim == 2:
    if array.shape == tuple(size):
      return array
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.BILINEAR), dtype=np.uint8)
  return media.resize(array, size)


def pad_to_square(image: np.ndarray, fill: int) -> np.ndarray:
  """Center `image` on a square canvas of side max(H, W) filled with `fill`."""
  h, w = image.shape[:2]
  s = max(h, w)
  canvas = np.full((s, s) + image.shape[2:], fill, dtype=np.uint8)
  top, left = (s - h) // 2, (s - w) // 2
  canvas[top:top + h, left:left + w] = image
  return canvas


def box_mask(shape: tuple[int, int], box) -> np.ndarray:
  """A `(H, W)` uint8 mask, 255 inside `box`."""
  m = np.zeros(shape, dtype=np.uint8)
  y0, x0, y1, x1 = (int(v) for v in box)
  m[y0:y1, x0:x1] = 255
  return m


# ------------------------------------------------------------------------------------------ SHP steps

def whiten_background(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Blend the image onto white with the mask as alpha: background exactly white, subject unchanged."""
  a = mask.astype(np.float32)[..., None] / 255.0
  out = image.astype(np.float32) * a + WHITE * (1.0 - a)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def subject_box(mask: np.ndarray, threshold: int = 128):
  """The tight box `(y0, x0, y1, x1)` of mask >= threshold, or None if the mask is empty."""
  on = mask >= threshold
  rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
  if rows.size == 0:
    return None
  return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def cut_one_side(box, rng: np.random.Generator, cut: tuple[float, float]):
  """Shrink `box` on one random side by a fraction ~ U(cut) of its extent along that axis (>= 1 px left).

  Always draws two numbers (side, fraction) from `rng`.
  """
  side = int(rng.integers(4))
  frac = float(rng.uniform(*cut))
  y0, x0, y1, x1 = box
  dy, dx = int(frac * (y1 - y0)), int(frac * (x1 - x0))
  if side == 0:
    y0 = min(y0 + dy, y1 - 1)
  elif side == 1:
    y1 = max(y1 - dy, y0 + 1)
  elif side == 2:
    x0 = min(x0 + dx, x1 - 1)
  else:
    x1 = max(x1 - dx, x0 + 1)
  return y0, x0, y1, x1


def affine_matrix(size: int, angle: float, translate: tuple[float, float], scale: float) -> tuple:
  """PIL AFFINE data (output pixel -> input pixel) for: rotate by `angle` degrees counter-clockwise and
  scale by `scale` about the center, then shift by `translate = (tx, ty)` pixels."""
  c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
  cx = cy = size / 2.0
  tx, ty = translate
  a, b, d, e = c / scale, -s / scale, s / scale, c / scale
  # Input = C + R^-1 (out - C - T) / scale.
  return (a, b, cx - a * (cx + tx) - b * (cy + ty), d, e, cy - d * (cx + tx) - e * (cy + ty))


def random_affine(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, rotation: float,
                  translate: float, scale: tuple[float, float]):
  """The same random rotation/translation/scale applied to a square image (white fill, bicubic) and its
  mask (0 fill, bilinear). Always draws four numbers from `rng`."""
  size = image.shape[0]
  angle = float(rng.uniform(-rotation, rotation))
  tx = float(rng.uniform(-translate, translate)) * size
  ty = float(rng.uniform(-translate, translate)) * size
  zoom = float(rng.uniform(*scale))
  if angle == 0.0 and tx == 0.0 and ty == 0.0 and zoom == 1.0:
    return image, mask
  data = affine_matrix(size, angle, (round(tx), round(ty)), zoom)
  img = Image.fromarray(image).transform((size, size), Image.AFFINE, data, resample=Image.BICUBIC,
                                         fillcolor=(WHITE,) * 3)
  msk = Image.fromarray(mask).transform((size, size), Image.AFFINE, data, resample=Image.BILINEAR,
                                        fillcolor=0)
  img, msk = np.asarray(img, dtype=np.uint8), np.asarray(msk, dtype=np.uint8)
  # Bicubic can ring around the subject's edge: keep the background exactly white.
  return np.where(msk[..., None] == 0, np.uint8(WHITE), img), msk


def subject_highlight(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, out_size: int,
                      config: SHPConfig = SHP_OBJECT, valid_box=None):
  """SHP: `(H, W, 3)` uint8 image + `(H, W)` uint8 subject mask -> (`(S, S, 3)` uint8 reference on white,
  `(S, S)` uint8 mask), S = out_size.

  mask None = the whole `valid_box` (default: the whole image) is the subject. `valid_box` excludes
  canvas padding of the stored image. Pixels where the returned mask is 0 are exactly white.
  The rng draws are the same in number whatever the config, so a seed gives one fixed stream.
  """
  h, w = image.shape[:2]
  valid_box = tuple(valid_box) if valid_box is not None else (0, 0, h, w)
  if mask is None:
    mask = box_mask((h, w), valid_box)
  else:
    mask = np.minimum(mask, box_mask((h, w), valid_box))
  image = whiten_background(image, mask)

  box = (subject_box(mask) or valid_box) if config.crop_to_box else valid_box
  box = cut_one_side(box, rng, config.cut)
  y0, x0, y1, x1 = box
  image, mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]

  image = media.resize(pad_to_square(image, WHITE), (out_size, out_size))
  mask = _resize_soft(pad_to_square(mask, 0), (out_size, out_size))
  image = np.where(mask[..., None] == 0, np.uint8(WHITE), image)

  image, mask = random_affine(image, mask, rng, rotation=config.rotation, translate=config.translate,
                              scale=config.scale)
  if rng.random() < config.flip_prob:
    image, mask = image[:, ::-1], mask[:, ::-1]
  return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def letterbox(image: np.ndarray, size: tuple[int, int], fill: int = WHITE) -> np.ndarray:
  """Fit a square `(S, S, 3)` image into a `(H, W)` canvas (side min(H, W)), centered on `fill`."""
  h, w = size
  if image.shape[:2] == (h, w):
    return image
  side = min(h, w)
  canvas = np.full((h, w, 3), fill, dtype=np.uint8)
  top, left = (h - side) // 2, (w - side) // 2
  canvas[top:top + side, left:left + side] = media.resize(image, (side, side))
  return canvas
