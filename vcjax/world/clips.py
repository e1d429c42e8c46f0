"""Clip sampling: (config, split, index) -> attributes -> frames, per-frame masks and boxes, caption.

Everything is a function of (config.seed, split, index): the attributes are drawn from a numpy Generator
seeded by those three numbers, and rendering draws nothing but the background texture, whose seed is one of
the attributes. Rendering is vectorised over frames and confined to a window around the sprite.

Arrays: frames `(F, H, W, 3)` uint8; masks `(F, H, W)` bool (sprite coverage >= 0.5); boxes `(F, 4)` int32
(y0, x0, y1, x1), end-exclusive, the tight box of each mask (the convention of vcjax/data).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from vcjax.world import backgrounds, captions, motion, sprites, splits
from vcjax.world.config import WorldConfig


@dataclasses.dataclass(frozen=True)
class ClipAttributes:
  """What a clip shows. The first seven fields are the caption's (captions.FIELDS); the rest are the
  continuous draws: start centre (y, x) px, start angle (degrees, clockwise) and the background seed."""
  size: str
  pattern: str
  colour: str
  shape: str
  motion: str
  speed: str | None
  background: str
  start: tuple[float, float]
  angle: float
  background_seed: int

  @property
  def combo(self) -> splits.Combo:
    return (self.shape, self.pattern, self.colour)

  def categorical(self) -> dict:
    """{field: name} of the caption's fields (what parse_caption returns)."""
    return {f: getattr(self, f) for f in captions.FIELDS}


@dataclasses.dataclass(frozen=True)
class Clip:
  """A rendered clip. centres `(F, 2)` (y, x), radii `(F,)` px and angles `(F,)` rad are the sprite's
  exact per-frame parameters (the renderer's input)."""
  frames: np.ndarray
  masks: np.ndarray
  boxes: np.ndarray
  caption: str
  attrs: ClipAttributes
  centres: np.ndarray
  radii: np.ndarray
  angles: np.ndarray


def clip_rng(config: WorldConfig, split: str, index: int, stream: str = "clip") -> np.random.Generator:
  """The Generator of clip `index` of `split` (stream: a name for independent draws, e.g. "reference")."""
  return np.random.default_rng([int(config.seed) % 2**32, splits.stream_id(split), int(index),
                                splits.stream_id(stream)])


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def sample_attributes(config: WorldConfig, index: int, split: str = "train", *, stream: str = "clip",
                      **fixed) -> ClipAttributes:
  """The attributes of clip `index` of `split`. `fixed` pins fields (e.g. motion="still", or
  shape/pattern/colour for renders of one subject); the draws happen in the same order either way."""
  rng = clip_rng(config, split, index, stream)
  combo = _pick(rng, splits.combos(config, split))
  shape, pattern, colour = (fixed.pop(k, v) for k, v in zip(("shape", "pattern", "colour"), combo))
  background = _pick(rng, config.backgrounds_for(colour))
  mot = _pick(rng, config.motions_for(shape))
  size = _pick(rng, config.sizes)[0]
  speed = _pick(rng, config.speeds)[0]
  u_start, u_angle = rng.random(2), rng.random()
  bg_seed = int(rng.integers(2**31))
  background, mot, size, speed = (fixed.pop(k, v) for k, v in
                                  zip(("background", "motion", "size", "speed"), (background, mot, size, speed)))
  if fixed:
    raise TypeError(f"unknown attributes {sorted(fixed)}")
  if motion.MOTIONS[mot].kind != "translate":
    speed = None
  lo, hi = motion.start_range(mot, radius_px(config, size), side=config.size, margin=config.margin * config.size,
                              speed_fraction=speed_fraction(config, speed), grow_range=config.grow_range)
  spread = config.path_spread if motion.MOTIONS[mot].kind == "translate" else 1.0
  start = (lo + hi) / 2 + (u_start - 0.5) * (hi - lo) * spread
  angle = (2 * u_angle - 1) * config.angle_jitter
  return ClipAttributes(size=size, pattern=pattern, colour=colour, shape=shape, motion=mot, speed=speed,
                        background=background, start=(float(start[0]), float(start[1])), angle=float(angle),
                        background_seed=bg_seed)


def radius_px(config: WorldConfig, size: str) -> float:
  return dict((n, f) for n, _, f in config.sizes)[size] * config.size / 2


def speed_fraction(config: WorldConfig, speed: str | None) -> float:
  return 0.0 if speed is None else dict((n, f) for n, _, f in config.speeds)[speed]


