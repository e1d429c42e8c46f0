"""tensorflow-datasets builders (array_record files, no TensorFlow) for subject images and video clips.

Every feature is a plain numpy tensor (tfds' Image/Video features need TensorFlow), so the prepared data is
read back with `tfds.data_source(...)` + grain. Files that cannot be decoded are skipped and counted, never
fatal: the counts (and the first skipped paths with reasons) are logged and saved in the dataset's
`metadata.json` (`builder.info.metadata["stats"]`); `prepare_*` return them.

Layouts (the `src_dir` given to `prepare_*`, tfds' manual_dir):

SUBJECT IMAGES (`prepare_subject_dataset`, tfds name `vcjax_subject_images/<name>`)
  src_dir/<image>.jpg|jpeg|png|webp|bmp   subject images (split "train")
  src_dir/<image>.txt                     optional caption of that image
  src_dir/masks/<image stem>.png          optional subject mask (white = subject; an RGBA file's alpha
                                          is used); without one, an RGBA image's own alpha is the mask
  src_dir/class/<image>.jpg|png ...       optional prior-preservation class images (split "prior"),
  src_dir/class/<image>.txt               with optional captions
  Stored record: image `(S, S, 3)` uint8 = the image resized so its longer side is S (image_size, default
  512) and centered on a white square; mask `(S, S)` uint8 (0 in the padding; 255 on the whole image
  when there is no mask); box `(4,)` int32 = (y0, x0, y1, x1) of the image on the square; has_mask;
  caption; name.

VIDEO CLIPS (`prepare_video_dataset`, tfds name `vcjax_video_clips/<name>`; CelebV-Text / VideoBooth style)
  src_dir/<clip_id>/video.mp4             the clip (any one file with a video extension), OR
  src_dir/<clip_id>/frames/*.jpg|png      its frames, in name order (zero-padded numbers)
  src_dir/<clip_id>/reference.png|jpg     optional reference image; default: the first stored frame
  src_dir/<clip_id>/reference_<k>.png|jpg optional further references (several preprocessed frames of the
                                          subject; one is drawn each time the clip is read)
  src_dir/<clip_id>/mask.png, mask_<k>.png optional subject mask OF EACH REFERENCE (same aspect ratio)
  src_dir/<clip_id>/caption.txt           caption; several lines = several captions (one is drawn per use)
  Stored record: frames `(P, H, W, 3)` uint8, a POOL of P frames from which every read draws its own
  temporal window (vcjax.data.loaders.VideoReferenceTransform): for sampling="stride" every
  `frame_stride`-th frame, for sampling="window" every frame, over the clip's center, at most
  `pool_frames` of them (0: twice what one window spans: 2 x num_frames strided frames, or 2 x window
  frames); each resized to cover (H, W) and center-cropped; frame_indices `(P,)` int32 (positions in the
  clip). 0 < pool_frames <= num_frames, or a clip too short for a pool, stores one fixed window of F =
  num_frames frames (version 1.0.0's only form): `frame_stride` apart from the clip's center (the stride
  shrinks, down to 1, for short clips) or evenly over a centered `window`-frame window. Reference
  `(R, R, 3)` uint8 (longer side R, white square padding) + reference_mask `(R, R)` + reference_box +
  has_mask, as for subject images, hold the first reference; the others (up to max_references in all) are
  more_references `(K, R, R, 3)`, more_reference_masks `(K, R, R)`, more_reference_boxes `(K, 4)`,
  more_has_mask `(K,)` (K may be 0); caption; clip_id. Clips with fewer than num_frames frames are
  skipped and counted ("too_short"). Datasets prepared by version 1.0.0 (a fixed window, one reference)
  still load and train.

IN-MEMORY EXAMPLES (`examples=` of `prepare_*`, e.g. the procedural world in vcjax/world): items given as
dicts instead of files, processed exactly like a file's decoded contents (resizing, frame sampling, square
canvases), so they make the same records.
  subject: {split: iterable of {"name", "image" (H, W, 3) uint8, optional "mask" (H, W) uint8 or bool,
           optional "caption"}} (splits "train" and optionally "prior")
  video:   iterable of {"clip_id", "frames" (T, H, W, 3) uint8, optional "caption", "reference",
           "mask" (of the reference), and with `with_tracks` "masks" (T, H, W) per-frame subject masks}
  `with_tracks` (videos, in-memory only) adds masks `(F, H, W)` uint8 (0/255, resized nearest like the
  frames) and boxes `(F, 4)` int32 (their tight boxes, zeros when empty) to each record.
`encoding` (both builders; default "none", tfds' varint lists): "bytes" or "zlib" stores the image-sized
tensors as raw or compressed bytes, many times faster to write (and smaller with zlib); read back the same.
"""

