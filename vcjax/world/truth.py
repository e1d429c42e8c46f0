"""Ground truth from a clip's subject masks: centroid track, motion class, displacement (dynamic degree).

Plain numpy on masks `(F, H, W)` (bool, or uint8 thresholded at 128), so the same functions score the
world's own masks and, later, masks segmented from generated videos. Motion names are the world's
(motion.MOTIONS): the 8 compass directions, "still", "spin", "grow", "shrink".

Classification, in order (thresholds in MotionThresholds, as fractions of the frame side):
  1. area(last) / area(first) >= grow_ratio -> "grow"; <= 1 / grow_ratio -> "shrink";
  2. net displacement of the fitted centroid track >= min_travel -> the compass sector of its direction;
  3. mean (1 - IoU) of consecutive masks >= min_change -> "spin" (the silhouette turns in place);
  4. else "still".
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from vcjax.world.motion import COMPASS


@dataclasses.dataclass(frozen=True)
class MotionThresholds:
  grow_ratio: float = 1.5  # The world's grow range (0.65 -> 1.3) changes the area 4x.
  min_travel: float = 0.08  # Of the side; the slowest world speed travels 0.2.
  min_change: float = 0.01  # A still sprite's masks are identical (change 0).


def _bool(masks: np.ndarray) -> np.ndarray:
  masks = np.asarray(masks)
  return masks >= 128 if masks.dtype == np.uint8 else masks.astype(bool)


def areas(masks: np.ndarray) -> np.ndarray:
  """`(F, H, W)` -> `(F,)` mask areas in pixels."""
  return _bool(masks).sum((1, 2)).astype(np.float64)


def centroids(masks: np.ndarray) -> np.ndarray:
  """`(F, H, W)` -> `(F, 2)` (y, x) mask centroids at pixel centres (i + 0.5); NaN for empty masks."""
  m = _bool(masks)
  area = m.sum((1, 2)).astype(np.float64)
  h, w = m.shape[1:]
  ys = (m.sum(2) * (np.arange(h) + 0.5)).sum(1)
  xs = (m.sum(1) * (np.arange(w) + 0.5)).sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.stack([ys / area, xs / area], 1)


def _valid(track: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  ok = np.isfinite(track).all(1)
  return np.nonzero(ok)[0].astype(np.float64), track[ok]


def velocity(masks: np.ndarray) -> np.ndarray:
  """Least-squares (dy, dx) of the centroid track, pixels per frame; zeros with < 2 non-empty frames."""
  t, c = _valid(centroids(masks))
  if len(t) < 2:
    return np.zeros(2)
  t = t - t.mean()
  return (t[:, None] * (c - c.mean(0))).sum(0) / (t * t).sum()


def mean_displacement(masks: np.ndarray, normalize: bool = False) -> float:
  """Dynamic degree: the mean centroid displacement between consecutive frames (pixels, or fractions of
  the frame side with normalize). Pairs with an empty mask are skipped; 0 when none is left."""
  c = centroids(masks)
  d = np.linalg.norm(np.diff(c, axis=0), axis=1)
  d = d[np.isfinite(d)]
  value = float(d.mean()) if len(d) else 0.0
  return value / min(np.shape(masks)[1:]) if normalize else value


def mask_change(masks: np.ndarray) -> float:
  """Mean 1 - IoU of consecutive masks (0 for identical masks; pairs of empty masks count as 0)."""
  m = _bool(masks)
  inter = (m[1:] & m[:-1]).sum((1, 2))
  union = (m[1:] | m[:-1]).sum((1, 2))
  iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
  return float((1 - iou).mean()) if len(iou) else 0.0


def compass(dy: float, dx: float) -> str:
  """The compass name of an image-space direction (y down): nearest of 8 sectors of 45 degrees."""
  angle = math.atan2(-dy, dx)  # y up, counter-clockwise from "right".
  return COMPASS[int(round(angle / (math.pi / 4))) % 8]


def motion_class(masks: np.ndarray, thresholds: MotionThresholds = MotionThresholds()) -> str:
  """`(F, H, W)` masks -> the world motion name they show (module doc for the rules)."""
  m = _bool(masks)
  a = areas(m)
  nz = np.nonzero(a > 0)[0]
  if len(nz) < 2:
    return "still"
  ratio = a[nz[-1]] / a[nz[0]]
  if ratio >= thresholds.grow_ratio:
    return "grow"
  if ratio <= 1 / thresholds.grow_ratio:
    return "shrink"
  vel = velocity(m)
  travel = np.linalg.norm(vel) * (len(m) - 1) / min(m.shape[1:])
  if travel >= thresholds.min_travel:
    return compass(*vel)
  if mask_change(m) >= thresholds.min_change:
    return "spin"
  return "still"


def speed_class(masks: np.ndarray, speeds) -> str | None:
  """The nearest of `speeds` ((name, word, travel fraction) as in WorldConfig.speeds) to the fitted
  centroid travel over the clip; None when the masks do not translate (see motion_class)."""
  m = _bool(masks)
  if motion_class(m) not in COMPASS:
    return None
  travel = np.linalg.norm(velocity(m)) * (len(m) - 1) / min(m.shape[1:])
  return min(speeds, key=lambda s: abs(s[2] - travel))[0]
