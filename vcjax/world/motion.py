"""Motions: the 8 compass directions (at the config's speeds), spinning, growing, shrinking, standing still.

A motion turns a clip's start state into per-frame sprite parameters: centres `(F, 2)` (y, x) in pixels
(pixel i covers [i, i+1)), radii `(F,)` in pixels and angles `(F,)` in radians (clockwise on screen: y is
down). Translation speeds are total displacements over the clip as a fraction of the frame side, so
changing the frame count changes the sampling of a motion, not how far it goes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

_D = 1 / math.sqrt(2)


@dataclasses.dataclass(frozen=True)
class Motion:
  """phrase: the caption's words. kind: "translate" | "still" | "spin" | "grow" | "shrink".
  direction: (dy, dx) unit vector in image coordinates (y down), for "translate"."""
  phrase: str
  kind: str
  direction: tuple[float, float] = (0.0, 0.0)


MOTIONS: dict[str, Motion] = {
    "right": Motion("moving right", "translate", (0.0, 1.0)),
    "up_right": Motion("moving up right", "translate", (-_D, _D)),
    "up": Motion("moving up", "translate", (-1.0, 0.0)),
    "up_left": Motion("moving up left", "translate", (-_D, -_D)),
    "left": Motion("moving left", "translate", (0.0, -1.0)),
    "down_left": Motion("moving down left", "translate", (_D, -_D)),
    "down": Motion("moving down", "translate", (1.0, 0.0)),
    "down_right": Motion("moving down right", "translate", (_D, _D)),
    "still": Motion("standing still", "still"),
    "spin": Motion("spinning", "spin"),
    "grow": Motion("growing", "grow"),
    "shrink": Motion("shrinking", "shrink"),
}
# Counter-clockwise from "right" in 45 degree steps (angle measured with y UP): truth.py's sector order.
COMPASS = ("right", "up_right", "up", "up_left", "left", "down_left", "down", "down_right")


def scale_track(kind: str, frames: int, grow_range: tuple[float, float]) -> np.ndarray:
  """Per-frame radius factor `(F,)`: linear from grow_range[0] to [1] ("grow"), reversed ("shrink"), else 1."""
  t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
  lo, hi = grow_range
  if kind == "grow":
    return lo + (hi - lo) * t
  if kind == "shrink":
    return hi + (lo - hi) * t
  return np.ones(frames)


def displacement(motion: str, speed_fraction: float, side: int) -> np.ndarray:
  """Total (dy, dx) in pixels over the clip."""
  m = MOTIONS[motion]
  if m.kind != "translate":
    return np.zeros(2)
  return np.asarray(m.direction) * speed_fraction * side


def trajectory(motion: str, start: tuple[float, float], radius: float, angle: float, *, frames: int,
               side: int, speed_fraction: float, spin_degrees: float,
               grow_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(centres `(F, 2)`, radii `(F,)`, angles `(F,)`) of a sprite starting at `start` (y, x) px with base
  `radius` px and `angle` rad."""
  m = MOTIONS[motion]
  t = np.linspace(0.0, 1.0, frames)[:, None] if frames > 1 else np.zeros((1, 1))
  centres = np.asarray(start, np.float64)[None] + t * displacement(motion, speed_fraction, side)[None]
  radii = radius * scale_track(m.kind, frames, grow_range)
  spin = math.radians(spin_degrees) if m.kind == "spin" else 0.0
  angles = angle + spin * t[:, 0]
  return centres, radii, angles


def start_range(motion: str, radius: float, *, side: int, margin: float, speed_fraction: float,
                grow_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
  """(low, high) `(2,)` bounds of the start centre so the sprite's bounding circle stays at least `margin`
  px inside the frame on every frame; low > high means the motion cannot fit."""
  kind = MOTIONS[motion].kind
  rmax = radius * float(scale_track(kind, 2, grow_range).max())
  d = displacement(motion, speed_fraction, side)
  lo = rmax + margin - np.minimum(d, 0.0)
  hi = side - rmax - margin - np.maximum(d, 0.0)
  return lo, hi
