"""Score a folder of videos with the papers' metrics (no torch needed).

    python -m vcjax.eval --videos outputs/ --clip clip-vit-base-patch32/ --dino dino-vits16/ \
        --raft raft-things.pth [--prompts prompts.json] [--references refs/] --out results.json

Prompts and references come from each video's sample.py sidecar (`<video>.json`: config.prompt,
config.reference) unless --prompts / --references say otherwise. Any model may be left out; its metrics
are then left out of the JSON. Bad videos or references are reported (one line each, naming the file)
and the others scored; the exit status is 1 when any was bad, 2 when nothing could be scored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vcjax.eval import metrics


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m vcjax.eval", description=__doc__.split("\n\n")[0])
  p.add_argument("--videos", required=True, help="folder of videos (.mp4, .gif, ...)")
  p.add_argument("--clip", help="transformers CLIPModel folder (openai/clip-vit-base-patch32), with tokenizer")
  p.add_argument("--dino", help="transformers ViTModel folder (facebook/dino-vits16)")
  p.add_argument("--raft", help="RAFT checkpoint (raft-things.pth)")
  p.add_argument("--prompts", help="JSON {video name: prompt} or lines 'name<TAB>prompt' (default: sidecars)")
  p.add_argument("--references", help="folder of reference images: <stem>/ or <stem>.png per video, else all "
                                       "images for every video (default: sidecars)")
  p.add_argument("--out", default="results.json", help="JSON results file")
  p.add_argument("--dd-threshold", choices=metrics.DD_THRESHOLDS, default="authors")
  p.add_argument("--raft-iters", type=int, default=20)
  p.add_argument("--batch-per-device", type=int, default=8, help="CLIP / DINO images per device per step")
  p.add_argument("--raft-batch-per-device", type=int, default=2, help="frame pairs per device per step")
  p.add_argument("--clip-crop", choices=("clip", "transformers"), default="clip",
                 help="centre-crop rounding: the clip package's (the authors') or transformers'")
  return p.parse_args(argv)


def format_table(result: dict) -> str:
  cols = ("clip_t", "clip_i", "dino_i", "t_cons", "dd_moving")
  width = max([len(os.path.basename(r["path"])) for r in result["videos"]] + [5])
  lines = ["video".ljust(width) + "".join(c.rjust(10) for c in cols)]

  def cell(v):
    return "-".rjust(10) if v is None else (f"{v:10d}" if isinstance(v, int) else f"{v:10.4f}")

  for r in result["videos"]:
    lines.append(os.path.basename(r["path"]).ljust(width) + "".join(cell(r.get(c)) for c in cols))
  mean = result["mean"]
  lines.append("mean".ljust(width) + "".join(cell(mean.get("dd" if c == "dd_moving" else c)) for c in cols))
  return "\n".join(lines)


def load_models(args) -> dict:
  """The models named on the command line -> Scorer keyword arguments (CheckpointError on a bad one)."""
  from vcjax.models.tokenizer import load_tokenizer
  from vcjax.weights import eval_models
  out = {}
  if args.clip:
    out["clip"] = eval_models.load_clip(args.clip)
    try:
      out["tokenizer"] = load_tokenizer(args.clip)
    except FileNotFoundError as e:
      from vcjax.weights.errors import CheckpointError
      raise CheckpointError(str(e)) from None
  if args.dino:
    out["dino"] = eval_models.load_dino(args.dino)
  if args.raft:
    out["raft"] = eval_models.load_raft(args.raft)
  return out


def run(args) -> tuple[dict, int]:
  from tqdm import tqdm

  from vcjax.eval.inputs import list_videos, read_prompts
  from vcjax.eval.score import Scorer
  models = load_models(args)
  if not models:
    raise ValueError("no model given: pass at least one of --clip, --dino, --raft")
  paths = list_videos(args.videos)
  if not paths:
    raise ValueError(f"{args.videos}: no videos")
  prompts = read_prompts(args.prompts) if args.prompts else None
  scorer = Scorer(**models, dd_threshold=args.dd_threshold, raft_iters=args.raft_iters,
                  batch_per_device=args.batch_per_device, raft_batch_per_device=args.raft_batch_per_device,
                  clip_crop=args.clip_crop)
  result = scorer.score(paths, prompts=prompts, references=args.references,
                        progress=lambda total: tqdm(total=total, desc="scoring", unit="video"))
  errors = result.pop("errors")
  return result, errors


def main(argv=None) -> int:
  from vcjax.eval.inputs import InputError
  from vcjax.weights.errors import CheckpointError
  args = parse_args(argv)
  try:
    result, errors = run(args)
  except (ValueError, CheckpointError, InputError, OSError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  for e in errors:
    print(f"error: {e}", file=sys.stderr)
  if result["videos"]:
    print(format_table(result))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")
  if not result["videos"]:
    return 2
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
