"""Export the world through the tfds array_record builders (vcjax/data/builders.py), in memory.

    python -m vcjax.world.export --out DATA_DIR --kind t2v [--num 10000] [--split train|heldout]
    python -m vcjax.world.export --out DATA_DIR --kind girl [--num 10000] [--captions bare]
    python -m vcjax.world.export --out DATA_DIR --kind subject [--subject 0 | --subject star,solid,black]
        [--num 6] [--num-prior 50] [--placeholder "<new1>"]
    common: [--name NAME] [--seed 0] [--size 64] [--frames 16] [--start 0] [--workers 1] [--overwrite]

Kinds (the tfds name printed is what `--config.data.dataset` / make_loader(dataset=...) take):
  t2v      vcjax_video_clips/<name>: clips `--start .. --start+num-1` of `--split`, caption, reference =
           the first frame + its subject mask, and (with_tracks) per-frame masks (F, H, W) and boxes (F, 4).
  girl     the same clips, but the reference is a separate still render of the same sprite (another
           background, position and size; its own random stream) with its mask, so GIRL cannot copy the
           first frame. make_loader("videomaker") applies SHP to it. --captions bare: captions without
           pattern and colour ("a star moving left over grass"), which only the reference then shows.
  subject  vcjax_subject_images/<name>: `num` still images of ONE sprite combination (default: the first
           held-out one) on drawn backgrounds, with masks and captions (split "train"), and `num_prior`
           class images (split "prior"): training-split sprites of the same shape (the class word).
           --placeholder TOKEN: the subject's captions name it by the token ("a <new1> star standing still
           over grass") and the class images' leave the appearance out ("a star standing still over sand"),
           DreamBooth's instance / class prompts in the world's grammar.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from vcjax.world import captions, clips, splits
from vcjax.world.config import WorldConfig

KINDS = ("t2v", "girl", "subject")


def clip_id(split: str, index: int) -> str:
  return f"{split}_{index:08d}"


def video_item(config: WorldConfig, split: str, index: int, reference: str = "first", bare: bool = False) -> dict:
  """One in-memory video item for builders.prepare_video_dataset (with_tracks). reference: "first" (the
  first frame and its mask) or "render" (a still render of the same sprite, its own random stream).
  bare: the caption without the sprite's pattern and colour."""
  clip = clips.sample_clip(config, index, split)
  text = captions.caption(config, clip.attrs, subject="") if bare else clip.caption
  item = {"clip_id": clip_id(split, index), "frames": clip.frames, "caption": text,
          "masks": clip.masks, "reference": clip.frames[0], "mask": clip.masks[0]}
  if reference == "render":
    ref = clips.still_image(config, index, clip.attrs.combo, split, stream="reference")
    item["reference"], item["mask"] = ref.frames[0], ref.masks[0]
  elif reference != "first":
    raise ValueError(f"unknown reference {reference!r}: 'first' or 'render'")
  return item


def _item_star(args):
  return video_item(*args)


def video_examples(config: WorldConfig, num: int, split: str = "train", start: int = 0,
                   reference: str = "first", workers: int = 1, bare: bool = False):
  """Items of clips start..start+num-1, in index order; workers > 1 renders them in that many (spawned)
  processes (the items are the same: each is a function of its index)."""
  args = [(config, split, i, reference, bare) for i in range(start, start + num)]
  if workers <= 1:
    yield from map(_item_star, args)
    return
  import concurrent.futures
  import multiprocessing
  ctx = multiprocessing.get_context("spawn")  # Not fork: the caller may run tfds/grain threads.
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    yield from pool.map(_item_star, args, chunksize=32)


def subject_examples(config: WorldConfig, combo: splits.Combo, num: int, num_prior: int,
                     placeholder: str | None = None) -> dict:
  """In-memory subject items for builders.prepare_subject_dataset: {"train": [...], "prior": [...]}.
  placeholder: name the subject by this token and leave the class images' appearance out (module doc)."""
  def image(c: clips.Clip, name: str, subject: str | None) -> dict:
    text = c.caption if placeholder is None else captions.caption(config, c.attrs, subject=subject)
    return {"name": name, "image": c.frames[0], "mask": c.masks[0], "caption": text}

  out = {"train": [image(clips.still_image(config, i, combo, "heldout", stream="subject"), f"subject_{i:04d}",
                         placeholder) for i in range(num)]}
  if num_prior > 0:
    pool = [c for c in splits.combos(config, "train") if c[0] == combo[0] and c != tuple(combo)]
    # Each class image draws its own combination (patterns and colours vary; never a held-out one).
    picks = [pool[int(clips.clip_rng(config, "train", i, "prior_combo").integers(len(pool)))]
             for i in range(num_prior)]
    out["prior"] = [image(clips.still_image(config, i, c, "train", stream="prior"), f"prior_{i:04d}", "")
                    for i, c in enumerate(picks)]
  return out


