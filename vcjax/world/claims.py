"""The papers' claims on the world (issue E2): one command per table, the same prompts, seeds and metrics
for every row of it.

    python -m vcjax.world.claims dynamic-weighting --model models/world \
        --lora 9=runs/world_subject_9/final/lora.safetensors,0=runs/world_subject_0/final/lora.safetensors \
        --subjects 9,0 --out results/world/dynamic_weighting
    python -m vcjax.world.claims girl --model models/world --girl runs/world_girl/final/model \
        [--girl-fixed-motion runs/world_girl_fixed/final/model] --subjects 0,9,12 --out results/world/girl
    python -m vcjax.world.claims zero-shot --model models/world --girl runs/world_girl/final/model \
        --lora runs/world_subject_9/final/lora.safetensors --subjects 9 --out results/world/zero_shot

Each writes OUT.json (every video's row, the settings) and OUT.md (the table) and prints the table.
--lora is one LoRA file for every subject or `SUBJECT=FILE,...`, one per subject (a subject LoRA learns one
sprite).

Prompts: for each held-out subject (an index into WorldConfig.held_out, --subjects), `--num-prompts` world
captions of that sprite drawn from the stream "claims" (moving prompts only for dynamic weighting: it is
about motion); each is sampled under each `--seeds`. A row's condition decides how the subject is given:
  token      "a <new1> star moving left over grass" (the subject LoRA's token in place of pattern and colour)
  reference  "a star moving left over grass" + one reference image: a still render of the sprite (its own
             stream, "claims-reference") through SHP without its random parts (cut to the box, white
             background, square)
  text       the full caption (the base model's compositional generalisation; a reference point)
Every video is scored by the world metrics (evaluate.py) against the FULL caption, so colour / shape /
pattern accuracy is fidelity to the subject and motion accuracy and dynamic degree are the prompt's motion,
whatever the prompt said. Fidelity is the mean of the three appearance accuracies.

Sampling: the model's DDIM, `--steps` (25) and `--guidance-scale` (4, the world default; the paper's 12 and
50 steps are an option away), 16 frames, 64x64. The LoRA schedules are vcjax.methods.customcrafter's specs:
"paper" is 0.4 for the first 5 steps, then 0.8, at any step count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from vcjax.world import captions, clips, motion
from vcjax.world import evaluate as world_eval
from vcjax.world.config import WorldConfig

STREAM = "claims"
TOKEN = "<new1>"
FORMS = ("token", "reference", "text")


@dataclasses.dataclass(frozen=True)
class Condition:
  """One row of a table: `model` (a converted folder), how the subject is given (`form`), and optionally the
  subject LoRA (one file, or "SUBJECT=FILE,..." one per subject: `lora_files`) with its scale schedule (a
  vcjax.methods.customcrafter.schedule spec)."""
  name: str
  model: str
  form: str
  lora: str | None = None
  schedule: str = "constant:1.0"

  def __post_init__(self):
    if self.form not in FORMS:
      raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
    if self.form == "token" and not self.lora:
      raise ValueError(f"{self.name}: the token form needs a subject LoRA (its token embedding)")


def lora_files(spec: str, subjects: Sequence[int]) -> dict[int, str]:
  """--lora's value -> {subject: LoRA file}: one file for all, or "SUBJECT=FILE,..." naming every subject."""
  if "=" not in spec:
    return {s: spec for s in subjects}
  files = {}
  for item in filter(None, (t.strip() for t in spec.split(","))):
    subject, sep, path = item.partition("=")
    if not sep or not subject.strip().isdigit() or not path:
      raise ValueError(f"--lora: expected FILE or SUBJECT=FILE,..., got {item!r}")
    files[int(subject)] = path
  missing = [s for s in subjects if s not in files]
  extra = sorted(set(files) - set(subjects))
  if missing or extra:
    raise ValueError(f"--lora: subjects {missing} have no LoRA" if missing else
                     f"--lora: LoRAs for subjects {extra}, which --subjects does not list")
  return files


def subject_prompts(world: WorldConfig, subject: int, n: int, moving_only: bool = False) -> list:
  """The attributes of `n` claim prompts of held-out sprite `subject` (deterministic in the world seed)."""
  combo = tuple(world.held_out[subject])
  shape, pattern, colour = combo
  out, i = [], 0
  while len(out) < n:
    fixed = dict(shape=shape, pattern=pattern, colour=colour)
    if moving_only:  # the 8 compass directions in turn
      fixed["motion"] = [m for m in world.motions if motion.MOTIONS[m].kind == "translate"][i % 8]
    out.append(clips.sample_attributes(world, 1000 * subject + i, "heldout", stream=STREAM, **fixed))
    i += 1
  return out


