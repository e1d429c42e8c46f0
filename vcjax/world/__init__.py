"""A procedural video world: sprites moving over backgrounds, with captions, masks and boxes as ground truth.

Deterministic from (WorldConfig.seed, split, index); numpy only; nothing is downloaded. Every name below is
an entry of a table (sprites.py, backgrounds.py, motion.py) and every number a WorldConfig field, so a
config changes the world without touching the library.

    from vcjax.world import WorldConfig, sample_clip, parse_caption, vocabulary, truth
    clip = sample_clip(WorldConfig(), index=7, split="train")
    clip.frames (F, H, W, 3) uint8; clip.masks (F, H, W) bool; clip.boxes (F, 4) int32 (y0, x0, y1, x1);
    clip.caption, e.g. "a small striped red star moving left quickly over grass"; clip.attrs (all draws)
    parse_caption(config, clip.caption) == clip.attrs.categorical()
    truth.motion_class(clip.masks) == clip.attrs.motion

Export through the tfds builders (vcjax/data/builders.py) so the world runs the real data pipeline:
    python -m vcjax.world.export --out DATA_DIR --kind t2v|girl|subject ...   (see export.py)

VOCABULARY (captions.vocabulary(): 54 words with the default config)
  shapes (8)        circle square triangle hexagon star heart cross crescent
  patterns (5)      solid striped dotted checkered ringed (the accent is a darker shade of the colour,
                    a lighter one for dark colours, so a sprite reads as one colour)
  colours (10)      red orange yellow green cyan blue purple pink white black
  sizes (3)         small, medium (no word), big: bounding-circle diameter 0.26 / 0.34 / 0.42 of the side
  motions (12)      moving right | up right | up | up left | left | down left | down | down right
                    (at speeds slowly / normal (no word) / quickly = 0.2 / 0.34 / 0.48 of the side over
                    the clip), standing still, spinning (180 degrees clockwise over the clip; not for
                    circles, whose silhouette does not change), growing, shrinking (radius x0.65 <-> x1.3);
                    a translating sprite's path stays near the frame's centre (config.path_spread 0.25 of
                    the room it leaves), so it enters from the side opposite its direction
  backgrounds (9)   over grass, over water, in the sky, over sand, by a brick wall, at night, at sunset,
                    on a gray background, on a white background (textures re-drawn per clip; a colour
                    is never put on a background it does not stand out against, e.g. green on grass)

GRAMMAR (captions.py)
  "a" [SIZE] PATTERN COLOUR SHAPE MOTION [SPEED, after "moving ..." only] BACKGROUND
  e.g. "a big dotted white heart spinning at night", "a solid cyan cross moving down left slowly over sand".

HELD-OUT SET (config.HELD_OUT; splits.py): 16 of the 400 shape x pattern x colour combinations never appear
in the "train" split (384 combinations); the "heldout" split draws only them. They are for subject
customization (export --kind subject --subject I) and zero-shot / unseen-combination tests:
  circle striped blue, circle checkered pink, square dotted red, square ringed cyan,
  triangle solid purple, triangle checkered green, hexagon striped orange, hexagon dotted white,
  star ringed yellow, star solid black, heart checkered black, heart striped green,
  cross solid yellow, cross ringed red, crescent dotted purple, crescent striped pink.
Each shape is held out twice, each pattern 3-4 times, each colour 1-2 times: every single value is still
seen in training, only these combinations are new.

Modules: config (WorldConfig), sprites, backgrounds, motion, captions (grammar, parser, vocabulary),
splits, clips (sampling and rendering), truth (centroid track, motion class, dynamic degree from masks),
export (CLI), tokenizer (CLIP BPE files, one token per world word), probe (a small attribute / mask network
read off frames) and evaluate (world metrics of a model or of videos: `python -m vcjax.world.evaluate`).
"""

from vcjax.world import backgrounds, captions, clips, motion, splits, sprites, truth
from vcjax.world.captions import caption, parse_caption, vocabulary
from vcjax.world.clips import Clip, ClipAttributes, render, sample_attributes, sample_clip, still_image
from vcjax.world.config import HELD_OUT, WorldConfig
from vcjax.world.splits import combos, is_held_out

__all__ = ["backgrounds", "captions", "clips", "motion", "splits", "sprites", "truth", "Clip", "ClipAttributes",
           "HELD_OUT", "WorldConfig", "caption", "combos", "is_held_out", "parse_caption", "render",
           "sample_attributes", "sample_clip", "still_image", "vocabulary"]