def render(config: WorldConfig, attrs: ClipAttributes, frames: int | None = None) -> Clip:
  """Attributes -> Clip (frames, masks, boxes, caption, exact track). frames: render only the first
  `frames` frames of the clip's motion (default all config.frames)."""
  f, side, a = frames or config.frames, config.size, config.antialias
  centres, radii, angles = motion.trajectory(
      attrs.motion, attrs.start, radius_px(config, attrs.size), math.radians(attrs.angle),
      frames=config.frames, side=side, speed_fraction=speed_fraction(config, attrs.speed),
      spin_degrees=config.spin_degrees, grow_range=config.grow_range)
  centres, radii, angles = centres[:f], radii[:f], angles[:f]
  bg = backgrounds.render_background(attrs.background, np.random.default_rng(attrs.background_seed), side, side)

  # A window per frame around the sprite's bounding circle; every frame's window has the same size.
  win = min(side, int(math.ceil(2 * radii.max())) + 3)
  oy = np.clip(np.floor(centres[:, 0] - radii.max()).astype(int) - 1, 0, side - win)
  ox = np.clip(np.floor(centres[:, 1] - radii.max()).astype(int) - 1, 0, side - win)
  # float32 from here on: the per-subsample arrays dominate the cost.
  sub = ((np.arange(a) + 0.5) / a).astype(np.float32)
  grid = np.arange(win)
  cy = (centres[:, 0] - oy).astype(np.float32)[:, None]  # Centres relative to each window, (F, 1).
  cx = (centres[:, 1] - ox).astype(np.float32)[:, None]
  ys = (grid.astype(np.float32)[None, None, :] + sub[:, None, None]) - cy[None]  # (A, F, win)
  xs = (grid.astype(np.float32)[None, None, :] + sub[:, None, None]) - cx[None]
  inv = (1.0 / radii).astype(np.float32)[:, None]
  cos, sin = np.cos(angles).astype(np.float32)[:, None] * inv, np.sin(angles).astype(np.float32)[:, None] * inv
  # Screen -> sprite frame: undo the rotation (clockwise on screen, y down) and the scale. Each product is
  # a row term plus a column term, built at (A, F, win) and broadcast to (A_y, A_x, F, win_y, win_x); the
  # subsamples lead so that summing over them adds whole arrays (fast) instead of reducing a tiny axis.
  u = (cos * xs)[None, :, :, None, :] + (sin * ys)[:, None, :, :, None]
  v = (cos * ys)[:, None, :, :, None] - (sin * xs)[None, :, :, None, :]
  u, v = u.reshape(a * a, f, win, win), v.reshape(a * a, f, win, win)
  alpha, rgb = sprites.sprite_alpha_colour(attrs.shape, attrs.pattern, attrs.colour, u, v)

  bg8 = np.clip(np.rint(bg), 0, 255).astype(np.uint8)
  frames = np.broadcast_to(bg8, (f, side, side, 3)).copy()
  masks = np.zeros((f, side, side), bool)
  fi = np.arange(f)[:, None, None]
  iy, ix = (oy[:, None] + grid)[:, :, None], (ox[:, None] + grid)[:, None, :]
  under = frames[fi, iy, ix].astype(np.float32)
  frames[fi, iy, ix] = np.clip(np.rint(under + (rgb - under) * alpha[..., None]), 0, 255).astype(np.uint8)
  masks[fi, iy, ix] = alpha >= 0.5
  out = frames
  return Clip(frames=out, masks=masks, boxes=mask_boxes(masks), caption=captions.caption(config, attrs),
              attrs=attrs, centres=centres, radii=radii, angles=angles)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
  """`(F, H, W)` bool -> `(F, 4)` int32 tight boxes (y0, x0, y1, x1), end-exclusive; zeros for empty masks."""
  rows, cols = masks.any(2), masks.any(1)
  h, w = masks.shape[1:]
  y0, y1 = rows.argmax(1), h - rows[:, ::-1].argmax(1)
  x0, x1 = cols.argmax(1), w - cols[:, ::-1].argmax(1)
  boxes = np.stack([y0, x0, y1, x1], 1).astype(np.int32)
  boxes[~rows.any(1)] = 0
  return boxes


def sample_clip(config: WorldConfig, index: int, split: str = "train", **fixed) -> Clip:
  """Clip `index` of `split` (see sample_attributes for `fixed`)."""
  return render(config, sample_attributes(config, index, split, **fixed))


def still_image(config: WorldConfig, index: int, combo: splits.Combo, split: str = "heldout",
                stream: str = "image") -> Clip:
  """A one-frame "standing still" clip of one sprite combination on a drawn background (one it stands out
  against), position and size: subject images and references. Uses its own random stream."""
  shape, pattern, colour = combo
  attrs = sample_attributes(config, index, split, stream=stream, shape=shape, pattern=pattern, colour=colour,
                            motion="still")
  return render(config, attrs, frames=1)