def reference_image(world: WorldConfig, subject: int, size: int) -> np.ndarray:
  """VideoMaker's reference of held-out sprite `subject`: `(size, size, 3)` float32 in [-1, 1]."""
  from vcjax.data.shp import SHPConfig, subject_highlight
  combo = tuple(world.held_out[subject])
  still = clips.still_image(world, subject, combo, "heldout", stream=STREAM + "-reference")
  mask = still.masks[0].astype(np.uint8) * 255
  plain = SHPConfig(cut=(0.0, 0.0), scale=(1.0, 1.0), flip_prob=0.0)  # the deterministic part of SHP
  image, _ = subject_highlight(still.frames[0], mask, np.random.default_rng(0), size, plain)
  return image.astype(np.float32) / 127.5 - 1.0


def prompt_text(world: WorldConfig, attrs, form: str) -> str:
  return captions.caption(world, attrs, subject={"token": TOKEN, "reference": "", "text": None}[form])


def run_condition(cond: Condition, world: WorldConfig, subjects: Sequence[int], *, num_prompts: int,
                  seeds: Sequence[int], steps: int, guidance_scale: float, batch: int, probe_model,
                  moving_only: bool = False, log=print, pipes: dict | None = None,
                  save_videos: str | None = None) -> dict:
  """Sample and score one condition -> {"condition", "result" (evaluate.evaluate's), "seconds"}. pipes:
  pipelines by (model, LoRA file), kept between the conditions of a table (one load and compile for all the
  schedules of one LoRA: the scales are an argument of the compiled loop). Subjects are sampled in turn,
  each through the pipeline with its own LoRA. save_videos: a folder for this
  condition's videos (mp4 + JSON sidecar with the prompt and the caption scored against)."""
  from vcjax.methods.customcrafter.schedule import lora_scales, skipped_steps
  from vcjax.pipeline import VideoPipeline
  t0 = time.time()
  pipes = {} if pipes is None else pipes
  files = lora_files(cond.lora, subjects) if cond.lora else dict.fromkeys(subjects)
  kwargs = {}
  if cond.lora:
    kwargs["lora_scales"] = lora_scales(cond.schedule, steps)
    skip = skipped_steps(cond.schedule, steps)
    kwargs["skip_steps"] = skip if skip.any() else None

  def subject_videos(s):  # one subject's prompts, through the pipeline with its LoRA
    if (cond.model, files[s]) not in pipes:
      pipe = VideoPipeline.from_pretrained(cond.model)
      if files[s]:
        pipe.load_lora(files[s])
      pipes[cond.model, files[s]] = pipe
    attrs = subject_prompts(world, s, num_prompts, moving_only)
    prompts = [prompt_text(world, a, cond.form) for a in attrs]
    full = [captions.caption(world, a) for a in attrs]
    refs = [reference_image(world, s, world.size)] * len(attrs) if cond.form == "reference" else None
    videos = world_eval.generated_videos(
        pipes[cond.model, files[s]], prompts, seeds, steps=steps, guidance_scale=guidance_scale,
        num_frames=world.frames, height=world.size, width=world.size, batch=batch, log=log, references=refs,
        **kwargs)
    return (dict(v, caption=full[v["index"]]) for v in videos)

  videos = (v for s in subjects for v in subject_videos(s))
  result = world_eval.evaluate(videos, probe_model, world, save_videos=save_videos)
  return {"condition": dataclasses.asdict(cond), "result": result, "seconds": round(time.time() - t0, 1)}


COLUMNS = ("fidelity", "colour_accuracy", "shape_accuracy", "pattern_accuracy", "motion_accuracy",
           "dynamic_degree_moving", "dynamic_degree", "background_accuracy")


def row_metrics(run: dict) -> dict:
  m = run["result"]["metrics"]
  appearance = [m[k] for k in ("colour_accuracy", "shape_accuracy", "pattern_accuracy") if m[k] is not None]
  return dict(m, fidelity=float(np.mean(appearance)) if appearance else None)


