"""Splits of the world: which sprite combinations (shape, pattern, colour) each split may draw.

  "train"    every combination of the config's shapes x patterns x colours except `config.held_out`
             (base text-to-video and GIRL training).
  "heldout"  exactly `config.held_out` (customization subjects, zero-shot and unseen-combination tests).

The default held-out list (config.HELD_OUT) is fixed in the code, not drawn, so it is the same for every
seed; the split of a clip is part of its seed, so train and held-out clips never share random streams.
"""

from __future__ import annotations

import functools
import zlib

from vcjax.world.config import WorldConfig

SPLITS = ("train", "heldout")
Combo = tuple[str, str, str]


@functools.cache
def combos(config: WorldConfig, split: str) -> tuple[Combo, ...]:
  """The sprite combinations of `split`, in a fixed order."""
  held = tuple(dict.fromkeys(tuple(c) for c in config.held_out))
  if split == "heldout":
    return held
  if split == "train":
    excluded = set(held)
    return tuple((s, p, c) for s in config.shapes for p in config.patterns for c in config.colours
                 if (s, p, c) not in excluded)
  raise ValueError(f"unknown split {split!r}; one of {SPLITS}")


def is_held_out(config: WorldConfig, combo) -> bool:
  return tuple(combo) in set(map(tuple, config.held_out))


def stream_id(name: str) -> int:
  """A stable 32-bit id of a random stream name ("train", "heldout", "reference", ...)."""
  return zlib.crc32(name.encode("utf-8"))


def parse_combo(text: str) -> Combo:
  """"star,solid,black" (or "star solid black") -> ("star", "solid", "black")."""
  parts = tuple(text.replace(",", " ").split())
  if len(parts) != 3:
    raise ValueError(f"a combination is 'shape,pattern,colour', got {text!r}")
  return parts
