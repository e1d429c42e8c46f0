"""The papers' metrics from features and flows, as the authors' scripts (CustomCrafter `eval/`, VBench's
`dynamic_degree.py`) compute them. Pure numpy (float64 sums), no models.

  CLIP-T   mean over frames of cos(frame, prompt), CLIP ViT-B/32 features.
  CLIP-I   mean over frames of cos(frame, reference); several references: mean over them.
  DINO-I   the same with DINO ViT-S/16 CLS tokens.
  T.Cons   mean over consecutive frame pairs of cos(frame_i, frame_i+1), CLIP image features.
  DD       per consecutive pair of (fps-subsampled) frames, the mean of the top 5% RAFT flow magnitudes;
           a video is moving when at least round(4 N / 16) of them exceed a threshold (N frames).
Raw cosines (no x100). The set's CLIP-I / DINO-I means are over every (video, reference) pair, as the
authors' `count_id` does; the others over videos.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DD_THRESHOLDS = ("authors", "vbench")


def l2_normalize(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def mean_cosine(frames, targets) -> float:
  """Mean over frames and targets of cos(frame, target). frames `(F, D)`, targets `(D,)` or `(R, D)`."""
  f = l2_normalize(frames)
  t = l2_normalize(np.atleast_2d(targets))
  return float((f @ t.T).mean())


def clip_t(frame_features, text_feature) -> float:
  return mean_cosine(frame_features, text_feature)


def image_similarity(frame_features, reference_features) -> float:
  """CLIP-I / DINO-I of one video: per reference the frame mean, then the mean over references."""
  return mean_cosine(frame_features, reference_features)


def t_cons(frame_features) -> float:
  """Mean cosine of consecutive frames. Needs >= 2 frames."""
  f = l2_normalize(frame_features)
  if f.shape[0] < 2:
    raise ValueError("temporal consistency needs at least 2 frames")
  return float(np.sum(f[:-1] * f[1:], axis=-1).mean())


# ---------------------------------------------------------------------------------------- dynamic degree


def dd_frame_interval(fps: float | None) -> int:
  """Frames kept for DD: every round(fps / 8)-th (at least every frame; frame folders: every frame)."""
  if not fps:
    return 1
  return max(1, round(fps / 8))


def dd_threshold(height: int, width: int, *, kind: str = "authors", fps: float | None = None) -> float:
  """The per-pair motion threshold in pixels, for frames of `height` x `width` (before padding).

  authors: 4 * min(H, W) / 256 (CustomCrafter eval/eval_dd.py).
  vbench:  max(1, 8 / fps) * 6 * min(H, W) / 256. (VBench's dynamic_degree.py had the fps factor from
           2024-07-03 until 2024-07-13; since then its code uses 6 * min(H, W) / 256, the same at
           fps >= 8.) fps None counts as 8.
  """
  scale = min(height, width) / 256.0
  if kind == "authors":
    return 4.0 * scale
  if kind == "vbench":
    factor = max(1.0, 8.0 / fps) if fps else 1.0
    return factor * 6.0 * scale
  raise ValueError(f"unknown DD threshold {kind!r}; known: {DD_THRESHOLDS}")


def top5_mean(magnitudes) -> np.ndarray:
  """Mean of the largest int(0.05 * H * W) values of each `(..., H, W)` map -> `(...)` (NaN if none)."""
  m = np.asarray(magnitudes, np.float64)
  flat = m.reshape(*m.shape[:-2], -1)
  k = int(flat.shape[-1] * 0.05)
  if k == 0:
    return np.full(flat.shape[:-1], np.nan)
  return -np.sort(-flat, axis=-1)[..., :k].mean(-1)


def dd_moving(scores: Sequence[float], num_frames: int, threshold: float) -> bool:
  """The authors' check: moving once round(4 N / 16) pair scores exceed the threshold (Python's round;
  with a count of 0 any video with at least one pair is moving, with no pair none is)."""
  needed = round(4 * (num_frames / 16.0))
  return len(scores) > 0 and sum(1 for s in scores if s > threshold) >= needed
