"""Training batches: the real grain loaders (`folder_loader` -> vcjax.data.loaders.make_loader) or a
deterministic synthetic source. Each task's `data()` picks one (train/task.py).

Both yield numpy dicts (what a task's loss reads, e.g. pixels `(B, F, H, W, 3)` in [-1, 1],
input_ids `(B, T)` int32) and have `get_state()` / `set_state(state)` with a JSON-serialisable state,
saved in every checkpoint.

config.data keys: kind ("synthetic" | "folder"), dir (tfds data_dir of a prepared dataset), dataset
(tfds name, default the kind's), num_threads, worker_count, and for synthetic sources num_examples.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np


class SyntheticSource:
  """Batches of `example(rng, index)` rows, a pure function of (seed, position): resumable bit-exactly.

  Row `index` uses the numpy Generator seeded with (seed, index % num_examples). In a job of several
  processes each yields its own rows of the global batch (process p of P takes rows [p*b, (p+1)*b) of
  global batch k), so the global batches equal a one-process run's of P*b rows.
  """

  def __init__(self, example: Callable[[np.random.Generator, int], dict], *, batch_size: int, seed: int,
               num_examples: int = 8, process_index: int | None = None, process_count: int | None = None):
    self.example, self.batch_size, self.seed, self.num_examples = example, batch_size, seed, num_examples
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self):
    first = (self.position * self.process_count + self.process_index) * self.batch_size
    rows = []
    for i in range(first, first + self.batch_size):
      rows.append(self.example(np.random.default_rng([self.seed, i % self.num_examples]), i))
    self.position += 1
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])


def folder_loader(cfg, kind: str, tokenizer, *, batch_size: int, seed: int, **kwargs):
  """The grain loader of kind `kind` over the prepared dataset in cfg.data.dir (kwargs: the kind's
  transform settings, vcjax.data.loaders.make_loader)."""
  d = cfg.data
  if d.kind != "folder":
    raise ValueError(f"data.kind must be 'synthetic' or 'folder', got {d.kind!r}")
  if not d.dir:
    raise ValueError("data.kind 'folder' needs data.dir (the data_dir given to the prepare_* builder)")
  from vcjax.data.loaders import make_loader  # grain / tfds: imported only when used
  return make_loader(kind, d.dir, batch_size, seed, tokenizer, dataset=d.get("dataset") or None,
                     num_threads=d.get("num_threads", 4), worker_count=d.get("worker_count", 0), **kwargs)


def video_clip_loader(cfg, tokenizer, *, batch_size: int, seed: int, frame_stride: int):
  """Captioned clips of a prepared video dataset with SHP references (the "videomaker" loader): each read
  draws cfg.num_frames frames, cfg.data.frame_stride (default `frame_stride`) apart or, with sampling
  "window", evenly over cfg.data.window."""
  d = cfg.data
  return folder_loader(cfg, "videomaker", tokenizer, batch_size=batch_size, seed=seed, shp=d.get("shp", "object"),
                       num_frames=cfg.num_frames, frame_stride=d.get("frame_stride", frame_stride),
                       sampling=d.get("sampling", "stride"), window=d.get("window", 64))