from __future__ import annotations

import contextlib
import concurrent.futures
import dataclasses
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from vcjax import media
from vcjax.data import captions
from vcjax.data.shp import WHITE, box_mask, fit_in_square, subject_box

log = logging.getLogger(__name__)
SUBJECT_DATASET = "vcjax_subject_images"
VIDEO_DATASET = "vcjax_video_clips"
_MAX_LISTED = 100  # Skipped paths kept in the metadata (all are counted).


class _Skip(Exception):
  """An item to skip, with the reason it is counted under ("image", "mask", "video", "too_short", ...)."""

  def __init__(self, reason: str, err: Exception | str):
    super().__init__(str(err))
    self.reason = reason


def _read(reason: str, fn, *args, **kwargs):
  """fn(*args, **kwargs), with a decoding failure turned into _Skip(reason)."""
  try:
    return fn(*args, **kwargs)
  except media.MediaError as e:
    raise _Skip(reason, e) from e


class _Stats:
  """Counts kept and skipped items of one split; publishes into the builder's info.metadata."""

  def __init__(self, builder, split: str):
    self.builder, self.split = builder, split
    self.kept, self.reasons, self.files = 0, {}, []

  def skip(self, path: str, reason: str, err: Exception | str):
    self.reasons[reason] = self.reasons.get(reason, 0) + 1
    if len(self.files) < _MAX_LISTED:
      self.files.append(f"{path}: {err}")
    log.warning("skipping %s (%s): %s", path, reason, err)

  def publish(self):
    skipped = sum(self.reasons.values())
    stats = self.builder.info.metadata.setdefault("stats", {})
    stats[self.split] = {"kept": self.kept, "skipped": skipped, "reasons": dict(self.reasons),
                         "skipped_files": list(self.files)}
    log.info("%s split %r: kept %d, skipped %d %s", self.builder.name, self.split, self.kept, skipped,
             self.reasons)
    if self.kept == 0:
      raise ValueError(f"{self.builder.name}: no readable items for split {self.split!r} "
                       f"(skipped {skipped}: {self.files[:5]})")


def _find(folder: str, stem: str, extensions) -> str | None:
  for ext in extensions:
    for e in (ext, ext.upper()):
      p = os.path.join(folder, stem + e)
      if os.path.isfile(p):
        return p
  return None


def _fit_mask(mask: np.ndarray, shape: tuple[int, int], path: str) -> np.ndarray:
  """A mask resized to an image's (H, W); refuses a different aspect ratio (a mask of another image)."""
  if mask.shape == tuple(shape):
    return mask
  (mh, mw), (h, w) = mask.shape, shape
  if abs(mh / mw - h / w) > 0.02 * (h / w):
    raise media.MediaError(f"{path}: mask {mw}x{mh} does not match image {w}x{h}")
  return media.resize(mask, shape, nearest=True)


def _pixels(shape: tuple[int, ...], encoding: str) -> tfds.features.Tensor:
  """A uint8 image-like tensor feature; encoding "none" keeps tfds' default (the existing datasets' form)."""
  if encoding == "none":
    return tfds.features.Tensor(shape=shape, dtype=np.uint8)
  return tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=encoding)


