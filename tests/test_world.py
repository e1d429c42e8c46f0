"""The procedural world: determinism, captions vs content, held-out split, masks/boxes, ground truth."""

import dataclasses
import re

import numpy as np
import pytest

from vcjax.world import (HELD_OUT, WorldConfig, backgrounds, captions, clips, combos, motion, parse_caption,
                         sample_attributes, sample_clip, sprites, truth, vocabulary)

CFG = WorldConfig()


@pytest.fixture(scope="module")
def sample():
  """300 rendered training clips (indices 0..299) and 60 held-out ones."""
  return ([sample_clip(CFG, i) for i in range(300)], [sample_clip(CFG, i, "heldout") for i in range(60)])


def _clip_equal(a, b):
  return (np.array_equal(a.frames, b.frames) and np.array_equal(a.masks, b.masks)
          and np.array_equal(a.boxes, b.boxes) and a.caption == b.caption and a.attrs == b.attrs)


# ------------------------------------------------------------------------------------------ determinism

def test_determinism_from_seed_split_index(sample):
  train, held = sample
  # Same (seed, split, index) -> bit-identical, regardless of what was sampled before or in which order.
  for i in (0, 7, 123, 299):
    assert _clip_equal(sample_clip(CFG, i), train[i])
  assert _clip_equal(sample_clip(WorldConfig(), 5, "heldout"), held[5])
  # A different index, seed or split -> a different clip.
  assert not np.array_equal(train[0].frames, train[1].frames)
  other = sample_clip(dataclasses.replace(CFG, seed=1), 0)
  assert not np.array_equal(other.frames, train[0].frames)
  assert sample_attributes(CFG, 3, "heldout") != sample_attributes(CFG, 3, "train")
  # The attribute draws are spread: many distinct captions, all motions and backgrounds used.
  assert len({c.caption for c in train}) >= 290
  assert {c.attrs.motion for c in train} == set(CFG.motions)
  assert {c.attrs.background for c in train} == set(CFG.backgrounds)


def test_config_changes_the_world():
  small = WorldConfig(size=32, frames=6, seed=3)
  c = sample_clip(small, 0)
  assert c.frames.shape == (6, 32, 32, 3) and c.frames.dtype == np.uint8
  assert c.masks.shape == (6, 32, 32) and c.masks.dtype == np.bool_
  assert c.boxes.shape == (6, 4) and c.boxes.dtype == np.int32
  # A world where a big fast sprite cannot fit is refused, as are unknown names and held-out entries.
  with pytest.raises(ValueError, match="does not fit"):
    WorldConfig(speeds=(("fast", "quickly", 0.8),))
  with pytest.raises(ValueError, match="unknown shape"):
    WorldConfig(shapes=("circle", "blob"))
  with pytest.raises(ValueError, match="held-out"):
    WorldConfig(shapes=("circle", "square"))  # The default held-out list names other shapes.
  # A smaller world: its own vocabulary, combinations and captions.
  tiny = WorldConfig(shapes=("circle", "star"), patterns=("solid", "dotted"), colours=("red", "blue"),
                     held_out=(("star", "dotted", "red"),))
  assert len(combos(tiny, "train")) == 7 and combos(tiny, "heldout") == (("star", "dotted", "red"),)
  assert "square" not in vocabulary(tiny) and "star" in vocabulary(tiny)


# ------------------------------------------------------------------------------------------ captions

def test_captions_parse_back_and_use_the_vocabulary(sample):
  train, held = sample
  vocab = set(vocabulary())
  assert len(vocab) == 54 and vocabulary() == sorted(vocab)
  assert all(re.fullmatch(r"[a-z]+", w) for w in vocab)
  for c in train + held:
    assert parse_caption(CFG, c.caption) == c.attrs.categorical(), c.caption
    assert set(c.caption.split()) <= vocab
  for i in range(2000):  # Attribute draws only: every combination of fields the sampler makes.
    a = sample_attributes(CFG, 1000 + i)
    assert parse_caption(CFG, captions.caption(CFG, a)) == a.categorical()
  assert parse_caption(CFG, "a small striped red star moving up left quickly over grass") == {
      "size": "small", "pattern": "striped", "colour": "red", "shape": "star", "motion": "up_left",
      "speed": "fast", "background": "grass"}
  assert parse_caption(CFG, "a dotted white heart spinning on a white background") == {
      "size": "medium", "pattern": "dotted", "colour": "white", "shape": "heart", "motion": "spin",
      "speed": None, "background": "white"}
  for bad in ("a red star moving left over grass", "a solid red star moving left over the moon",
              "the solid red star standing still at night", "a solid red star standing still at night now",
              "a solid red star spinning quickly at night"):
    with pytest.raises(ValueError):
      parse_caption(CFG, bad)


