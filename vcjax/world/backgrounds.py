"""Backgrounds: plain colours, gradients and simple procedural textures (grass, water, sky, ...).

Each background is a function (rng, height, width) -> `(H, W, 3)` float32 in [0, 255]; its texture noise is
drawn from the rng it is given (so a clip's background is a function of the clip's seed), and its feature
sizes are fractions of the image side (the same look at any resolution). `phrase` is the caption's words;
`avoid` lists sprite colours that would not stand out against it (never sampled together).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

Array = np.ndarray


def value_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[float, float]) -> Array:
  """Smooth noise `(H, W)` float32 in [0, 1]: a random (cy+2, cx+2) grid, bilinear over the image, where
  cells = (cy, cx) is the number of grid cells along each side (small = blobs, large = grain)."""
  cy, cx = max(1, int(round(cells[0]))), max(1, int(round(cells[1])))
  grid = rng.random((cy + 2, cx + 2), dtype=np.float32)
  oy, ox = rng.random(2)  # A random sub-cell offset, so grid lines do not sit at the same place.
  y = (np.arange(h, dtype=np.float32) + 0.5) / h * cy + oy
  x = (np.arange(w, dtype=np.float32) + 0.5) / w * cx + ox
  y0, x0 = np.floor(y).astype(np.int32), np.floor(x).astype(np.int32)
  fy, fx = (y - y0)[:, None], (x - x0)[None, :]
  fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # Smoothstep: no creases at cell edges.
  a, b = grid[y0][:, x0], grid[y0][:, x0 + 1]
  c, d = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
  return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _rgb(c) -> Array:
  return np.asarray(c, np.float32)


def _vertical(h: int, w: int, top, bottom) -> Array:
  t = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None, None]
  return np.broadcast_to(_rgb(top) * (1 - t) + _rgb(bottom) * t, (h, w, 3)).copy()


def _plain(rgb):
  return lambda rng, h, w: np.broadcast_to(_rgb(rgb), (h, w, 3)).copy()


def _grass(rng, h, w):
  blades = value_noise(rng, h, w, (3, w / 2.5))  # Stretched vertically: blades of grass.
  patches = value_noise(rng, h, w, (3, 3))
  shade = 0.6 + 0.35 * blades + 0.25 * patches
  return _rgb((55, 150, 45)) * shade[..., None]


def _water(rng, h, w):
  y = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h
  x = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w
  phase = rng.random(2) * 2 * np.pi
  ripple = np.sin(2 * np.pi * (7 * y + 0.12 * np.sin(2 * np.pi * 2.5 * x + phase[0])) + phase[1])
  crest = np.clip(ripple - 0.55, 0, None) / 0.45  # Thin bright wave crests.
  base = _vertical(h, w, (25, 85, 170), (15, 60, 135))
  return base + (crest * 110 + 25 * value_noise(rng, h, w, (4, 4)))[..., None]


def _sky(rng, h, w):
  base = _vertical(h, w, (80, 150, 230), (185, 215, 245))
  n = (0.5 * value_noise(rng, h, w, (2, 3)) + 0.3 * value_noise(rng, h, w, (4, 6))
       + 0.2 * value_noise(rng, h, w, (8, 12)))  # Octaves: soft blobs with ragged edges.
  cloud = np.clip((n - 0.52) / 0.16, 0, 1)[..., None]
  return base * (1 - cloud) + _rgb((250, 250, 252)) * cloud


def _sand(rng, h, w):
  y = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h
  x = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w
  dune = np.sin(2 * np.pi * (2.2 * y + 0.3 * x + rng.random()))
  grain = rng.random((h, w), dtype=np.float32)
  shade = 0.88 + 0.07 * dune + 0.1 * grain
  return _rgb((222, 196, 140)) * shade[..., None]


def _bricks(rng, h, w):
  rows = 8
  bh = h / rows
  bw = 2 * bh
  y = np.arange(h, dtype=np.float32)[:, None] + 0.5
  x = np.arange(w, dtype=np.float32)[None, :] + 0.5
  row = np.floor(y / bh).astype(np.int32)
  xs = x + (row % 2) * bw / 2  # Every other row shifted by half a brick.
  col = np.floor(xs / bw).astype(np.int32)
  mortar = (np.mod(y, bh) < max(1.0, bh * 0.14)) | (np.mod(xs, bw) < max(1.0, bh * 0.14))
  tint = rng.uniform(0.8, 1.1, (rows + 1, int(w / bw) + 3)).astype(np.float32)[row, col]
  brick = _rgb((165, 75, 50)) * tint[..., None]
  return np.where(mortar[..., None], _rgb((205, 200, 190)), brick)


def _night(rng, h, w):
  base = _vertical(h, w, (10, 12, 40), (30, 35, 80))
  stars = rng.random((h, w)) < 0.012
  return np.where(stars[..., None], _rgb((235, 235, 210)), base)


def _sunset(rng, h, w):
  base = _vertical(h, w, (115, 45, 125), (250, 160, 80))
  return base + (12 * value_noise(rng, h, w, (2, 3)) - 6)[..., None]


@dataclasses.dataclass(frozen=True)
class Background:
  phrase: str
  render: Callable[[np.random.Generator, int, int], Array]
  avoid: tuple[str, ...] = ()


BACKGROUNDS: dict[str, Background] = {
    "grass": Background("over grass", _grass, ("green",)),
    "water": Background("over water", _water, ("blue", "cyan")),
    "sky": Background("in the sky", _sky, ("blue", "cyan", "white")),
    "sand": Background("over sand", _sand, ("yellow", "orange", "white")),
    "bricks": Background("by a brick wall", _bricks, ("red", "orange")),
    "night": Background("at night", _night, ("black", "blue", "purple")),
    "sunset": Background("at sunset", _sunset, ("orange", "pink", "purple", "red")),
    "gray": Background("on a gray background", _plain((128, 128, 128)), ()),
    "white": Background("on a white background", _plain((250, 250, 250)), ("white", "yellow")),
}


def render_background(name: str, rng: np.random.Generator, h: int, w: int) -> Array:
  """Background `name` -> `(H, W, 3)` float32 in [0, 255]."""
  return np.clip(BACKGROUNDS[name].render(rng, h, w), 0, 255).astype(np.float32)
