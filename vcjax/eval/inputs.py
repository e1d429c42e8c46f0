"""What the scorer reads: videos (all frames and their fps), each video's prompt and reference images.

Prompts and references come from the JSON sidecar sample.py writes beside each video (`config.prompt`,
`config.reference`) unless a prompts file or a references folder is given. Every failure is a
`InputError` whose message names the file, so that one bad video is reported and the others scored.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image

from vcjax import media


class InputError(ValueError):
  """A video, sidecar, prompt or reference that cannot be used."""


@dataclasses.dataclass
class Video:
  path: str
  frames: np.ndarray  # (F, H, W, 3) uint8, every frame
  fps: float | None  # None for frame folders
  prompt: str | None
  references: list[str]


def list_videos(folder: str) -> list[str]:
  """Video files directly in `folder`, sorted by name (the authors' scripts sort too); one per stem."""
  if not os.path.isdir(folder):
    raise InputError(f"{folder}: no such folder of videos")
  by_stem: dict[str, list[str]] = {}
  for f in os.listdir(folder):
    if media.is_video(f) and not f.startswith("."):
      by_stem.setdefault(os.path.splitext(f)[0], []).append(f)
  # sample.py writes a .gif beside each .mp4 (one sidecar for both): score each video once, the .mp4.
  rank = lambda f: (not f.lower().endswith(".mp4"), f.lower().endswith(".gif"), f)
  return sorted(os.path.join(folder, min(names, key=rank)) for names in by_stem.values())


def read_video(path: str) -> tuple[np.ndarray, float | None]:
  """Every frame of a video file (or frames folder) -> (`(F, H, W, 3)` uint8, fps or None)."""
  if os.path.isdir(path):
    files = media.list_frames(path)
    return media.read_video_frames(path, range(len(files))), None
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such video file")
  if os.path.getsize(path) == 0:
    raise InputError(f"{path}: empty video file")
  import imageio_ffmpeg
  gen = None
  frames = []
  try:
    gen = imageio_ffmpeg.read_frames(path)
    meta = next(gen)
    w, h = meta["size"]
    fps = float(meta.get("fps") or 0) or None
    for buf in gen:
      frames.append(np.frombuffer(buf, np.uint8).reshape(h, w, 3))
  except Exception as e:  # ffmpeg reports bad files as RuntimeError / OSError / StopIteration / parse errors
    raise InputError(f"{path}: cannot decode video ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
  finally:
    if gen is not None:
      gen.close()
  if not frames:
    raise InputError(f"{path}: video has no frames")
  return np.stack(frames), fps


def read_reference(path: str) -> np.ndarray:
  """A reference image as the authors open it: PIL, `convert("RGB")` (alpha dropped, no EXIF turn)."""
  try:
    with Image.open(path) as img:
      img.load()
      return np.asarray(img.convert("RGB"), np.uint8)
  except FileNotFoundError:
    raise InputError(f"{path}: no such reference image") from None
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on bad bytes
    raise InputError(f"{path}: reference is not a readable image ({type(e).__name__})") from e


def sidecar(video_path: str) -> dict:
  """The JSON sample.py writes beside a video ({} when there is none)."""
  path = os.path.splitext(video_path)[0] + ".json"
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(f"{path}: sidecar is not valid JSON ({' '.join(str(e).split())})") from None
  return data if isinstance(data, dict) else {}


def read_prompts(path: str) -> dict[str, str]:
  """A prompts file: JSON `{video name or stem: prompt}`, or lines `name<TAB>prompt`."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise InputError(f"{path}: cannot read prompts file ({type(e).__name__})") from None
  if path.endswith(".json"):
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise InputError(f"{path}: prompts file is not valid JSON ({e})") from None
    if not isinstance(data, dict):
      raise InputError(f"{path}: prompts file must map video names to prompts")
    return {str(k): str(v) for k, v in data.items()}
  out = {}
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    if "\t" not in line:
      raise InputError(f"{path}:{n}: expected 'video name<TAB>prompt'")
    name, prompt = line.split("\t", 1)
    out[name.strip()] = prompt.strip()
  return out


def _lookup(mapping: dict[str, str], video_path: str) -> str | None:
  name = os.path.basename(video_path)
  return mapping.get(name, mapping.get(os.path.splitext(name)[0]))


def references_for(video_path: str, folder: str | None, side: dict) -> list[str]:
  """Reference images of a video: with a folder, `folder/<stem>/*` if that is a folder, else
  `folder/<stem>.<image ext>`, else every image in `folder` (one subject for the whole set, as the
  authors' scripts); without, the sidecar's `config.reference` (relative paths: from the working
  directory, then from the video's folder)."""
  stem = os.path.splitext(os.path.basename(video_path))[0]
  if folder:
    if not os.path.isdir(folder):
      raise InputError(f"{folder}: no such references folder")
    own = os.path.join(folder, stem)
    if os.path.isdir(own):
      return media.list_images(own) or [own]
    for ext in media.IMAGE_EXTENSIONS:
      if os.path.isfile(own + ext):
        return [own + ext]
    found = media.list_images(folder)
    return found
  ref = (side.get("config") or {}).get("reference")
  if not ref:
    return []
  if not os.path.isabs(ref) and not os.path.exists(ref):
    beside = os.path.join(os.path.dirname(video_path), ref)
    ref = beside if os.path.exists(beside) else ref
  return [ref]


def load_video(path: str, *, prompts: dict[str, str] | None, references: str | None,
               reference_list: list[str] | None = None) -> Video:
  """Frames, fps, prompt and reference paths of one video; raises InputError naming the bad file.

  The sidecar's prompt is its top-level `prompt` (sample.py's per-video prompt), else `config.prompt`;
  `reference_list` (the protocol's) overrides every other source of references.
  """
  frames, fps = read_video(path)
  if len(frames) < 2:
    raise InputError(f"{path}: has {len(frames)} frame; the metrics need at least 2")
  side = sidecar(path)
  if prompts is not None:
    prompt = _lookup(prompts, path)
  else:
    prompt = side.get("prompt") or (side.get("config") or {}).get("prompt")
  refs = list(reference_list) if reference_list is not None else references_for(path, references, side)
  return Video(path=path, frames=frames, fps=fps, prompt=prompt or None, references=refs)
