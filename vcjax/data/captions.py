"""Caption templates and prompt prefixes for subject training (CustomCrafter, METHODS.md §4).

All random choices take a numpy Generator so a record's caption is a pure function of its rng.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

# Templates of the CustomCrafter subject clips; "{}" is replaced by e.g. "<new1> dog".
VIDEO_TEMPLATES = ("video of a {}", "{}", "a static video of a {}", "a {}")
# Prefixes tied to the rescale augmentation: small subject in the frame, or cropped close-up.
FAR_PREFIXES = ("a far away", "very small")
NEAR_PREFIXES = ("zoomed in", "close up")


def subject_phrase(placeholder: str, class_word: str) -> str:
  """"<new1>" + "dog" -> "<new1> dog" (either part may be empty)."""
  return " ".join(p for p in (placeholder.strip(), class_word.strip()) if p)


def template_caption(rng: np.random.Generator, phrase: str,
                     templates: Sequence[str] = VIDEO_TEMPLATES) -> str:
  """A random template filled with `phrase`."""
  return templates[int(rng.integers(len(templates)))].format(phrase)


def scale_prefix(rng: np.random.Generator, branch: str, scale: float, far_threshold: float) -> str:
  """The prompt prefix for a rescale augmentation: "a far away"/"very small" when the subject was shrunk
  below `far_threshold` (branch "out"), "zoomed in"/"close up" for branch "in", else "".

  Always draws one number from `rng`, so later draws do not depend on the branch.
  """
  k = int(rng.integers(2))
  if branch == "in":
    return NEAR_PREFIXES[k]
  if branch == "out" and scale < far_threshold:
    return FAR_PREFIXES[k]
  return ""


def with_prefix(prefix: str, caption: str) -> str:
  return f"{prefix} {caption}" if prefix else caption


def pick_line(rng: np.random.Generator, text: str) -> str:
  """One non-empty line of a caption text (CelebV-Text style files hold several descriptions), at random;
  "" for an empty text. Always draws one number from `rng`."""
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  k = int(rng.integers(max(1, len(lines))))
  return lines[k] if lines else ""


def read_caption_file(path: str) -> str:
  """The stripped text of a caption file, or "" if there is none. Undecodable bytes are replaced."""
  if not os.path.isfile(path):
    return ""
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace").strip()


def decode_text(value) -> str:
  """A tfds Text feature value (bytes, numpy bytes or str) -> str."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return str(value)