def _square_record(image: np.ndarray, mask: np.ndarray | None, size: int) -> dict:
  """image + optional mask -> the stored square canvas (white padding), mask (0 padding), box, has_mask."""
  canvas, box = fit_in_square(image, size, WHITE)
  if mask is None:
    sq_mask = box_mask((size, size), box)
  else:
    sq_mask, _ = fit_in_square(mask, size, 0)
  return {"image": canvas, "mask": sq_mask, "box": np.asarray(box, np.int32), "has_mask": mask is not None}


# ------------------------------------------------------------------------------------------ subjects

@dataclasses.dataclass
class SubjectImagesConfig(tfds.core.BuilderConfig):
  image_size: int = 512
  mask_dir: str = "masks"
  class_dir: str = "class"
  encoding: str = "none"  # Of image and mask: "none" | "bytes" | "zlib" (module doc).


class VcjaxSubjectImages(tfds.core.GeneratorBasedBuilder):
  """Subject images (+ masks, captions) and prior-preservation class images. See the module docstring."""

  # No download checksums file next to the code: skips tfds' code-path lookup (it needs the undeclared
  # `importlib_resources` package for builders that live inside a package).
  code_path = None
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  BUILDER_CONFIGS = [SubjectImagesConfig(name="registered_default")]  # a name users will not pick

  def _info(self):
    s = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self, description="Subject images stored as white-padded squares with masks.",
        features=tfds.features.FeaturesDict({
            "image": _pixels((s, s, 3), self.builder_config.encoding),
            "mask": _pixels((s, s), self.builder_config.encoding),
            "box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
            "has_mask": tfds.features.Scalar(dtype=np.bool_),
            "caption": tfds.features.Text(),
            "name": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    memory = getattr(self, "_memory_examples", None)
    if memory is not None:
      return {split: self._generate_memory(items, split) for split, items in memory.items()}
    root = os.fspath(dl_manager.manual_dir)
    cfg = self.builder_config
    splits = {"train": self._generate_examples(root, "", cfg.mask_dir, "train")}
    if media.list_images(os.path.join(root, cfg.class_dir)):
      splits["prior"] = self._generate_examples(root, cfg.class_dir, None, "prior")
    return splits

  def _generate_examples(self, root, sub, mask_dir, split):
    stats = _Stats(self, split)
    folder = os.path.join(root, sub)
    for path in media.list_images(folder):
      rel = os.path.relpath(path, root)
      try:
        rec = self._example(path, root, mask_dir, rel)
      except _Skip as e:
        stats.skip(rel, e.reason, e)
        continue
      stats.kept += 1
      yield rel, rec
    stats.publish()

  def _example(self, path, root, mask_dir, rel):
    image, alpha = _read("image", media.read_image, path, return_alpha=True)
    stem = os.path.splitext(os.path.basename(path))[0]
    mask = alpha
    mask_path = _find(os.path.join(root, mask_dir), stem, media.IMAGE_EXTENSIONS) if mask_dir else None
    if mask_path:
      mask = _read("mask", lambda: _fit_mask(media.read_mask(mask_path), image.shape[:2], mask_path))
    rec = _square_record(image, mask, self.builder_config.image_size)
    rec["caption"] = captions.read_caption_file(os.path.splitext(path)[0] + ".txt")
    rec["name"] = rel
    return rec

  def _generate_memory(self, items, split):
    stats = _Stats(self, split)
    for item in items:
      mask = item.get("mask")
      mask = None if mask is None else _mask_u8(mask)
      rec = _square_record(np.asarray(item["image"], np.uint8), mask, self.builder_config.image_size)
      rec["caption"], rec["name"] = item.get("caption", ""), item["name"]
      stats.kept += 1
      yield item["name"], rec
    stats.publish()


# ------------------------------------------------------------------------------------------ videos

@dataclasses.dataclass
class VideoClipsConfig(tfds.core.BuilderConfig):
  num_frames: int = 16
  frame_stride: int = 8
  sampling: str = "stride"  # "stride" | "window"
  window: int = 64
  height: int = 512
  width: int = 512
  reference_size: int = 512
  num_workers: int = 4  # Clips decoded in parallel threads (ffmpeg runs as a subprocess).
  with_tracks: bool = False  # Also store per-frame subject masks and boxes (in-memory examples only).
  encoding: str = "none"  # Of frames, reference, masks: "none" | "bytes" | "zlib" (module doc).
  pool_frames: int = 0  # Frames stored per clip (module doc); 0: auto; <= num_frames: one fixed window.
  max_references: int = 8


def sample_frame_indices(length: int, num_frames: int, *, sampling: str = "stride", stride: int = 8,
                         window: int = 64) -> np.ndarray:
  """Indices of the F frames to keep from a clip of `length` frames (centered in the clip).

  "stride": every `stride`-th frame, the stride reduced (to >= 1) when the clip is too short.
  "window": F indices evenly spaced over a min(window, length)-frame window.
  Raises ValueError when length < num_frames.
  """
  if length < num_frames:
    raise ValueError(f"clip has {length} frames, needs {num_frames}")
  if num_frames == 1:
    return np.asarray([length // 2], np.int32)
  if sampling == "stride":
    stride = max(1, min(stride, (length - 1) // (num_frames - 1)))
    span = (num_frames - 1) * stride + 1
    return ((length - span) // 2 + stride * np.arange(num_frames)).astype(np.int32)
  if sampling == "window":
    w = min(window, length)
    start = (length - w) // 2
    return (start + np.round(np.linspace(0, w - 1, num_frames))).astype(np.int32)
  raise ValueError(f"unknown sampling {sampling!r}: 'stride' or 'window'")


def pool_frame_indices(length: int, num_frames: int, *, sampling: str = "stride", stride: int = 8,
                       window: int = 64, pool_frames: int = 0) -> np.ndarray:
  """Indices of the frames a clip of `length` frames stores (the module doc's pool), centered.

  0 < pool_frames <= num_frames: `sample_frame_indices` (one fixed window). Otherwise up to pool_frames
  frames (0: 2 x num_frames for "stride", 2 x window for "window") spaced `stride` ("stride") or 1
  ("window") apart, so that each window the reader draws lies on stored frames; a clip too short for one
  full-stride window keeps the fixed window with a shrunk stride.
  """
  if sampling not in ("stride", "window"):
    raise ValueError(f"unknown sampling {sampling!r}: 'stride' or 'window'")
  fixed = sample_frame_indices(length, num_frames, sampling=sampling, stride=stride, window=window)
  if 0 < pool_frames <= num_frames:
    return fixed
  step = max(1, stride) if sampling == "stride" else 1
  n = min(pool_frames or 2 * (num_frames if sampling == "stride" else window), (length - 1) // step + 1)
  if n < (num_frames if sampling == "stride" else min(window, length)):
    return fixed
  return sample_frame_indices(length, n, sampling="stride", stride=step)


def _reference_files(folder: str, limit: int) -> list[tuple[str, str | None]]:
  """[(reference image, its mask or None)] of a clip folder: reference.*, then reference_<k>.* in name
  order; the mask of reference<suffix> is mask<suffix>."""
  exts = {e.lower() for e in media.IMAGE_EXTENSIONS}
  stems = {os.path.splitext(f)[0] for f in os.listdir(folder) if os.path.splitext(f)[1].lower() in exts}
  stems = sorted((st for st in stems if re.fullmatch(r"reference(_.+)?", st)), key=lambda st: (st != "reference", st))
  out = []
  for stem in stems[:max(1, limit)]:
    path = _find(folder, stem, media.IMAGE_EXTENSIONS)
    if path:
      out.append((path, _find(folder, "mask" + stem[len("reference"):], media.IMAGE_EXTENSIONS)))
  return out


def _clip_source(folder: str) -> str:
  """The video file or frames folder of a clip folder."""
  frames = os.path.join(folder, "frames")
  if os.path.isdir(frames):
    return frames
  videos = sorted(f for f in os.listdir(folder) if media.is_video(f))
  if not videos:
    raise _Skip("missing", f"{folder}: no video file and no frames/ folder")
  return os.path.join(folder, videos[0])


class VcjaxVideoClips(tfds.core.GeneratorBasedBuilder):
  """Video clips + reference image + subject mask + caption. See the module docstring."""

  code_path = None  # As in VcjaxSubjectImages.
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "A frame pool per clip (each read draws a window); several references per clip."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  BUILDER_CONFIGS = [VideoClipsConfig(name="registered_default")]  # a name users will not pick

  def _info(self):
    c = self.builder_config
    r = c.reference_size
    features = {
        "frames": _pixels((None, c.height, c.width, 3), c.encoding),  # the pool: its length varies per clip
        "frame_indices": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "reference": _pixels((r, r, 3), c.encoding),
        "reference_mask": _pixels((r, r), c.encoding),
        "reference_box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
        "has_mask": tfds.features.Scalar(dtype=np.bool_),
        "more_references": _pixels((None, r, r, 3), c.encoding),
        "more_reference_masks": _pixels((None, r, r), c.encoding),
        "more_reference_boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.int32),
        "more_has_mask": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
        "caption": tfds.features.Text(),
        "clip_id": tfds.features.Text(),
    }
    if c.with_tracks:
      features["masks"] = _pixels((None, c.height, c.width), c.encoding)
      features["boxes"] = tfds.features.Tensor(shape=(None, 4), dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self, description="Video clips with a white-padded reference image and its subject mask.",
        features=tfds.features.FeaturesDict(features), metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    memory = getattr(self, "_memory_examples", None)
    if memory is not None:
      return {"train": self._generate_memory(memory)}
    root = os.fspath(dl_manager.manual_dir)
    clips = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    return {"train": self._generate_examples(root, clips)}

  def _generate_examples(self, root, clips):
    stats = _Stats(self, "train")

    def load(clip_id):
      try:
        return clip_id, self._example(os.path.join(root, clip_id), clip_id), None
      except _Skip as e:
        return clip_id, None, (e.reason, e)

    workers = max(1, self.builder_config.num_workers)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for clip_id, rec, err in pool.map(load, clips):  # map keeps the clip order: deterministic files.
        if err is not None:
          stats.skip(clip_id, *err)
          continue
        stats.kept += 1
        yield clip_id, rec
    stats.publish()

  def _example(self, folder, clip_id):
    c = self.builder_config
    source = _clip_source(folder)
    length = _read("video", media.video_length, source)
    if length < c.num_frames:
      raise _Skip("too_short", f"clip has {length} frames, needs {c.num_frames}")
    indices = self._indices(length)
    raw = _read("video", media.read_video_frames, source, indices)

    files = _reference_files(folder, c.max_references)
    if not files:  # no reference image: the first stored frame, with the clip's mask.png if any
      files = [(None, _find(folder, "mask", media.IMAGE_EXTENSIONS))]
    refs = []
    for ref_path, mask_path in files:
      reference = _read("reference", media.read_image, ref_path) if ref_path else raw[0]
      mask = None
      if mask_path:
        mask = _read("mask", lambda: _fit_mask(media.read_mask(mask_path), reference.shape[:2], mask_path))
      refs.append((reference, mask))
    return self._record(raw, indices, refs, captions.read_caption_file(os.path.join(folder, "caption.txt")),
                        clip_id)

  def _indices(self, length: int) -> np.ndarray:
    c = self.builder_config
    return pool_frame_indices(length, c.num_frames, sampling=c.sampling, stride=c.frame_stride, window=c.window,
                              pool_frames=c.pool_frames).astype(np.int32)

  def _record(self, raw, indices, refs, caption, clip_id):
    """Stored frames (resized to cover (H, W)) + [(reference, its mask or None)] -> the stored record."""
    c = self.builder_config
    frames = np.stack([media.resize_cover(f, (c.height, c.width)) for f in raw])
    squares = [_square_record(image, mask, c.reference_size) for image, mask in refs]
    first, more = squares[0], squares[1:]
    r = c.reference_size

    def stack(key, shape, dtype):
      return np.stack([m[key] for m in more]).astype(dtype) if more else np.zeros((0,) + shape, dtype)

    return {"frames": frames, "frame_indices": indices, "reference": first["image"],
            "reference_mask": first["mask"], "reference_box": first["box"], "has_mask": first["has_mask"],
            "more_references": stack("image", (r, r, 3), np.uint8),
            "more_reference_masks": stack("mask", (r, r), np.uint8),
            "more_reference_boxes": stack("box", (4,), np.int32),
            "more_has_mask": np.asarray([m["has_mask"] for m in more], np.bool_),
            "caption": caption, "clip_id": clip_id}

  def _generate_memory(self, items):
    c = self.builder_config
    stats = _Stats(self, "train")
    for item in items:
      clip_id, frames = item["clip_id"], np.asarray(item["frames"], np.uint8)
      if len(frames) < c.num_frames:
        stats.skip(clip_id, "too_short", f"clip has {len(frames)} frames, needs {c.num_frames}")
        continue
      indices = self._indices(len(frames))
      raw = frames[indices]
      reference = item.get("reference")
      reference = raw[0] if reference is None else np.asarray(reference, np.uint8)
      mask = item.get("mask")
      if mask is not None:
        mask = _fit_mask(_mask_u8(mask), reference.shape[:2], clip_id)
      rec = self._record(raw, indices, [(reference, mask)], item.get("caption", ""), clip_id)
      if c.with_tracks:
        tracks = np.asarray(item["masks"])[indices]
        masks = np.stack([_cover_mask(_mask_u8(m), (c.height, c.width)) for m in tracks])
        rec["masks"], rec["boxes"] = masks, _mask_boxes(masks)
      stats.kept += 1
      yield clip_id, rec
    stats.publish()


def _mask_u8(mask) -> np.ndarray:
  """A bool or uint8 `(H, W)` mask -> uint8 (bool True -> 255)."""
  mask = np.asarray(mask)
  return mask.astype(np.uint8) * 255 if mask.dtype == np.bool_ else mask.astype(np.uint8)


def _cover_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """media.resize_cover for a mask: the same scale and center crop, nearest resampling."""
  h, w = mask.shape
  th, tw = size
  scale = max(th / h, tw / w)
  nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
  out = media.resize(mask, (nh, nw), nearest=True)
  top, left = (nh - th) // 2, (nw - tw) // 2
  return out[top:top + th, left:left + tw]


def _mask_boxes(masks: np.ndarray) -> np.ndarray:
  """`(F, H, W)` uint8 -> `(F, 4)` int32 tight boxes of mask >= 128 (zeros when empty)."""
  return np.stack([np.asarray(subject_box(m) or (0, 0, 0, 0), np.int32) for m in masks])


# ------------------------------------------------------------------------------------------ entry points

def _check_name(name: str):
  if not re.fullmatch(r"[A-Za-z0-9_]+", name):
    raise ValueError(f"dataset name {name!r}: use letters, digits and '_' only")


@contextlib.contextmanager
def _in_memory_shuffle():
  """tfds' writer shuffles a split in memory up to 1 GB of serialized examples, then spills to temporary
  bucket files through `tf.io.gfile`, which needs TensorFlow (not a dependency: the export fails with "No
  module named 'tensorflow'"). Keep the whole split in memory instead (a 20k-clip 64x64 world split is
  ~4 GB raw; use encoding "zlib" to shrink it)."""
  from tensorflow_datasets.core import shuffle
  limit = shuffle.MAX_MEM_BUFFER_SIZE
  shuffle.MAX_MEM_BUFFER_SIZE = 1 << 62
  try:
    yield
  finally:
    shuffle.MAX_MEM_BUFFER_SIZE = limit


def _prepare(builder, src_dir: str | None, overwrite: bool, examples=None) -> dict:
  if examples is not None:
    builder._memory_examples = examples  # Read by _split_generators instead of manual_dir.
  elif src_dir is None or not os.path.isdir(src_dir):
    raise FileNotFoundError(f"source folder {src_dir!r} does not exist")
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  with _in_memory_shuffle():
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=None if src_dir is None else os.fspath(src_dir), download_mode=mode))
  info = builder.info
  return {"dataset": f"{info.name}/{builder.builder_config.name}", "data_dir": os.fspath(builder.data_dir),
          "splits": {k: v.num_examples for k, v in info.splits.items()},
          "stats": dict(info.metadata.get("stats", {}))}


def prepare_subject_dataset(src_dir: str | None, data_dir: str, name: str = "subject", *, image_size: int = 512,
                            mask_dir: str = "masks", class_dir: str = "class", overwrite: bool = False,
                            examples: dict | None = None, encoding: str = "none") -> dict:
  """Build `vcjax_subject_images/<name>` in `data_dir` from a subject-image folder (layout: module doc), or
  from in-memory `examples` ({split: iterable of item dicts}, module doc; then src_dir is None).

  Returns {"dataset": tfds name, "data_dir": version folder, "splits": {split: count},
  "stats": {split: {"kept", "skipped", "reasons", "skipped_files"}}}. An existing dataset of that name is
  reused unless `overwrite`.
  """
  _check_name(name)
  config = SubjectImagesConfig(name=name, image_size=image_size, mask_dir=mask_dir, class_dir=class_dir,
                               encoding=encoding)
  builder = VcjaxSubjectImages(config=config, data_dir=data_dir, file_format="array_record")
  return _prepare(builder, src_dir, overwrite, examples)


def prepare_video_dataset(src_dir: str | None, data_dir: str, name: str = "videos", *, num_frames: int = 16,
                          frame_stride: int = 8, sampling: str = "stride", window: int = 64,
                          size: tuple[int, int] = (512, 512), reference_size: int = 512, num_workers: int = 4,
                          overwrite: bool = False, examples=None, with_tracks: bool = False,
                          encoding: str = "none", pool_frames: int = 0, max_references: int = 8) -> dict:
  """Build `vcjax_video_clips/<name>` in `data_dir` from a clip folder (layout: module doc), or from an
  iterable of in-memory `examples` (module doc; then src_dir is None; with_tracks stores their per-frame
  masks and boxes).

  VideoMaker presets: CelebV-Text = num_frames 16, frame_stride 8 (sampling "stride"); VideoBooth =
  16 frames evenly over a 64-frame window (sampling "window"). pool_frames: frames stored per clip (0:
  auto; <= num_frames: one fixed window); train with the same sampling / frame_stride / window
  (config.data.*) and each read draws its own window from them. Returns the same dict as
  `prepare_subject_dataset`.
  """
  _check_name(name)
  if sampling not in ("stride", "window"):
    raise ValueError(f"unknown sampling {sampling!r}: 'stride' or 'window'")
  if with_tracks and examples is None:
    raise ValueError("with_tracks needs in-memory examples (clip folders carry no per-frame masks)")
  config = VideoClipsConfig(name=name, num_frames=num_frames, frame_stride=frame_stride, sampling=sampling,
                            window=window, height=size[0], width=size[1], reference_size=reference_size,
                            num_workers=num_workers, with_tracks=with_tracks, encoding=encoding,
                            pool_frames=pool_frames, max_references=max_references)
  builder = VcjaxVideoClips(config=config, data_dir=data_dir, file_format="array_record")
  return _prepare(builder, src_dir, overwrite, examples)
