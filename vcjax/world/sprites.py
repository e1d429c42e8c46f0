"""Sprite shapes, patterns and colours, rasterised with numpy.

A sprite lives in its own local frame: coordinates (u, v) with u to the right and v DOWN (image order), in
units of the sprite's radius r. Every shape is normalised (once, numerically) so its area centroid is the
origin and its farthest point is at distance 1: a sprite of radius r at centre c fits in the circle (c, r)
at any rotation, and rotating or scaling it about c does not move its mask centroid (the ground truth in
truth.py relies on this). Patterns are also functions of (u, v), so they move, turn and scale with the
sprite.

All tables are data: a new shape, pattern or colour is one entry, nothing else changes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import numpy as np

Array = np.ndarray


# ------------------------------------------------------------------------------------------ shapes

def _polygon(n: int, u: Array, v: Array) -> Array:
  """Regular n-gon, circumradius 1, a vertex pointing up (-v)."""
  phi = np.arctan2(v, u) + math.pi / 2  # 0 at the top vertex.
  sector = 2 * math.pi / n
  a = np.mod(phi, sector) - sector / 2
  return np.hypot(u, v) * np.cos(a) <= math.cos(math.pi / n)


def _star(u: Array, v: Array, points: int = 5, inner: float = 0.45) -> Array:
  """Star polygon: outer radius 1, inner radius `inner`, a point up."""
  phi = np.arctan2(v, u) + math.pi / 2
  sector = 2 * math.pi / points
  # Fold into half a sector: a = 0 on a point's axis, sector/2 on an inner vertex's axis.
  a = np.abs(np.mod(phi + sector / 2, sector) - sector / 2)
  rho = np.hypot(u, v)
  px, py = rho * np.cos(a), rho * np.sin(a)
  # Inside = the origin's side of the edge from the point O = (1, 0) to the inner vertex I.
  ix, iy = inner * math.cos(math.pi / points), inner * math.sin(math.pi / points)
  return (ix - 1.0) * py - iy * (px - 1.0) >= 0


def _heart(u: Array, v: Array) -> Array:
  x, y = 1.15 * u, -1.15 * v + 0.2  # The classic implicit heart, y up.
  x2, q = x * x, x * x + y * y - 1
  return q * q * q - x2 * y * y * y <= 0


def _cross(u: Array, v: Array) -> Array:
  au, av = np.abs(u), np.abs(v)
  return ((au <= 0.34) & (av <= 0.9)) | ((av <= 0.34) & (au <= 0.9))


def _crescent(u: Array, v: Array) -> Array:
  return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + (v + 0.2) ** 2 > 0.72 ** 2)


@dataclasses.dataclass(frozen=True)
class Shape:
  """inside(u, v) -> bool array in the shape's raw frame (normalised by `_normalisation`).

  spins: whether a rotation changes the shape's silhouette (a circle's does not, so "spinning" is not
  sampled for it: the mask-based ground truth could not see it).
  """
  inside: Callable[[Array, Array], Array]
  spins: bool = True


SHAPES: dict[str, Shape] = {
    "circle": Shape(lambda u, v: u * u + v * v <= 1.0, spins=False),
    "square": Shape(lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.75),
    "triangle": Shape(functools.partial(_polygon, 3)),
    "hexagon": Shape(functools.partial(_polygon, 6)),
    "star": Shape(_star),
    "heart": Shape(_heart),
    "cross": Shape(_cross),
    "crescent": Shape(_crescent),
}


@functools.cache
def _normalisation(name: str) -> tuple[float, float, float]:
  """(cu, cv, s) so that raw = (cu, cv) + s * local puts the centroid at 0 and the farthest point at 1."""
  n = 601
  g = np.linspace(-1.6, 1.6, n)
  u, v = np.meshgrid(g, g)
  m = SHAPES[name].inside(u, v)
  cu, cv = float(u[m].mean()), float(v[m].mean())
  far = float(np.sqrt(((u[m] - cu) ** 2 + (v[m] - cv) ** 2).max())) + 3.2 / (n - 1)
  return cu, cv, far


def shape_inside(name: str, u: Array, v: Array) -> Array:
  """Inside test of shape `name` in normalised local coordinates (centroid 0, radius 1)."""
  cu, cv, s = _normalisation(name)
  return SHAPES[name].inside(cu + s * u, cv + s * v)


# ------------------------------------------------------------------------------------------ patterns

@dataclasses.dataclass(frozen=True)
class Pattern:
  """accent(u, v) -> bool array: where the colour's accent replaces its main colour. word: caption word."""
  word: str
  accent: Callable[[Array, Array], Array]


