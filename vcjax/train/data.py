"""Training batches: the real grain loaders (vcjax.data.loaders.make_loader) or a synthetic source.

Both yield numpy dicts (pixels `(B, F, H, W, 3)` in [-1, 1], mask `(B, F, H, W, 1)`, input_ids `(B, T)`
int32, is_prior `(B,)` for "subject"; reference `(B, H, W, 3)` for "girl") and have
`get_state()` / `set_state(state)` with a JSON-serialisable state, saved in every checkpoint.

config.data keys: kind ("synthetic" | "folder"), dir (tfds data_dir of a prepared dataset), dataset
(tfds name, default the kind's), num_threads, worker_count, for synthetic: num_examples; for "girl" folders:
shp, and the temporal window drawn at each read: frame_stride (8, CelebV-Text) with sampling "stride", or
sampling "window" (num_frames evenly over `window` frames, VideoBooth). The synthetic source applies no
caption dropout or augmentation (fixed prompts and images).
"""

from __future__ import annotations

import jax
import numpy as np

from vcjax.models.tokenizer import tokenize


class SyntheticSource:
  """Deterministic random batches, a pure function of (seed, position): resumable bit-exactly.

  task "subject": single-frame images with a random valid rectangle, alternating subject / class rows
  (prompts "a <token> <class>" / "a <class>"); "girl": clips plus a reference image.
  In a job of several processes each yields its own rows of the global batch (process p of P takes rows
  [p*b, (p+1)*b) of global batch k), so the global batches equal a one-process run's of P*b rows.
  """

  def __init__(self, task: str, tokenizer, *, batch_size: int, size: int, num_frames: int, seed: int,
               new_token: str = "<new1>", class_word: str = "dog", num_examples: int = 8,
               process_index: int = 0, process_count: int = 1):
    self.task, self.batch_size, self.size, self.num_frames, self.seed = task, batch_size, size, num_frames, seed
    self.num_examples = num_examples
    self.process_index, self.process_count = process_index, process_count
    prompts = [f"a {new_token} {class_word}", f"a {class_word}"] if task == "subject" else \
        ["a video of a dog running", "a cat on a sofa"]
    self.ids = tokenize(tokenizer, prompts)
    self.position = 0

  def __iter__(self):
    return self

  def _example(self, index: int):
    rng = np.random.default_rng([self.seed, index % self.num_examples])
    s = self.size
    if self.task == "subject":
      pixels = rng.uniform(-1, 1, (1, s, s, 3)).astype(np.float32)
      mask = np.zeros((1, s, s, 1), np.float32)
      y0, x0 = rng.integers(0, s // 4, 2)
      y1, x1 = s - rng.integers(0, s // 4, 2)
      mask[:, y0:y1, x0:x1] = 1.0
      is_prior = index % 2 == 1
      return {"pixels": pixels, "mask": mask, "input_ids": self.ids[int(is_prior)],
              "is_prior": np.asarray(is_prior)}
    pixels = rng.uniform(-1, 1, (self.num_frames, s, s, 3)).astype(np.float32)
    return {"pixels": pixels, "mask": np.ones((self.num_frames, s, s, 1), np.float32),
            "input_ids": self.ids[index % 2], "reference": rng.uniform(-1, 1, (s, s, 3)).astype(np.float32)}

  def __next__(self):
    first = (self.position * self.process_count + self.process_index) * self.batch_size
    rows = [self._example(first + i) for i in range(self.batch_size)]
    self.position += 1
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])


def make_data(cfg, tokenizer, *, batch_size: int, seed: int):
  """The batch iterator for `cfg` (a train config); batch_size is this process's share."""
  d = cfg.data
  if d.kind == "synthetic":
    return SyntheticSource(cfg.task, tokenizer, batch_size=batch_size, size=cfg.resolution,
                           num_frames=cfg.num_frames, seed=seed, new_token=cfg.get("new_token", "<new1>"),
                           class_word=cfg.get("class_word", "dog"), num_examples=d.num_examples,
                           process_index=jax.process_index(), process_count=jax.process_count())
  if d.kind != "folder":
    raise ValueError(f"data.kind must be 'synthetic' or 'folder', got {d.kind!r}")
  if not d.dir:
    raise ValueError("data.kind 'folder' needs data.dir (the data_dir given to the prepare_* builder)")
  from vcjax.data.loaders import make_loader  # grain / tfds: imported only when used
  kind = "customcrafter" if cfg.task == "subject" else "videomaker"
  kwargs = {}
  if cfg.task == "subject":
    kwargs = dict(size=cfg.resolution, num_frames=cfg.num_frames, placeholder=cfg.new_token,
                  class_word=cfg.class_word, with_prior=cfg.prior_loss_weight > 0,
                  rescale=cfg.get("augment", "authors"), caption_dropout=cfg.get("caption_dropout", 0.2))
  else:
    kwargs = dict(shp=d.get("shp", "object"), num_frames=cfg.num_frames, frame_stride=d.get("frame_stride", 8),
                  sampling=d.get("sampling", "stride"), window=d.get("window", 64))
  return make_loader(kind, d.dir, batch_size, seed, tokenizer, dataset=d.get("dataset") or None,
                     num_threads=d.get("num_threads", 4), worker_count=d.get("worker_count", 0), **kwargs)