def subject_combo(config: WorldConfig, subject: str | int) -> splits.Combo:
  """An index into config.held_out, or "shape,pattern,colour"."""
  if isinstance(subject, int) or str(subject).isdigit():
    return tuple(config.held_out[int(subject)])
  combo = splits.parse_combo(str(subject))
  for value, names in zip(combo, (config.shapes, config.patterns, config.colours)):
    if value not in names:
      raise ValueError(f"{value!r} is not one of {names}")
  return combo


def export(kind: str, data_dir: str, *, config: WorldConfig = WorldConfig(), num: int = 1000,
           name: str | None = None, split: str = "train", start: int = 0, subject: str | int = 0,
           num_prior: int = 0, overwrite: bool = False, encoding: str = "bytes", workers: int = 1,
           bare_captions: bool = False, placeholder: str | None = None) -> dict:
  """Write one world dataset; returns prepare_*'s dict plus "combo" (subject) and "seconds". encoding: of
  the pixel tensors ("bytes": several times faster to write than tfds' varint lists; array_record
  compresses the files anyway). workers: rendering processes for t2v / girl. bare_captions (t2v, girl) and
  placeholder (subject): the captions of customization training (module doc)."""
  from vcjax.data import builders  # tfds is only needed to export, not to sample the world.
  name = name or f"world_{kind}"
  t0 = time.perf_counter()
  if kind in ("t2v", "girl"):
    examples = video_examples(config, num, split, start, reference="first" if kind == "t2v" else "render",
                              workers=workers, bare=bare_captions)
    info = builders.prepare_video_dataset(
        None, data_dir, name, num_frames=config.frames, size=(config.size, config.size),
        reference_size=config.size, overwrite=overwrite, examples=examples, with_tracks=True,
        encoding=encoding)
  elif kind == "subject":
    combo = subject_combo(config, subject)
    info = builders.prepare_subject_dataset(None, data_dir, name, image_size=config.size, overwrite=overwrite,
                                            examples=subject_examples(config, combo, num, num_prior, placeholder),
                                            encoding=encoding)
    info["combo"] = list(combo)
  else:
    raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
  info["seconds"] = round(time.perf_counter() - t0, 3)
  return info


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="Export the procedural world as a vcjax tfds dataset.")
  p.add_argument("--out", required=True, help="the tfds data_dir")
  p.add_argument("--kind", required=True, choices=KINDS)
  p.add_argument("--num", type=int, default=None, help="clips (t2v, girl; default 1000) or images (subject; 6)")
  p.add_argument("--name", default=None, help="dataset config name (default world_<kind>)")
  p.add_argument("--split", default="train", choices=splits.SPLITS, help="world split of the clips")
  p.add_argument("--start", type=int, default=0, help="first clip index")
  p.add_argument("--subject", default="0", help="held-out index or 'shape,pattern,colour' (subject)")
  p.add_argument("--num-prior", type=int, default=50, help="class images (subject)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--encoding", default="bytes", choices=("none", "bytes", "zlib"), help="pixel tensors")
  p.add_argument("--workers", type=int, default=1, help="rendering processes (t2v, girl)")
  p.add_argument("--captions", default="full", choices=("full", "bare"),
                 help="bare: without the sprite's pattern and colour (t2v, girl)")
  p.add_argument("--placeholder", default=None, help="the subject's token in its captions (subject)")
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  num = args.num if args.num is not None else (6 if args.kind == "subject" else 1000)
  try:
    config = dataclasses.replace(WorldConfig(), seed=args.seed, size=args.size, frames=args.frames)
    info = export(args.kind, args.out, config=config, num=num, name=args.name, split=args.split,
                  start=args.start, subject=args.subject, num_prior=args.num_prior, overwrite=args.overwrite,
                  encoding=args.encoding, workers=args.workers, bare_captions=args.captions == "bare",
                  placeholder=args.placeholder)
  except (ValueError, OSError, TypeError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  out = {k: info[k] for k in ("dataset", "splits", "seconds") if k in info}
  if "combo" in info:
    out["combo"] = info["combo"]
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
