"""grain input pipelines over the prepared tfds datasets: seeded shuffle, per-process sharding, per-record
random transforms, batching, and iterators whose position can be saved and restored.

Batches (numpy dicts):
  "customcrafter" (subject images -> static clips, METHODS.md §4)
    pixels (B, F, H, W, 3) float32 [-1, 1]; mask (B, F, H, W, 1) float32 loss mask; input_ids (B, T) int32 (T: the tokenizer's model_max_length);
    caption (B,) str; is_prior (B,) bool (prior-preservation class images, when the dataset has a "prior"
    split and with_prior; subject and class records then alternate, so an even B holds half of each).
  "videomaker" (video clips + SHP reference, METHODS.md §3)
    pixels (B, F, H, W, 3) float32 [-1, 1]; mask (B, F, H, W, 1) float32 (ones); input_ids (B, T) int32 (T: the tokenizer's model_max_length);
    caption (B,) str; reference (B, H, W, 3) float32 [-1, 1] (SHP output, white background, letterboxed to
    (H, W) if not square); subject_mask (B, F, H, W, 1) float32 0/1, the frames' own subject masks, only
    when the dataset stores them (with_tracks, e.g. the procedural world's export).
Drop the "caption" strings before putting a batch on devices.

Order: records are shuffled globally with `seed` (a new permutation every epoch, identical on every
process), then process i keeps positions i, i+n, ... (ShardOptions; the remainder is dropped so all
processes see the same number of records); random transforms are seeded by (seed, shard, position), so a
run is reproducible and a restored iterator continues bit-exactly.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from vcjax.data import builders, captions
from vcjax.data.customcrafter import (AUTHORS_RESCALE, RESCALE_PRESETS, RescaleConfig, rescale_augment,
                                      static_clip, to_unit_range)
from vcjax.data.shp import SHP_PRESETS, SHPConfig, letterbox, subject_highlight
from vcjax.models.tokenizer import load_tokenizer, tokenize

KINDS = {"customcrafter": builders.SUBJECT_DATASET, "subject": builders.SUBJECT_DATASET,
         "videomaker": builders.VIDEO_DATASET, "video": builders.VIDEO_DATASET}


def _ids(tokenizer, caption: str, max_length: int | None) -> np.ndarray:
  return tokenize(tokenizer, [caption], max_length)[0]


# ------------------------------------------------------------------------------------------ transforms

@dataclasses.dataclass
class SubjectClipTransform:
  """A subject (or class) image record -> one CustomCrafter training example (see module doc).

  Subject captions: a random template filled with "<placeholder> <class_word>" (the image's own caption
  file is ignored unless use_captions). Class images: their caption, else `class_prompt` (default: the
  class word). Prior images get only the flip (none with the authors' rescale, flip_prior False) unless
  augment_prior. caption_dropout: probability that a caption (subject or class) is replaced by "" (the
  authors' uncond_prob 0.2, so the LoRA also learns the unconditional branch used by CFG).
  rescale: a RescaleConfig or a preset name ("authors", "paper"), or "none": the images as they are (no
  rescale, no flip, no prompt prefix; e.g. world sprites, whose captions name no "close up" and whose
  shapes a flip would change).
  """
  tokenizer: Any
  size: int = 512
  num_frames: int = 4
  placeholder: str = "<new1>"
  class_word: str = ""
  class_prompt: str | None = None
  templates: Sequence[str] = captions.VIDEO_TEMPLATES
  rescale: RescaleConfig | str = AUTHORS_RESCALE
  caption_dropout: float = 0.2
  is_prior: bool = False
  augment_prior: bool = False
  use_captions: bool = False
  max_length: int | None = None  # None: the tokenizer's model_max_length

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    image = record["image"]
    y0, x0, y1, x1 = (int(v) for v in record["box"])
    valid = np.zeros(image.shape[:2], dtype=bool)
    valid[y0:y1, x0:x1] = True
    none = isinstance(self.rescale, str) and self.rescale == "none"
    rescale = (AUTHORS_RESCALE if none else
               RESCALE_PRESETS[self.rescale] if isinstance(self.rescale, str) else self.rescale)
    augment = not none and (self.augment_prior or not self.is_prior)
    flip = not none and (rescale.flip_prior or not self.is_prior)
    pixels, mask, prefix, _, _ = rescale_augment(image, valid, rng, self.size, rescale, augment=augment,
                                                 flip=flip)
    stored = captions.decode_text(record["caption"])
    if self.is_prior:
      caption = stored or self.class_prompt or self.class_word
    elif self.use_captions and stored:
      caption = stored
    else:
      caption = captions.template_caption(rng, captions.subject_phrase(self.placeholder, self.class_word),
                                          self.templates)
    caption = captions.with_prefix(prefix, caption)
    if rng.random() < self.caption_dropout:  # drawn for every record: the stream does not depend on p
      caption = ""
    clip, clip_mask = static_clip(pixels, mask, self.num_frames)
    return {"pixels": clip, "mask": clip_mask, "input_ids": _ids(self.tokenizer, caption, self.max_length),
            "caption": np.asarray(caption), "is_prior": np.asarray(self.is_prior)}


def window_positions(indices: np.ndarray, num_frames: int, rng: np.random.Generator, *, sampling: str = "stride",
                     stride: int = 8, window: int = 64) -> np.ndarray:
  """A random temporal window over a clip's stored frames: positions `(F,)` into `indices` (the stored
  frames' clip positions, increasing), F = num_frames.

  "stride": clip frames s, s + stride, ...; "window": F frames evenly over `window` clip frames (fewer if
  the stored span is shorter). The start is uniform over every start whose frames are all stored. When
  none is (a dataset stored at another stride, a clip too short for the stride), F consecutive stored
  frames at a random start. Always draws one number from `rng`.
  """
  n = len(indices)
  if n < num_frames:
    raise ValueError(f"the clip stores {n} frames, {num_frames} wanted")
  if sampling == "stride":
    offsets = stride * np.arange(num_frames)
  elif sampling == "window":
    w = min(window, int(indices[-1] - indices[0]) + 1)
    offsets = np.round(np.linspace(0, w - 1, num_frames)).astype(np.int64)
  else:
    raise ValueError(f"unknown sampling {sampling!r}: 'stride' or 'window'")
  where = {int(v): i for i, v in enumerate(indices)}
  starts = [p for p in range(n) if all(int(indices[p]) + int(o) in where for o in offsets)]
  u = float(rng.random())
  if starts:
    first = int(indices[starts[min(int(u * len(starts)), len(starts) - 1)]])
    return np.asarray([where[first + int(o)] for o in offsets], np.int64)
  start = min(int(u * (n - num_frames + 1)), n - num_frames)
  return np.arange(start, start + num_frames)


@dataclasses.dataclass
class VideoReferenceTransform:
  """A video-clip record -> one VideoMaker (GIRL) training example: a random temporal window of frames in
  [-1, 1] (`window_positions` over the stored pool; num_frames None = every stored frame), a loss mask of
  ones, a random caption line, and the SHP reference (mask -> white, box crop with cut, square, affine,
  flip) of one of the clip's stored references drawn at random, letterboxed to the frame size. Without a
  stored mask SHP uses the whole reference image. Records of version-1.0.0 datasets (one reference, a
  fixed window) work unchanged."""
  tokenizer: Any
  shp: SHPConfig = SHPConfig()
  max_length: int | None = None  # None: the tokenizer's model_max_length
  num_frames: int | None = None
  frame_stride: int = 8
  sampling: str = "stride"
  window: int = 64

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    frames = record["frames"]
    tracks = record.get("masks")  # (T, H, W) uint8 per-frame subject masks, with_tracks datasets only
    if self.num_frames is not None:
      indices = record.get("frame_indices")
      indices = np.arange(len(frames)) if indices is None else np.asarray(indices)
      positions = window_positions(indices, self.num_frames, rng, sampling=self.sampling,
                                   stride=self.frame_stride, window=self.window)
      frames = frames[positions]
      tracks = None if tracks is None else tracks[positions]
    f, h, w, _ = frames.shape
    image, mask, box = _draw_reference(record, rng)
    ref, _ = subject_highlight(image, mask, rng, min(h, w), self.shp, valid_box=box)
    caption = captions.pick_line(rng, captions.decode_text(record["caption"]))
    out = {"pixels": to_unit_range(frames), "mask": np.ones((f, h, w, 1), np.float32),
           "input_ids": _ids(self.tokenizer, caption, self.max_length), "caption": np.asarray(caption),
           "reference": to_unit_range(letterbox(ref, (h, w)))}
    if tracks is not None:
      out["subject_mask"] = (np.asarray(tracks) > 127).astype(np.float32)[..., None]
    return out


def _draw_reference(record: dict, rng: np.random.Generator):
  """(image, mask or None, box) of one of the record's references, uniformly (one rng draw always)."""
  more = record.get("more_references")
  k = int(rng.integers(1 + (0 if more is None else len(more))))
  if k == 0:
    return (record["reference"], record["reference_mask"] if bool(record["has_mask"]) else None,
            record["reference_box"])
  k -= 1
  mask = record["more_reference_masks"][k] if bool(record["more_has_mask"][k]) else None
  return more[k], mask, record["more_reference_boxes"][k]


# ------------------------------------------------------------------------------------------ datasets

def data_source(dataset: str, data_dir: str, split: str = "train"):
  """The random-access tfds source of a prepared dataset ("vcjax_subject_images/<name>")."""
  return tfds.data_source(dataset, data_dir=os.fspath(data_dir), split=split)


def default_shard() -> grain.sharding.ShardOptions:
  """This JAX process's shard (jax.process_index() of jax.process_count())."""
  return grain.sharding.ShardByJaxProcess(drop_remainder=True)


def _seed(*parts: int) -> int:
  """A 32-bit seed from several integers (stable across runs and processes)."""
  return int(np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(1)[0])


def sharded_records(source, seed: int, shard: grain.sharding.ShardOptions, num_epochs: int | None = None,
                    stream: int = 0) -> grain.MapDataset:
  """Shuffled (new permutation each epoch, same on all processes), sharded and repeated records.

  A source smaller than the shard count is not split: every process reads all of it (its transforms are
  still seeded per shard). `stream` separates the seeds of several sources mixed in one pipeline.
  """
  ds = grain.MapDataset.source(source)
  n, count, index = len(ds), shard.shard_count, shard.shard_index
  if n == 0:
    raise ValueError("empty data source")
  ds = ds.shuffle(seed=_seed(seed, stream, 0))
  if n >= count > 1:
    usable = n - n % count if shard.drop_remainder else n
    ds = ds[index:usable:count]
  return ds.repeat(num_epochs)


def build_subject_dataset(data_dir: str, batch_size: int, seed: int, tokenizer, *,
                          dataset: str = f"{builders.SUBJECT_DATASET}/subject", split: str = "train",
                          with_prior: bool = True, shard: grain.sharding.ShardOptions | None = None,
                          num_epochs: int | None = None, **transform_kwargs) -> grain.MapDataset:
  """CustomCrafter batches as a grain MapDataset (infinite unless num_epochs). `transform_kwargs` go to
  SubjectClipTransform (size, num_frames, placeholder, class_word, rescale, ...)."""
  shard = shard or default_shard()
  subject = SubjectClipTransform(tokenizer, is_prior=False, **transform_kwargs)
  ds = sharded_records(data_source(dataset, data_dir, split), seed, shard, num_epochs, stream=0)
  ds = ds.random_map(subject, seed=_seed(seed, 0, 1, shard.shard_index))
  if with_prior and "prior" in _splits(dataset, data_dir):
    prior_tf = dataclasses.replace(subject, is_prior=True)
    prior = sharded_records(data_source(dataset, data_dir, "prior"), seed, shard, num_epochs, stream=1)
    prior = prior.random_map(prior_tf, seed=_seed(seed, 1, 1, shard.shard_index))
    ds = grain.MapDataset.mix([ds, prior], weights=[1.0, 1.0])
  return ds.batch(batch_size, drop_remainder=True)


def build_video_dataset(data_dir: str, batch_size: int, seed: int, tokenizer, *,
                        dataset: str = f"{builders.VIDEO_DATASET}/videos", split: str = "train",
                        shp: SHPConfig | str = "object", shard: grain.sharding.ShardOptions | None = None,
                        num_epochs: int | None = None, max_length: int | None = None,
                        num_frames: int | None = None, frame_stride: int = 8, sampling: str = "stride",
                        window: int = 64) -> grain.MapDataset:
  """VideoMaker (GIRL) batches as a grain MapDataset. shp: an SHPConfig or a preset ("object", "human").
  num_frames / frame_stride / sampling / window: the temporal window each read draws from the stored
  frames (VideoReferenceTransform; num_frames None: every stored frame)."""
  shard = shard or default_shard()
  shp = SHP_PRESETS[shp] if isinstance(shp, str) else shp
  ds = sharded_records(data_source(dataset, data_dir, split), seed, shard, num_epochs)
  ds = ds.random_map(VideoReferenceTransform(tokenizer, shp, max_length, num_frames, frame_stride, sampling,
                                             window),
                     seed=_seed(seed, 0, 1, shard.shard_index))
  return ds.batch(batch_size, drop_remainder=True)


def _splits(dataset: str, data_dir: str) -> dict:
  return tfds.builder(dataset, data_dir=os.fspath(data_dir)).info.splits


def make_loader(kind: str, data_dir: str, batch_size: int, seed: int, tokenizer, *, dataset: str | None = None,
                shard: grain.sharding.ShardOptions | None = None, num_threads: int = 4, worker_count: int = 0,
                num_epochs: int | None = None, **kwargs):
  """An iterator of numpy batch dicts (module doc) with `get_state()` / `set_state(state)`.

  kind: "customcrafter" | "videomaker" (aliases "subject", "video"). dataset: the tfds name returned by
  `prepare_*` (default: the kind's default name). tokenizer: a CLIPTokenizer or a tokenizer folder.
  shard: default this JAX process's shard. num_threads: reader threads; worker_count > 0 moves the
  transforms into that many processes (grain mp_prefetch). kwargs go to build_subject_dataset /
  build_video_dataset. The state is a small dict: save it with the checkpoint, and to resume build the
  loader with the same arguments and call set_state (bit-exact continuation).
  """
  if kind not in KINDS:
    raise ValueError(f"unknown loader kind {kind!r}; one of {sorted(KINDS)}")
  if isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = load_tokenizer(tokenizer)
  if kind in ("customcrafter", "subject"):
    ds = build_subject_dataset(data_dir, batch_size, seed, tokenizer, shard=shard, num_epochs=num_epochs,
                               **({"dataset": dataset} if dataset else {}), **kwargs)
  else:
    ds = build_video_dataset(data_dir, batch_size, seed, tokenizer, shard=shard, num_epochs=num_epochs,
                             **({"dataset": dataset} if dataset else {}), **kwargs)
  # Each element is a whole batch; keep the read-ahead small (a 16-frame 512px batch is ~50 MB per example).
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(1, num_threads)))
  if worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags, which fail unparsed outside absl.app (grain issue #1355).
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)