def _erode(m):
  """3x3 erosion of a `(H, W)` bool mask (outside the image counts as set)."""
  p = np.pad(m, 1, constant_values=True)
  h, w = m.shape
  return np.logical_and.reduce([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])


def test_captions_without_appearance_or_with_a_token(sample):
  """Customization prompts: pattern and colour left to a reference image, or to a placeholder token."""
  for c in sample[0][:40]:
    a = c.attrs
    bare = captions.caption(CFG, a, subject="")
    token = captions.caption(CFG, a, subject="<new1>")
    assert bare == c.caption.replace(f"{sprites.PATTERNS[a.pattern].word} {a.colour} ", "")
    assert token == c.caption.replace(f"{sprites.PATTERNS[a.pattern].word} {a.colour}", "<new1>")
    want = dict(a.categorical(), pattern=None, colour=None)
    assert parse_caption(CFG, bare) == want, bare
    assert parse_caption(CFG, token, placeholder="<new1>") == dict(want, subject="<new1>"), token
  assert parse_caption(CFG, "a big star spinning at night")["size"] == "big"
  for bad in ("a red star spinning at night", "a dotted star spinning at night",
              "a <new1> star spinning at night"):  # half an appearance; a token that is not the placeholder
    with pytest.raises(ValueError):
      parse_caption(CFG, bad, placeholder="<new2>")


