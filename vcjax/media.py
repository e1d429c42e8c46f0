"""Reading images, masks and video frames into numpy arrays (PIL for images, imageio-ffmpeg for videos).

Everything returns channels-last uint8: images `(H, W, 3)`, masks `(H, W)` (0..255), videos `(F, H, W, 3)`.
Unreadable, truncated or empty files raise `MediaError`, so that dataset builders can skip and count them.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")


class MediaError(ValueError):
  """A media file that cannot be decoded (corrupt, truncated, empty, wrong format)."""


def is_image(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def is_video(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def list_images(folder: str) -> list[str]:
  """Image files directly inside `folder` (not recursive), sorted by name; [] if the folder is absent."""
  if not os.path.isdir(folder):
    return []
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if is_image(f) and os.path.isfile(os.path.join(folder, f)))


def _open(path: str) -> Image.Image:
  if os.path.getsize(path) == 0:
    raise MediaError(f"{path}: empty file")
  try:
    img = Image.open(path)
    img.load()  # Decode now: a truncated file fails here, not later in a worker.
    return ImageOps.exif_transpose(img)
  except Exception as e:  # Decoders raise many types on bad bytes (OSError, EOFError, struct.error, ...).
    raise MediaError(f"{path}: {type(e).__name__}: {e}") from e


def read_image(path: str, *, return_alpha: bool = False):
  """An image as `(H, W, 3)` uint8 RGB (EXIF orientation applied; transparency composited onto white).

  With `return_alpha`, returns `(rgb, alpha)` where alpha is `(H, W)` uint8 or None when the file has no
  alpha channel (a cut-out PNG's alpha is a subject mask).
  """
  img = _open(path)
  alpha = None
  if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
    img = img.convert("RGBA")
    alpha = np.asarray(img.getchannel("A"), dtype=np.uint8)
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, img)
  rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
  return (rgb, alpha) if return_alpha else rgb


def read_mask(path: str) -> np.ndarray:
  """A mask as `(H, W)` uint8, 0 = background, 255 = subject: the alpha channel if the file has one
  (RGBA cut-outs), else its luminance."""
  img = _open(path)
  if img.mode in ("RGBA", "LA"):
    return np.asarray(img.getchannel("A"), dtype=np.uint8)
  return np.asarray(img.convert("L"), dtype=np.uint8)


def resize(array: np.ndarray, size: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
  """Resize a uint8 `(H, W, 3)` or `(H, W)` array to `size = (height, width)` (bicubic, or nearest)."""
  h, w = size
  if array.shape[:2] == (h, w):
    return array
  resample = Image.NEAREST if nearest else Image.BICUBIC
  return np.asarray(Image.fromarray(array).resize((w, h), resample=resample), dtype=np.uint8)


def resize_cover(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resize preserving aspect ratio so the image covers `size = (height, width)`, then center-crop to it."""
  h, w = array.shape[:2]
  th, tw = size
  scale = max(th / h, tw / w)
  nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
  out = resize(array, (nh, nw))
  top, left = (nh - th) // 2, (nw - tw) // 2
  return out[top:top + th, left:left + tw]


# ------------------------------------------------------------------------------------------------ video

def list_frames(folder: str) -> list[str]:
  """The frame images of a frames folder, in name order (name frames with zero-padded numbers)."""
  frames = list_images(folder)
  if not frames:
    raise MediaError(f"{folder}: no frame images")
  return frames


def video_length(path: str) -> int:
  """Number of frames in a video file (decoded, so exact) or a frames folder."""
  if os.path.isdir(path):
    return len(list_frames(path))
  if not os.path.isfile(path) or os.path.getsize(path) == 0:
    raise MediaError(f"{path}: missing or empty video file")
  import imageio_ffmpeg  # Video support is optional at import time: only builders need it.
  try:
    n, _ = imageio_ffmpeg.count_frames_and_secs(path)
  except Exception as e:  # ffmpeg failures surface as RuntimeError / OSError / parse errors.
    raise MediaError(f"{path}: cannot decode video ({type(e).__name__})") from e
  if n <= 0:
    raise MediaError(f"{path}: video has no frames")
  return int(n)


def read_video_frames(path: str, indices: Sequence[int]) -> np.ndarray:
  """The frames at `indices` (ascending or not, repeats allowed) of a video file or frames folder, as
  `(len(indices), H, W, 3)` uint8. Decodes sequentially and stops after the last needed frame."""
  indices = [int(i) for i in indices]
  if not indices or min(indices) < 0:
    raise ValueError(f"bad frame indices {indices}")
  if os.path.isdir(path):
    files = list_frames(path)
    if max(indices) >= len(files):
      raise MediaError(f"{path}: has {len(files)} frames, need index {max(indices)}")
    cache = {i: read_image(files[i]) for i in sorted(set(indices))}
    frames = [cache[i] for i in indices]
    if len({f.shape for f in frames}) != 1:
      raise MediaError(f"{path}: frames differ in size")
    return np.stack(frames)

  import imageio_ffmpeg
  wanted, last, got = set(indices), max(indices), {}
  gen = None
  try:
    gen = imageio_ffmpeg.read_frames(path)
    meta = next(gen)
    w, h = meta["size"]
    for i, buf in enumerate(gen):
      if i in wanted:
        got[i] = np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3).copy()
      if i >= last:
        break
  except Exception as e:
    raise MediaError(f"{path}: cannot decode video ({type(e).__name__})") from e
  finally:
    if gen is not None:
      gen.close()  # Stops the ffmpeg subprocess (also when we stop early).
  if len(got) != len(wanted):
    raise MediaError(f"{path}: decoded only {len(got)} of the {len(wanted)} needed frames (truncated?)")
  return np.stack([got[i] for i in indices])


# ------------------------------------------------------------------------------------------ writing


def write_video(path: str, frames: np.ndarray, *, fps: int = 8) -> str:
  """Write `(F, H, W, 3)` uint8 frames as .mp4 (H.264 via imageio-ffmpeg) or .gif (PIL)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  frames = np.asarray(frames, np.uint8)
  if path.lower().endswith(".gif"):
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
  _write_mp4(path, frames, fps)
  return path


def _write_mp4(path: str, frames: np.ndarray, fps: int) -> None:
  """H.264 yuv420p (what players expect; it needs even sizes, so odd ones get one padded row/column) through
  imageio-ffmpeg's ffmpeg binary. Started with `process_group` rather than imageio's `preexec_fn=os.setpgrp`
  (which keeps Ctrl-C away from the encoder too): a preexec_fn forces a real fork() of this multithreaded
  process, which JAX warns about and which can deadlock; this way Python spawns it with vfork."""
  import subprocess

  import imageio_ffmpeg
  f, h, w, _ = frames.shape
  cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
         "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",
         "-c:v", "libx264", "-crf", "17", "-pix_fmt", "yuv420p", "-movflags", "+faststart", path]
  proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True,
                        process_group=0, check=False)
  if proc.returncode != 0:
    raise MediaError(f"{path}: ffmpeg failed ({proc.stderr.decode(errors='replace').strip()[-300:]})")
