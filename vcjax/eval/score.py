"""Score a set of videos: CLIP-T, CLIP-I, DINO-I, T.Cons and dynamic degree, as the authors' scripts do.

    scorer = Scorer(clip=load_clip(dir), tokenizer=..., dino=load_dino(dir), raft=load_raft(file))
    result = scorer.score(["a.mp4", "b.mp4"])   # {"videos": [...], "mean": {...}, "errors": [...]}

Frames: CLIP and DINO see every frame (the scripts read all frames); DD keeps every round(fps/8)-th frame.
A metric whose model or input (prompt, reference) is missing is left out of that video's row and of
the mean; a video that cannot be used is listed under "errors" with a one-line message naming the file.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from vcjax.eval import engine, metrics, preprocess
from vcjax.eval.inputs import InputError, Video, load_video, read_reference
from vcjax.models import raft as raft_lib

METRICS = ("clip_t", "clip_i", "dino_i", "t_cons", "dd")
_ROW_ORDER = ("path", "clip_t", "clip_i", "dino_i", "t_cons", "dd_moving", "flow_top5")


class Scorer:
  """Holds the models (any may be None) and scores videos in groups, batched over every local device."""

  def __init__(self, *, clip=None, tokenizer=None, dino=None, raft=None, dd_threshold: str = "authors",
               raft_iters: int = 20, batch_per_device: int = 8, raft_batch_per_device: int = 2,
               group: int = 8, clip_crop: str = "clip", devices=None):
    if dd_threshold not in metrics.DD_THRESHOLDS:
      raise ValueError(f"unknown DD threshold {dd_threshold!r}; known: {metrics.DD_THRESHOLDS}")
    if clip is not None and tokenizer is None:
      raise ValueError("CLIP needs its tokenizer (the CLIP folder's vocab.json / merges.txt)")
    kw = dict(batch_per_device=batch_per_device, devices=devices)
    self.clip = engine.Runner(clip, **kw) if clip is not None else None
    self.clip_text_length = clip.config.text.max_position_embeddings if clip is not None else 77
    self.tokenizer = tokenizer
    self.dino = engine.Runner(dino, **kw) if dino is not None else None
    self.raft = (engine.Runner(raft, batch_per_device=raft_batch_per_device, devices=devices)
                 if raft is not None else None)
    self.dd_threshold, self.raft_iters, self.group, self.clip_crop = dd_threshold, raft_iters, group, clip_crop
    self._text_cache: dict[str, np.ndarray] = {}

  # -------------------------------------------------------------------------------------- features

  def _text(self, prompts: list[str]) -> dict[str, np.ndarray]:
    from vcjax.models.tokenizer import tokenize
    new = sorted({p for p in prompts if p not in self._text_cache})
    if new:
      length = self.clip_text_length  # the `clip` package pads to 77, the text tower's length
      ids = tokenize(self.tokenizer, new, max_length=length)
      for p, f in zip(new, self.clip.map(engine.clip_text_features, ids)):
        self._text_cache[p] = f
    return {p: self._text_cache[p] for p in prompts}

  def _flow_scores(self, videos: list[Video]) -> list[list[float]]:
    """Per video, the top-5% flow magnitude of each consecutive pair of DD frames (grouped by size)."""
    pairs = {}  # (H, W) -> [(video index, pair index, frame a, frame b)]
    for i, v in enumerate(videos):
      frames = v.frames[::metrics.dd_frame_interval(v.fps)]
      for j in range(len(frames) - 1):
        pairs.setdefault(frames.shape[1:3], []).append((i, j, frames[j], frames[j + 1]))
    scores: list[dict[int, float]] = [{} for _ in videos]
    fn = _raft_fn(self.raft_iters)
    for items in pairs.values():
      out = self.raft.map(fn, np.stack([it[2] for it in items]), np.stack([it[3] for it in items]))
      for (i, j, _, _), s in zip(items, out):
        scores[i][j] = float(s)
    return [[s[j] for j in sorted(s)] for s in scores]

  # ---------------------------------------------------------------------------------------- scoring

  def _score_group(self, videos: list[Video], errors: list[str]) -> list[dict]:
    refs: dict[str, np.ndarray] = {}
    usable = []
    for v in videos:  # a reference that is not an image fails its video, not the run
      try:
        for r in v.references:
          if r not in refs:
            refs[r] = read_reference(r)
        usable.append(v)
      except InputError as e:
        errors.append(str(e))
    videos = usable
    if not videos:
      return []
    rows = [{"path": v.path} for v in videos]
    counts = [len(v.frames) for v in videos]
    bounds = np.cumsum([0] + counts)
    ref_names = sorted(refs)
    ref_index = {r: i for i, r in enumerate(ref_names)}

    if self.clip is not None:
      pixels = [preprocess.clip_image(f, crop=self.clip_crop) for v in videos for f in v.frames]
      pixels += [preprocess.clip_image(refs[r], crop=self.clip_crop) for r in ref_names]
      feats = self.clip.map(engine.clip_image_features, np.stack(pixels))
      ref_feats = feats[bounds[-1]:]
      prompts = self._text([v.prompt for v in videos if v.prompt])
      for k, v in enumerate(videos):
        f = feats[bounds[k]:bounds[k + 1]]
        rows[k]["t_cons"] = metrics.t_cons(f)
        if v.prompt:
          rows[k]["clip_t"] = metrics.clip_t(f, prompts[v.prompt])
        if v.references:
          rows[k]["clip_i"] = metrics.image_similarity(f, ref_feats[[ref_index[r] for r in v.references]])
    if self.dino is not None:
      with_refs = [k for k, v in enumerate(videos) if v.references]
      if with_refs:
        pixels = [preprocess.dino_image(f) for k in with_refs for f in videos[k].frames]
        pixels += [preprocess.dino_image(refs[r]) for r in ref_names]
        feats = self.dino.map(engine.dino_cls, np.stack(pixels))
        n = sum(counts[k] for k in with_refs)
        ref_feats, start = feats[n:], 0
        for k in with_refs:
          f = feats[start:start + counts[k]]
          start += counts[k]
          rows[k]["dino_i"] = metrics.image_similarity(
              f, ref_feats[[ref_index[r] for r in videos[k].references]])
    if self.raft is not None:
      dd_videos = []
      for k, v in enumerate(videos):
        h, w = v.frames.shape[1:3]
        if min(h + (-h % 8), w + (-w % 8)) < raft_lib.MIN_SIZE:
          errors.append(f"{v.path}: dynamic degree left out: {h}x{w} frames are below RAFT's "
                        f"{raft_lib.MIN_SIZE}-pixel minimum (the original's flow is NaN there)")
        else:
          dd_videos.append(k)
      flows = self._flow_scores([videos[k] for k in dd_videos]) if dd_videos else []
      for k, scores in zip(dd_videos, flows):
        v = videos[k]
        sampled = v.frames[::metrics.dd_frame_interval(v.fps)]
        h, w = v.frames.shape[1:3]
        thr = metrics.dd_threshold(h, w, kind=self.dd_threshold, fps=v.fps)
        rows[k]["dd_moving"] = int(metrics.dd_moving(scores, len(sampled), thr))
        rows[k]["flow_top5"] = scores
    for k, v in enumerate(videos):
      rows[k]["_refs"] = len(v.references)
    return rows

  def score(self, paths: Sequence[str], *, prompts: dict[str, str] | None = None,
            references: str | None = None, reference_map: dict[str, list[str]] | None = None,
            progress: Callable | None = None) -> dict:
    """Score `paths`; -> {"videos": rows, "mean": means, "errors": one-line messages}.

    prompts: {video name or stem: prompt} instead of the sidecars'; references: a folder (see
    `inputs.references_for`); reference_map: {video path: reference paths}, overriding both.
    """
    rows, errors = [], []
    bar = progress(total=len(paths)) if progress else None
    for start in range(0, len(paths), self.group):
      group = []
      for path in paths[start:start + self.group]:
        try:
          group.append(load_video(path, prompts=prompts, references=references,
                                  reference_list=(reference_map or {}).get(path)))
        except (InputError, ValueError, OSError) as e:
          errors.append(" ".join(str(e).split()))
      rows += self._score_group(group, errors)
      if bar is not None:
        bar.update(len(paths[start:start + self.group]))
    if bar is not None:
      bar.close()
    means = mean_row(rows)
    rows = [{k: r[k] for k in _ROW_ORDER if k in r} for r in rows]
    return {"videos": rows, "mean": means, "errors": errors}


def _raft_fn(iters: int):
  """A module-level-stable function per iteration count (jit caches on the function's identity)."""
  if iters not in _RAFT_FNS:
    def fn(model, a, b):
      return engine.raft_flow_top5(model, a, b, iters=iters)
    _RAFT_FNS[iters] = fn
  return _RAFT_FNS[iters]


_RAFT_FNS: dict[int, Callable] = {}


def mean_row(rows: list[dict]) -> dict:
  """The set's means: CLIP-I / DINO-I over (video, reference) pairs, the rest over videos; DD is the
  fraction of moving videos. Metrics no video has are left out."""
  out = {}
  for name in ("clip_t", "t_cons"):
    vals = [r[name] for r in rows if name in r]
    if vals:
      out[name] = float(np.mean(vals))
  for name in ("clip_i", "dino_i"):
    pairs = [(r[name], r["_refs"]) for r in rows if name in r]
    if pairs:
      out[name] = float(sum(v * n for v, n in pairs) / sum(n for _, n in pairs))
  moving = [r["dd_moving"] for r in rows if "dd_moving" in r]
  if moving:
    out["dd"] = float(np.mean(moving))
  return {k: out[k] for k in METRICS if k in out}