def markdown_table(title: str, runs: Sequence[dict], settings: dict) -> str:
  lines = [f"### {title}", "",
           "| condition | " + " | ".join(COLUMNS) + " | videos | seconds |",
           "|---" * (len(COLUMNS) + 3) + "|"]
  for run in runs:
    m = row_metrics(run)
    cells = ["-" if m.get(k) is None else f"{m[k]:.3f}" for k in COLUMNS]
    lines.append(f"| {run['condition']['name']} | " + " | ".join(cells) +
                 f" | {run['result']['num_videos']} | {run['seconds']:.0f} |")
  lines += ["", "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + "."]
  return "\n".join(lines)


def conditions_for(claim: str, args) -> tuple[list[Condition], bool]:
  """(rows, moving prompts only) of a claim."""
  if claim == "dynamic-weighting":
    rows = [Condition(name, args.model, "token", args.lora, spec) for name, spec in (
        ("dynamic (paper: 0.4 x 5 steps, then 0.8)", "paper"), ("dynamic (authors' code)", "authors"),
        ("constant 0.4", "constant:0.4"), ("constant 0.8", "constant:0.8"), ("constant 1.0", "constant:1.0"))]
    return rows, True
  if claim == "girl":
    rows = [Condition("PISA, no GIRL training (base)", args.model, "reference"),
            Condition("PISA + GIRL", args.girl, "reference")]
    if args.girl_fixed_motion:
      rows.append(Condition("PISA + GIRL, motion modules fixed", args.girl_fixed_motion, "reference"))
    return rows, False
  if claim == "zero-shot":
    return [Condition("VideoMaker (zero-shot, one reference)", args.girl, "reference"),
            Condition("CustomCrafter (subject LoRA, paper schedule)", args.model, "token", args.lora, "paper"),
            Condition("base model, full caption", args.model, "text")], False
  raise ValueError(f"unknown claim {claim!r}")


TITLES = {"dynamic-weighting": "CustomCrafter: dynamic weighting vs constant LoRA scales (moving prompts)",
          "girl": "VideoMaker: PISA with and without GIRL training (held-out sprites, one reference)",
          "zero-shot": "A sprite never seen in training: zero-shot reference vs a subject LoRA"}
NEEDS = {"dynamic-weighting": ("lora",), "girl": ("girl",), "zero-shot": ("girl", "lora")}


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m vcjax.world.claims", description=__doc__.split("\n")[0])
  ap.add_argument("claim", choices=sorted(TITLES))
  ap.add_argument("--model", default="models/world", help="the base world model (converted folder)")
  ap.add_argument("--lora", help="a subject LoRA file (train.py's final/lora.safetensors, token beside it) for "
                  "every subject, or SUBJECT=FILE,... one per subject")
  ap.add_argument("--girl", help="the GIRL-trained model (converted folder)")
  ap.add_argument("--girl-fixed-motion", help="girl: a GIRL model trained with train_motion=False")
  ap.add_argument("--subjects", default="9", help="held-out sprite indices, comma-separated")
  ap.add_argument("--num-prompts", type=int, default=8, help="prompts per subject")
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--steps", type=int, default=25)
  ap.add_argument("--guidance-scale", type=float, default=4.0)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--probe", help="a probe folder (default: the shipped one)")
  ap.add_argument("--world-seed", type=int, default=0)
  ap.add_argument("--size", type=int, default=64, help="frame side (the world models': 64)")
  ap.add_argument("--frames", type=int, default=16)
  ap.add_argument("--out", required=True, help="OUT.json and OUT.md are written")
  ap.add_argument("--save-videos", action="store_true", help="also write each row's videos to OUT_videos/ROW/")
  args = ap.parse_args(argv)
  missing = [f"--{n.replace('_', '-')}" for n in NEEDS[args.claim] if not getattr(args, n)]
  if missing:
    ap.error(f"{args.claim} needs {' and '.join(missing)}")
  from vcjax.world import probe
  world = WorldConfig(seed=args.world_seed, size=args.size, frames=args.frames)
  subjects = [int(s) for s in args.subjects.split(",") if s.strip()]
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  try:
    if args.lora:
      lora_files(args.lora, subjects)  # a bad spelling fails before any row is sampled
    rows, moving = conditions_for(args.claim, args)
    probe_model = probe.load_probe(args.probe)
    log, pipes = (lambda s: print(s, file=sys.stderr)), {}
    folder = lambda i: os.path.join(args.out + "_videos", f"row{i}") if args.save_videos else None
    runs = [run_condition(c, world, subjects, num_prompts=args.num_prompts, seeds=seeds, steps=args.steps,
                          guidance_scale=args.guidance_scale, batch=args.batch, probe_model=probe_model,
                          moving_only=moving, log=log, pipes=pipes, save_videos=folder(i))
            for i, c in enumerate(rows)]
  except (ValueError, OSError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  settings = dict(subjects=subjects, prompts_per_subject=args.num_prompts, seeds=seeds, steps=args.steps,
                  guidance_scale=args.guidance_scale, world_seed=args.world_seed, size=args.size, frames=args.frames,
                  probe=args.probe or "shipped")
  table = markdown_table(TITLES[args.claim], runs, settings)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(dict(claim=args.claim, settings=settings, runs=runs, command=" ".join(sys.argv)), f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(table + "\n")
  print(table)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
