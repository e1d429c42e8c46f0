"""The caption grammar of the world, its parser (caption -> attributes) and its vocabulary.

    caption  := "a" [SIZE] PATTERN COLOUR SHAPE MOTION [SPEED] BACKGROUND
    SIZE     := a size's word ("small", "big"; the default size has no word)
    PATTERN  := "solid" | "striped" | "dotted" | "checkered" | "ringed"
    MOTION   := "moving" DIRECTION | "standing still" | "spinning" | "growing" | "shrinking"
    DIRECTION:= "left" | "right" | "up" | "down" | "up left" | "up right" | "down left" | "down right"
    SPEED    := a speed's word ("slowly", "quickly"; the default speed has no word), only after "moving"
    BACKGROUND := "over grass" | "over water" | "in the sky" | "over sand" | "by a brick wall" |
                  "at night" | "at sunset" | "on a gray background" | "on a white background"

e.g. "a small striped red star moving left quickly over grass", "a dotted blue heart spinning at night".
Customization prompts leave the appearance (PATTERN COLOUR) to something else (`caption(..., subject=)`):
to a reference image ("a small star moving left over grass", VideoMaker) or to a learnt token
("a small <new1> star moving left over grass", CustomCrafter); parse_caption reads both, with pattern
and colour None (and the token under "subject").
Words are lower-case, separated by single spaces, no punctuation, so a word-level tokenizer over
`vocabulary()` covers every caption. The words come from the tables (sprites / backgrounds / motion) and the
config, so a new entry there is automatically part of the grammar.
"""

from __future__ import annotations

from vcjax.world import backgrounds, motion, sprites
from vcjax.world.config import WorldConfig

# The caption's attributes, in caption order; parse_caption returns exactly these keys.
FIELDS = ("size", "pattern", "colour", "shape", "motion", "speed", "background")


def caption(config: WorldConfig, attrs: dict, subject: str | None = None) -> str:
  """Attributes (a dict or an object with the FIELDS; speed None unless the motion translates) -> text.

  subject: None names the pattern and colour; "" leaves them out (the appearance comes from a reference
  image); a token (e.g. "<new1>") stands in their place (a subject LoRA's placeholder)."""
  get = attrs.get if isinstance(attrs, dict) else lambda k: getattr(attrs, k)
  appearance = ([sprites.PATTERNS[get("pattern")].word, get("colour")] if subject is None else [subject])
  words = ["a", _word(config.sizes, get("size")), *appearance, get("shape"), motion.MOTIONS[get("motion")].phrase]
  if motion.MOTIONS[get("motion")].kind == "translate":
    words.append(_word(config.speeds, get("speed")))
  words.append(backgrounds.BACKGROUNDS[get("background")].phrase)
  return " ".join(w for w in words if w)


def _word(table, name: str) -> str:
  for n, word, _ in table:
    if n == name:
      return word
  raise ValueError(f"unknown name {name!r}; one of {[t[0] for t in table]}")


def _phrases(config: WorldConfig) -> dict[str, dict[str, tuple[str, ...]]]:
  """field -> {name: words} for every field of the grammar."""
  return {
      "size": {n: tuple(w.split()) for n, w, _ in config.sizes},
      "pattern": {n: (sprites.PATTERNS[n].word,) for n in config.patterns},
      "colour": {n: (n,) for n in config.colours},
      "shape": {n: (n,) for n in config.shapes},
      "motion": {n: tuple(motion.MOTIONS[n].phrase.split()) for n in config.motions},
      "speed": {n: tuple(w.split()) for n, w, _ in config.speeds},
      "background": {n: tuple(backgrounds.BACKGROUNDS[n].phrase.split()) for n in config.backgrounds},
  }


def _match(options: dict[str, tuple[str, ...]], words: list[str], i: int):
  """The longest option matching words[i:] -> (name, next index), or None. Empty options match last."""
  best = None
  for name, phrase in options.items():
    if tuple(words[i:i + len(phrase)]) == phrase and (best is None or len(phrase) > len(best[1])):
      best = (name, phrase)
  return None if best is None else (best[0], i + len(best[1]))


def parse_caption(config: WorldConfig, text: str, placeholder: str | None = None) -> dict:
  """A caption of the grammar -> {field: name} (FIELDS; speed None unless the motion translates).

  A caption without pattern and colour (caption(..., subject="")) gives None for both; with `placeholder`,
  that token may stand in their place (then None too, and "subject" is the token). Raises ValueError for
  text outside the grammar. Used by metrics to read a prompt's intended content.
  """
  words = text.strip().split()
  words = [w if w == placeholder else w.lower() for w in words]
  table = _phrases(config)
  if not words or words[0] != "a":
    raise ValueError(f"not a world caption (must start with 'a'): {text!r}")
  out, i = {}, 1
  for field in FIELDS:
    if field == "speed" and motion.MOTIONS[out["motion"]].kind != "translate":
      out["speed"] = None
      continue
    if field == "pattern":
      if placeholder is not None and i < len(words) and words[i] == placeholder:  # appearance: the token
        out.update(pattern=None, colour=None, subject=placeholder)
        i += 1
        continue
      if _match(table["pattern"], words, i) is None and _match(table["shape"], words, i) is not None:
        out.update(pattern=None, colour=None)  # appearance left to a reference image
        continue
    if field == "colour" and out["pattern"] is None:
      continue
    m = _match(table[field], words, i)
    if m is None:
      raise ValueError(f"no {field} at word {i} of {text!r}")
    out[field], i = m
  if i != len(words):
    raise ValueError(f"trailing words {words[i:]} in {text!r}")
  return out


def vocabulary(config: WorldConfig | None = None) -> list[str]:
  """Every word a caption of this world can contain, sorted."""
  config = config or WorldConfig()
  words = {"a"}
  for options in _phrases(config).values():
    for phrase in options.values():
      words.update(phrase)
  return sorted(words)