def test_captions_match_content(sample):
  """What the caption names is what the pixels show: background, colour, pattern, size, motion."""
  train, _ = sample
  for c in train[:150]:
    a = c.attrs
    k = int(truth.areas(c.masks).argmax())  # The frame where the sprite is largest.
    frame, mask = c.frames[k], c.masks[k]
    bg = backgrounds.render_background(a.background, np.random.default_rng(a.background_seed), CFG.size,
                                       CFG.size)
    bg8 = np.clip(np.rint(bg), 0, 255).astype(np.uint8)
    # The mask grown by two pixels (8-connected): outside it the sprite leaves no trace. (One is not enough at
    # a crescent's tip thinner than a pixel: a pixel it covers by 1/4 can have no neighbour covered by 1/2.)
    near = ~_erode(_erode(~mask))
    assert np.array_equal(frame[~near], bg8[~near]), c.caption
    assert a.colour not in backgrounds.BACKGROUNDS[a.background].avoid
    inner = frame[_erode(mask)].astype(int)  # Fully covered pixels: main/accent mixes.
    col = sprites.COLOURS[a.colour]
    main, acc = np.asarray(col.rgb), np.asarray(col.accent)
    # Each interior pixel lies on the segment main -> accent (a subsample mix of the two), nowhere else.
    d = acc - main
    t = np.clip(((inner - main) @ d) / (d @ d), 0, 1)
    assert np.abs(inner - (main + t[:, None] * d)).max() <= 2, c.caption
    if a.pattern == "solid":
      assert np.all(t < 0.01), c.caption
    else:  # Both the main colour and the accent are visible.
      assert (t < 0.1).sum() >= 2 and (t > 0.9).sum() >= 1, c.caption
    # Size: the mask's farthest pixel from its centroid ~ the named size's radius (times the grow factor).
    ys, xs = np.nonzero(mask)
    reach = np.sqrt((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2).max()
    factor = motion.scale_track(motion.MOTIONS[a.motion].kind, CFG.frames, CFG.grow_range)[k]
    assert abs(reach - clips.radius_px(CFG, a.size) * factor) <= 1.6, c.caption


# ------------------------------------------------------------------------------------------ splits

def test_held_out_never_in_training():
  train = set(combos(CFG, "train"))
  held = set(combos(CFG, "heldout"))
  assert held == set(HELD_OUT) and len(held) == 16 and not (train & held)
  assert len(train) + len(held) == len(CFG.shapes) * len(CFG.patterns) * len(CFG.colours) == 400
  # Each held-out value also occurs in training (compositional, not unseen, values).
  for k in range(3):
    assert {c[k] for c in held} <= {c[k] for c in train}
  seen = {sample_attributes(CFG, i).combo for i in range(10000)}
  assert not (seen & held)
  assert seen == train  # ...and the training split does use every other combination.
  assert {sample_attributes(CFG, i, "heldout").combo for i in range(600)} == held


# ------------------------------------------------------------------------------------------ masks, truth

def test_masks_and_boxes_consistent(sample):
  train, held = sample
  for c in train + held:
    assert c.masks.any((1, 2)).all()
    np.testing.assert_array_equal(c.boxes, clips.mask_boxes(c.masks))
    y0, x0, y1, x1 = c.boxes.T
    assert (y0 >= 1).all() and (x0 >= 1).all() and (y1 <= CFG.size - 1).all() and (x1 <= CFG.size - 1).all()
    # Mask centroid = the renderer's sprite centre (shapes are centred on their area centroid).
    assert np.abs(truth.centroids(c.masks) - c.centres).max() < 0.75, c.caption
    # Pixels change between frames only where the sprite is or was (static backgrounds); 2 px of slack
    # for thin tips (a crescent's horns) whose partly covered pixels are below the mask's 0.5.
    moved = np.any(c.frames[1:] != c.frames[:-1], -1)
    grown = ~_erode_all(_erode_all(~(c.masks[1:] | c.masks[:-1])))
    assert not (moved & ~grown).any(), c.caption


def _erode_all(m):
  return np.stack([_erode(x) for x in m])


def test_truth_recovers_motion(sample):
  train, held = sample
  allc = train + held
  pred = [truth.motion_class(c.masks) for c in allc]
  acc = np.mean([p == c.attrs.motion for p, c in zip(pred, allc)])
  assert acc >= 0.95, acc
  moving = [c for c in allc if c.attrs.speed is not None]
  speed_acc = np.mean([truth.speed_class(c.masks, CFG.speeds) == c.attrs.speed for c in moving])
  assert speed_acc >= 0.95, speed_acc
  # Dynamic degree: translation speed per frame; ~0 for motions that stay in place.
  for c in allc:
    dd = truth.mean_displacement(c.masks)
    if c.attrs.speed is not None:
      expect = clips.speed_fraction(CFG, c.attrs.speed) * CFG.size / (CFG.frames - 1)
      assert abs(dd - expect) <= 0.15 * expect, (c.caption, dd, expect)
    else:
      assert dd < 0.5, (c.caption, dd)
  assert truth.mean_displacement(train[0].masks, normalize=True) == pytest.approx(
      truth.mean_displacement(train[0].masks) / CFG.size)
  # The classifier on hand-made masks: a box moving up-left, one growing, one still; uint8 masks too.
  box = np.zeros((8, 40, 40), bool)
  for t in range(8):
    box[t, 30 - 2 * t: 38 - 2 * t, 30 - 2 * t: 38 - 2 * t] = True
  assert truth.motion_class(box) == "up_left"
  assert truth.motion_class(np.repeat(box[:1], 8, 0).astype(np.uint8) * 255) == "still"
  grow = np.zeros((8, 40, 40), bool)
  for t in range(8):
    grow[t, 20 - t - 2: 20 + t + 2, 20 - t - 2: 20 + t + 2] = True
  assert truth.motion_class(grow) == "grow" and truth.motion_class(grow[::-1]) == "shrink"
  assert truth.compass(0.0, -1.0) == "left" and truth.compass(1.0, 1.0) == "down_right"


def test_generation_speed():
  import time
  t0 = time.perf_counter()
  for i in range(100):
    sample_clip(CFG, 5000 + i)
  rate = 100 / (time.perf_counter() - t0)
  print(f"world: {rate:.0f} clips/s (16 x 64 x 64)")
  assert rate > 20  # Hundreds on an idle core; the bound only catches an accidental slow path.


def test_translating_paths_stay_near_the_centre():
  """path_spread narrows where a translating sprite starts (around the start that centres its path); 1 is
  anywhere its path fits; sprites that do not translate start anywhere they fit whatever the spread."""
  def starts(world, kind):
    out = []
    for i in range(300):
      a = clips.sample_attributes(world, i)
      if motion.MOTIONS[a.motion].kind == kind:
        lo, hi = motion.start_range(a.motion, clips.radius_px(world, a.size), side=world.size,
                                    margin=world.margin * world.size,
                                    speed_fraction=clips.speed_fraction(world, a.speed), grow_range=world.grow_range)
        out.append(((np.asarray(a.start) - lo) / (hi - lo)))  # 0..1 across the room the path leaves
    return np.asarray(out)

  wide, narrow = WorldConfig(path_spread=1.0), WorldConfig()
  assert narrow.path_spread == 0.25
  u_wide, u_narrow = starts(wide, "translate"), starts(narrow, "translate")
  assert len(u_wide) > 100 and u_wide.min() < 0.05 and u_wide.max() > 0.95
  np.testing.assert_allclose(u_narrow, 0.5 + (u_wide - 0.5) * 0.25, atol=1e-9)  # the same draws, narrowed
  still_wide, still_narrow = starts(wide, "still"), starts(narrow, "still")
  np.testing.assert_array_equal(still_wide, still_narrow)
  assert still_narrow.min() < 0.1 and still_narrow.max() > 0.9
  clip = sample_clip(narrow, next(i for i in range(50)
                                  if clips.sample_attributes(narrow, i).motion == "right"))
  centre = clips.mask_boxes(clip.masks)[[0, -1]]  # (y0, x0, y1, x1) of the first and last frames
  mid_x = (centre[:, 1] + centre[:, 3]) / 2
  assert mid_x[0] < narrow.size / 2 < mid_x[1]  # a sprite moving right starts left of the centre, ends right
  with pytest.raises(ValueError, match="path_spread"):
    WorldConfig(path_spread=1.5)
