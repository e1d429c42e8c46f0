"""Image preprocessing of the evaluation models, as the authors' scripts do it (PIL, on the host).

  CLIP (the `clip` package's transform): bicubic resize of the short side to 224 (long side
      int(224 * long / short)), centre crop 224, /255, CLIP mean / std.
  DINO (transformers' ViTImageProcessor of dino-vits16): bilinear resize to 224x224, /255, ImageNet
      mean / std.

Both take uint8 `(H, W, 3)` RGB and return float32 `(224, 224, 3)`, channels-last.

The centre crop's offset differs between the two CLIP preprocessors the papers could have used: the
`clip` package (torchvision) starts at int(round((H - 224) / 2)), transformers' CLIPImageProcessor at
(H - 224) // 2; they disagree by one pixel when H - 224 is 3 mod 4 (e.g. a 512x680 frame). `crop="clip"`
(the authors') is the default; `crop="transformers"` reproduces transformers exactly.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _rgb(image) -> Image.Image:
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"expected a uint8 (H, W, 3) image, got {array.dtype} {array.shape}")
  return Image.fromarray(array)


def _normalize(image: Image.Image, mean, std) -> np.ndarray:
  return (np.asarray(image, np.float32) / np.float32(255.0) - mean) / std


def clip_image(image, size: int = 224, *, crop: str = "clip") -> np.ndarray:
  """uint8 `(H, W, 3)` (or a PIL image) -> float32 `(size, size, 3)` CLIP input."""
  img = _rgb(image)
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  if (new_w, new_h) != (w, h):
    img = img.resize((new_w, new_h), Image.BICUBIC)
  if crop == "clip":
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  elif crop == "transformers":
    top, left = (new_h - size) // 2, (new_w - size) // 2
  else:
    raise ValueError(f"crop must be 'clip' or 'transformers', got {crop!r}")
  img = img.crop((left, top, left + size, top + size))
  return _normalize(img, CLIP_MEAN, CLIP_STD)


def dino_image(image, size: int = 224) -> np.ndarray:
  """uint8 `(H, W, 3)` (or a PIL image) -> float32 `(size, size, 3)` DINO ViT input."""
  img = _rgb(image)
  if img.size != (size, size):
    img = img.resize((size, size), Image.BILINEAR)
  return _normalize(img, IMAGENET_MEAN, IMAGENET_STD)


def batch(fn, images, **kwargs) -> np.ndarray:
  """`fn` over a sequence of images -> `(N, size, size, 3)`."""
  return np.stack([fn(image, **kwargs) for image in images])
