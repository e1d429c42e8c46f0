"""WorldConfig: every parameter of the procedural world, as one frozen dataclass (configs override fields).

The tables of what each name looks like live in sprites.py / backgrounds.py / motion.py; the config picks
which names exist in this world and all the numbers (sizes, speeds, frame count, held-out combinations).
"""

from __future__ import annotations

import dataclasses

from vcjax.world import backgrounds, motion, sprites

# Sprite combinations (shape, pattern, colour) that never appear in base training: kept for subject
# customization and zero-shot tests. Every shape appears twice, every pattern 3-4 times and every colour
# 1-2 times, and each value still appears in many training combinations (compositional, not unseen values).
HELD_OUT = (
    ("circle", "striped", "blue"), ("circle", "checkered", "pink"),
    ("square", "dotted", "red"), ("square", "ringed", "cyan"),
    ("triangle", "solid", "purple"), ("triangle", "checkered", "green"),
    ("hexagon", "striped", "orange"), ("hexagon", "dotted", "white"),
    ("star", "ringed", "yellow"), ("star", "solid", "black"),
    ("heart", "checkered", "black"), ("heart", "striped", "green"),
    ("cross", "solid", "yellow"), ("cross", "ringed", "red"),
    ("crescent", "dotted", "purple"), ("crescent", "striped", "pink"),
)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """The world's parameters.

  size / frames: clip frames are (frames, size, size, 3). seed: the world seed (clip i of split s is a
  function of (seed, s, i) only). sizes: (name, caption word, bounding-circle diameter as a fraction of
  the side); an empty word is the unnamed default. speeds: (name, caption word (after the motion),
  total displacement over the clip as a fraction of the side). spin_degrees: total rotation of
  "spinning" over the clip (clockwise). grow_range: radius factor at the first/last frame of "growing"
  (reversed for "shrinking"). angle_jitter: max |start angle| in degrees. margin: the gap kept between
  the sprite's bounding circle and the frame edge, as a fraction of the side. antialias: A x A subsamples
  per pixel (coverage alpha; the mask is coverage >= 0.5). held_out: combinations kept out of the "train"
  split. path_spread: where a translating sprite starts, as a fraction of the room its path leaves in the
  frame (1: anywhere its path fits; 0: every path centred in the frame, so it starts on the side opposite
  its direction). Sprites that do not translate start anywhere they fit.
  """
  size: int = 64
  frames: int = 16
  seed: int = 0
  shapes: tuple[str, ...] = tuple(sprites.SHAPES)
  patterns: tuple[str, ...] = tuple(sprites.PATTERNS)
  colours: tuple[str, ...] = tuple(sprites.COLOURS)
  backgrounds: tuple[str, ...] = tuple(backgrounds.BACKGROUNDS)
  motions: tuple[str, ...] = tuple(motion.MOTIONS)
  sizes: tuple[tuple[str, str, float], ...] = (("small", "small", 0.26), ("medium", "", 0.34),
                                               ("big", "big", 0.42))
  speeds: tuple[tuple[str, str, float], ...] = (("slow", "slowly", 0.2), ("normal", "", 0.34),
                                                ("fast", "quickly", 0.48))
  spin_degrees: float = 180.0
  grow_range: tuple[float, float] = (0.65, 1.3)
  angle_jitter: float = 20.0
  margin: float = 0.025
  antialias: int = 2
  # Translating paths stay near the frame's centre (measured, session 12): with starts anywhere the path fits,
  # a clip's direction is readable only by relating its frames, and the world model ignored the direction
  # word (swapping "right" for "left" moved its v prediction by 1%, a colour word by 11-23%; motion accuracy
  # 0.03 on 32 moving prompts). Near-centred paths make the first frame's position depend on the direction, as
  # an object entering from the left moves right.
  path_spread: float = 0.25
  held_out: tuple[tuple[str, str, str], ...] = HELD_OUT

  def __post_init__(self):
    _check_names("shape", self.shapes, sprites.SHAPES)
    _check_names("pattern", self.patterns, sprites.PATTERNS)
    _check_names("colour", self.colours, sprites.COLOURS)
    _check_names("background", self.backgrounds, backgrounds.BACKGROUNDS)
    _check_names("motion", self.motions, motion.MOTIONS)
    for combo in self.held_out:
      s, p, c = combo
      if s not in self.shapes or p not in self.patterns or c not in self.colours:
        raise ValueError(f"held-out combination {combo} uses a name not in this world")
    for c in self.colours:
      if not self.backgrounds_for(c):
        raise ValueError(f"colour {c!r} stands out against none of the backgrounds {self.backgrounds}")
    if self.frames < 2 or self.size < 8 or self.antialias < 1 or not 0 <= self.path_spread <= 1:
      raise ValueError("need frames >= 2, size >= 8, antialias >= 1, 0 <= path_spread <= 1")
    # Every (size, motion, speed) must fit in the frame (start positions are drawn inside the fit).
    for name, _, frac in self.sizes:
      for m in self.motions:
        for sp in (self.speeds if motion.MOTIONS[m].kind == "translate" else self.speeds[:1]):
          lo, hi = motion.start_range(m, frac * self.size / 2, side=self.size, margin=self.margin * self.size,
                                      speed_fraction=sp[2], grow_range=self.grow_range)
          if (lo > hi).any():
            raise ValueError(f"a {name} sprite {m} at speed {sp[0]} does not fit in {self.size} px")

  def backgrounds_for(self, colour: str) -> tuple[str, ...]:
    """The backgrounds a sprite of `colour` may appear on (those that do not list it in `avoid`)."""
    return tuple(b for b in self.backgrounds if colour not in backgrounds.BACKGROUNDS[b].avoid)

  def motions_for(self, shape: str) -> tuple[str, ...]:
    """The motions a `shape` may do ("spin" only for shapes whose silhouette changes when rotated)."""
    return tuple(m for m in self.motions
                 if motion.MOTIONS[m].kind != "spin" or sprites.SHAPES[shape].spins)


def _check_names(what: str, names, table):
  unknown = [n for n in names if n not in table]
  if unknown or not names:
    raise ValueError(f"unknown {what}s {unknown} (known: {sorted(table)})")