def _stripes(u, v, period=0.5):
  return np.mod((u + v) / (math.sqrt(2) * period), 1.0) < 0.5


def _dots(u, v, spacing=0.6, radius=0.2):
  du, dv = np.mod(u, spacing) - spacing / 2, np.mod(v, spacing) - spacing / 2
  return du * du + dv * dv <= radius * radius


def _checker(u, v, cell=0.5):
  return np.mod(np.floor(u / cell) + np.floor(v / cell), 2) == 1


def _rings(u, v, width=0.28):
  return np.mod(np.hypot(u, v) / width, 2.0) >= 1.0


PATTERNS: dict[str, Pattern] = {
    "solid": Pattern("solid", lambda u, v: np.zeros(np.broadcast(u, v).shape, bool)),
    "striped": Pattern("striped", _stripes),
    "dotted": Pattern("dotted", _dots),
    "checkered": Pattern("checkered", _checker),
    "ringed": Pattern("ringed", _rings),
}


# ------------------------------------------------------------------------------------------ colours

@dataclasses.dataclass(frozen=True)
class Colour:
  """rgb: the main colour; accent: the pattern's second colour, a darker (or, for dark colours, lighter)
  shade of the same hue so a patterned sprite still reads as one colour."""
  rgb: tuple[int, int, int]
  accent: tuple[int, int, int]


def _colour(rgb, dark: float = 0.4, light: float = 0.55) -> Colour:
  r = np.asarray(rgb, np.float64)
  lum = float(r @ [0.299, 0.587, 0.114]) / 255
  acc = r * dark if lum > 0.3 else r + (255 - r) * light
  return Colour(tuple(int(x) for x in rgb), tuple(int(round(x)) for x in acc))


COLOURS: dict[str, Colour] = {
    "red": _colour((220, 30, 30)),
    "orange": _colour((255, 140, 0)),
    "yellow": _colour((250, 225, 30)),
    "green": _colour((40, 190, 50)),
    "cyan": _colour((30, 215, 225)),
    "blue": _colour((35, 80, 235)),
    "purple": _colour((145, 50, 205)),
    "pink": _colour((255, 120, 190)),
    "white": _colour((245, 245, 245)),
    "black": _colour((25, 25, 25)),
}


# ------------------------------------------------------------------------------------------ rendering

def sprite_alpha_colour(shape: str, pattern: str, colour: str, u: Array, v: Array) -> tuple[Array, Array]:
  """Supersampled sprite: local coordinates u, v `(A*A, ...)` (first axis = the subsamples of a pixel)
  -> (alpha `(...)` float32 in [0, 1] = coverage, rgb `(..., 3)` float32 = mean colour of the covered
  subsamples)."""
  inside = shape_inside(shape, u, v)
  n = inside.shape[0]
  cov = inside.sum(0, dtype=np.float32)
  c = COLOURS[colour]
  main = np.asarray(c.rgb, np.float32)
  if pattern == "solid":  # No accent anywhere: skip the pattern test.
    return cov / n, np.broadcast_to(main, cov.shape + (3,))
  acc_n = (PATTERNS[pattern].accent(u, v) & inside).sum(0, dtype=np.float32)
  frac = np.divide(acc_n, cov, out=np.zeros_like(cov), where=cov > 0)[..., None]
  rgb = main + (np.asarray(c.accent, np.float32) - main) * frac
  return cov / n, rgb
