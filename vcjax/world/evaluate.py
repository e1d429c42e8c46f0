"""World metrics: how well a text-to-video model follows world prompts, read off its videos by the probe.

    python -m vcjax.world.evaluate --model DIR [--prompts FILE | --num-prompts 200 --split train] --seeds 0,1 \
        --out results.json [--steps 25 --guidance-scale 7.5 --batch 8 --save-videos DIR --negative-prompts FILE]
    python -m vcjax.world.evaluate --ground-truth --num-prompts 200 --out gt.json   # the world's own clips
    python -m vcjax.world.evaluate --ground-truth --through-vae MODEL --out ceiling.json  # ... through a VAE
    python -m vcjax.world.evaluate --videos DIR [--prompts FILE] --out results.json  # existing mp4/gif files

Each video `(F, H, W, 3)` uint8 goes through the probe (vcjax/world/probe.py; the shipped one unless
--probe DIR), frames resized to its side, and is scored against its prompt's caption (parse_caption):

  shape / pattern / colour / background accuracy   the class with the highest mean log-probability over the
                                                    frames == the caption's
  size accuracy                                     the size nearest the median predicted diameter (probe doc)
  motion accuracy                                   truth.motion_class of the predicted subject masks == the
                                                    caption's motion (the world's ground-truth rule, on masks)
  speed accuracy                                    truth.speed_class of the masks, prompts that translate only
  dynamic degree                                    truth.mean_displacement of the masks, a fraction of the side
                                                    per frame; overall and for "still" prompts, translating
                                                    ("moving") prompts and in-place ones (spin / grow / shrink)
  temporal consistency                              mean cosine similarity of consecutive frames' probe features
                                                    (the heads' hidden layers: what the subject and background
                                                    look like), 1 for a frozen video
  subject visible                                   fraction of frames with a non-empty predicted mask

Default prompts are world captions drawn deterministically from --split ("train": held-in combinations,
"heldout": the 16 unseen ones) with their own random stream ("eval"), so they are neither the probe's training
draws ("probe") nor the clips the world exports ("clip"). --ground-truth renders those captions' clips, one
per prompt: the probe's validation (tests/test_world_metrics.py requires >= 0.95 on every accuracy); with
--through-vae MODEL those clips are first encoded and decoded by MODEL's VAE: the ceiling of any model that
generates in that latent space (a VAE that loses colours caps colour accuracy, whatever the UNet learns).
--model samples len(prompts) x len(seeds) videos with vcjax.pipeline.VideoPipeline, `--batch` at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Iterable, Iterator, Sequence

import numpy as np

from vcjax.world import captions, clips, motion, truth
from vcjax.world.config import WorldConfig

ATTRIBUTES = ("colour", "shape", "pattern", "size", "background")
STREAM = "eval"


# ------------------------------------------------------------------------------------------ prompts


def world_attributes(world: WorldConfig, n: int, split: str = "train") -> list[clips.ClipAttributes]:
  return [clips.sample_attributes(world, i, split, stream=STREAM) for i in range(n)]


def world_prompts(world: WorldConfig, n: int, split: str = "train") -> list[str]:
  """The first `n` evaluation captions of `split` (deterministic in the world seed)."""
  return [captions.caption(world, a) for a in world_attributes(world, n, split)]


def read_prompts(path: str) -> list[str]:
  """A prompts file: a JSON list of strings, or text with one prompt a line (blank and # lines skipped)."""
  with open(path) as f:
    text = f.read()
  if text.lstrip().startswith("["):
    return [str(p) for p in json.loads(text)]
  return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


# ------------------------------------------------------------------------------------------ videos


def ground_truth_videos(world: WorldConfig, n: int, split: str = "train") -> Iterator[dict]:
  for a in world_attributes(world, n, split):
    clip = clips.render(world, a)
    yield dict(prompt=clip.caption, seed=None, frames=clip.frames)


def through_vae(videos: Iterable[dict], model: str, batch: int = 16) -> Iterator[dict]:
  """Each video's frames encoded (posterior mean) and decoded by the VAE of the converted folder `model`:
  scored, they are the ceiling that any model generating in that VAE's latent space can reach."""
  import jax.numpy as jnp
  from vcjax import compiler
  from vcjax.loading import load_vae
  from vcjax.pipeline import to_uint8
  vae = load_vae(model)
  roundtrip = compiler.jit(lambda x: vae.decode(vae.encode(x)[0]))
  for v in videos:
    x = v["frames"].astype(np.float32) / 127.5 - 1.0  # (F, H, W, 3) in [-1, 1]
    out = np.concatenate([np.asarray(roundtrip(jnp.asarray(x[i:i + batch]))) for i in range(0, len(x), batch)])
    yield dict(v, frames=to_uint8(out))


def generated_videos(model, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance_scale: float,
                     num_frames: int, height: int, width: int, batch: int, log=print, references=None,
                     negative_prompts: Sequence[str] | None = None, **generate_kwargs) -> Iterator[dict]:
  """Every (seed, prompt) of the model (a converted folder or a VideoPipeline), `batch` videos per generate
  call (the last call padded so that every call has the same shapes: one compiled program). references:
  one `(H, W, 3)` image in [-1, 1] per prompt (VideoMaker), or None; negative_prompts: one per prompt (the
  unconditional branch of guidance), or None for ""; generate_kwargs: further
  VideoPipeline.generate options (lora_scales, skip_steps, ...). Yields prompt, seed, frames, index (of
  the prompt) and negative_prompt when given."""
  from vcjax.pipeline import VideoPipeline
  if negative_prompts is not None and len(negative_prompts) != len(prompts):
    raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
  pipe = VideoPipeline.from_pretrained(model) if isinstance(model, (str, os.PathLike)) else model
  jobs = [(i, s) for s in seeds for i in range(len(prompts))]
  for k in range(0, len(jobs), batch):
    chunk = jobs[k:k + batch]
    padded = chunk + [chunk[-1]] * (batch - len(chunk))
    refs = None if references is None else np.stack([references[i] for i, _ in padded])
    negatives = "" if negative_prompts is None else [negative_prompts[i] for i, _ in padded]
    t = time.time()
    out = pipe.generate([prompts[i] for i, _ in padded], seeds=[s for _, s in padded], num_frames=num_frames,
                        height=height, width=width, steps=steps, guidance_scale=guidance_scale,
                        reference_images=refs, negative_prompt=negatives, **generate_kwargs)
    log(f"videos {k + len(chunk)}/{len(jobs)}  ({time.time() - t:.1f}s)")
    for (i, s), frames in zip(chunk, out.frames):
      yield dict(prompt=prompts[i], seed=s, frames=frames, index=i,
                 **({} if negative_prompts is None else {"negative_prompt": negative_prompts[i]}))


def video_files(folder: str, prompts: Sequence[str] | None = None) -> list[tuple[str, str | None, int | None]]:
  """(path, prompt, seed) of the videos in `folder`, sorted by name. The prompt and seed come from each video's
  JSON sidecar (sample.py's), or, with `prompts`, from that list in file order. A .gif beside an .mp4 of the
  same name is the same video (sample.py --gif) and is skipped."""
  from vcjax import media
  names = sorted(f for f in os.listdir(folder) if media.is_video(f) and os.path.isfile(os.path.join(folder, f)))
  stems = {os.path.splitext(f)[0] for f in names if f.lower().endswith(".mp4")}
  names = [f for f in names if not (f.lower().endswith(".gif") and os.path.splitext(f)[0] in stems)]
  if prompts is not None and len(prompts) != len(names):
    raise ValueError(f"{folder}: {len(names)} videos but {len(prompts)} prompts")
  out = []
  for i, name in enumerate(names):
    path = os.path.join(folder, name)
    prompt, seed = (prompts[i], None) if prompts is not None else (None, None)
    sidecar = os.path.splitext(path)[0] + ".json"
    if prompts is None and os.path.isfile(sidecar):
      with open(sidecar) as f:
        meta = json.load(f)
      prompt, seed = meta.get("prompt"), meta.get("seed")
    out.append((path, prompt, seed))
  return out


def file_videos(entries: Iterable[tuple[str, str | None, int | None]], errors: list) -> Iterator[dict]:
  from vcjax import media
  for path, prompt, seed in entries:
    if prompt is None:
      errors.append(f"{path}: no prompt (no JSON sidecar with a 'prompt'; pass --prompts)")
      continue
    try:
      frames = media.read_video_frames(path, range(media.video_length(path)))
    except (media.MediaError, OSError) as e:
      errors.append(f"{path}: {e}")
      continue
    yield dict(prompt=prompt, seed=seed, frames=frames, path=path)


# ------------------------------------------------------------------------------------------ scoring


def temporal_consistency(features: np.ndarray) -> float:
  """Mean cosine similarity of consecutive rows of `(F, D)` features (1.0 for fewer than 2 frames)."""
  f = np.asarray(features, np.float64)
  if len(f) < 2:
    return 1.0
  norm = np.linalg.norm(f, axis=1) + 1e-8
  return float(((f[1:] * f[:-1]).sum(1) / (norm[1:] * norm[:-1])).mean())


def score_video(probe_model, world: WorldConfig, prompt: str, frames: np.ndarray) -> dict:
  """One video against its prompt -> a row: the caption's attributes ("target"), what the probe read
  ("read"), which of them match ("correct"), dynamic degree, temporal consistency, subject visibility."""
  from vcjax.world import probe
  target = captions.parse_caption(world, prompt)
  out = probe.predict(probe_model, frames)
  read = probe.video_attributes(probe_model.config, out)
  masks = out["mask"]
  read["motion"] = truth.motion_class(masks)
  read["speed"] = truth.speed_class(masks, world.speeds)
  # A prompt that leaves the appearance to a reference or a token (captions.caption(subject=)) has no
  # pattern / colour to score here (the claims score them against the subject instead).
  correct = {k: read[k] == target[k] for k in (*ATTRIBUTES, "motion") if target[k] is not None}
  if target["speed"] is not None:
    correct["speed"] = read["speed"] == target["speed"]
  return dict(prompt=prompt, target=target, read=read, correct=correct,
              dynamic_degree=truth.mean_displacement(masks, normalize=True),
              temporal_consistency=temporal_consistency(out["features"]),
              subject_visible=float(masks.any((1, 2)).mean()), frames=int(len(frames)))


def motion_group(name: str) -> str:
  kind = motion.MOTIONS[name].kind
  return {"still": "still", "translate": "moving"}.get(kind, "in_place")


def summarize(rows: Sequence[dict]) -> dict:
  """Rows -> {metric: value} and {metric: count} (the videos each metric averages over)."""
  metrics, counts = {}, {}

  def put(name, values):
    values = [float(v) for v in values]
    metrics[name] = float(np.mean(values)) if values else None
    counts[name] = len(values)

  for k in (*ATTRIBUTES, "motion", "speed"):
    put(f"{k}_accuracy", [r["correct"][k] for r in rows if k in r["correct"]])
  put("dynamic_degree", [r["dynamic_degree"] for r in rows])
  for group in ("still", "moving", "in_place"):
    put(f"dynamic_degree_{group}", [r["dynamic_degree"] for r in rows if motion_group(r["target"]["motion"]) == group])
  put("temporal_consistency", [r["temporal_consistency"] for r in rows])
  put("subject_visible", [r["subject_visible"] for r in rows])
  return dict(metrics=metrics, counts=counts)


DEFINITIONS = {
    "*_accuracy": "fraction of videos whose probe reading equals the prompt's caption attribute (module doc)",
    "motion_accuracy": "truth.motion_class on the probe's per-frame subject masks == the caption's motion",
    "speed_accuracy": "truth.speed_class on the masks == the caption's speed; prompts that translate only",
    "dynamic_degree": "truth.mean_displacement(masks, normalize=True): mean centroid step per frame / side",
    "dynamic_degree_still|moving|in_place": "the same over prompts whose motion is still | translates | "
                                            "spins, grows or shrinks",
    "temporal_consistency": "mean cosine similarity of consecutive frames' probe features",
    "subject_visible": "fraction of frames with a non-empty predicted subject mask",
}


def format_table(result: dict) -> str:
  m, c = result["metrics"], result["counts"]
  width = max(len(k) for k in m)
  lines = [f"{'metric':<{width}}  {'value':>8}  {'videos':>6}"]
  for k in m:
    v = "-" if m[k] is None else f"{m[k]:.4f}"
    lines.append(f"{k:<{width}}  {v:>8}  {c[k]:>6}")
  lines.append(f"{result['num_videos']} videos, seeds {result['seeds']}" +
               (f", {len(result['errors'])} errors" if result["errors"] else ""))
  return "\n".join(lines)


def evaluate(videos: Iterable[dict], probe_model, world: WorldConfig, errors: list | None = None,
             save_videos: str | None = None) -> dict:
  """Score every video of `videos` (dicts with prompt, seed, frames, optional path, and optional caption:
  the world caption to score against when the prompt does not name everything, e.g. a subject given by a
  reference image or a token) -> the result dict."""
  errors = [] if errors is None else errors
  rows, seeds = [], []
  for i, v in enumerate(videos):
    if save_videos:
      v["path"] = _save(save_videos, i, v)
    try:
      row = score_video(probe_model, world, v.get("caption") or v["prompt"], v["frames"])
    except ValueError as e:  # a prompt outside the world's grammar
      errors.append(f"{v.get('path', v['prompt'])}: {e}")
      continue
    row.update(seed=v.get("seed"), **({"path": v["path"]} if "path" in v else {}))
    if v.get("caption") and v["caption"] != v["prompt"]:
      row["sampled_prompt"] = v["prompt"]
    if v.get("negative_prompt") is not None:
      row["negative_prompt"] = v["negative_prompt"]
    rows.append(row)
    if v.get("seed") is not None and v["seed"] not in seeds:
      seeds.append(v["seed"])
  result = summarize(rows)
  result.update(num_videos=len(rows), num_prompts=len({r["prompt"] for r in rows}), seeds=seeds,
                definitions=DEFINITIONS, errors=errors, videos=rows)
  return result


def _save(folder: str, i: int, video: dict) -> str:
  from vcjax import media
  path = media.write_video(os.path.join(folder, f"video_{i:04d}.mp4"), video["frames"])
  with open(os.path.splitext(path)[0] + ".json", "w") as f:
    extra = {"caption": video["caption"]} if video.get("caption") else {}  # what it was scored against
    json.dump(dict(prompt=video["prompt"], seed=video["seed"], **extra), f, indent=2)
  return path


# ------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m vcjax.world.evaluate", description=__doc__.split("\n")[0])
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--model", help="a converted model folder (VideoPipeline.from_pretrained)")
  src.add_argument("--ground-truth", action="store_true", help="score the world's own clips of the prompts")
  src.add_argument("--videos", help="a folder of mp4/gif videos (prompts from sidecars or --prompts)")
  ap.add_argument("--through-vae", metavar="MODEL",
                  help="with --ground-truth: the clips round-tripped through this converted folder's VAE first")
  ap.add_argument("--prompts", help="prompts file (JSON list or one a line) instead of drawn captions")
  ap.add_argument("--negative-prompts", help="one negative prompt a line (or a JSON list, which can hold \"\"), "
                  "aligned with the prompts (--model): guidance's unconditional branch; default \"\" for all")
  ap.add_argument("--num-prompts", type=int, default=200)
  ap.add_argument("--split", default="train", choices=("train", "heldout"))
  ap.add_argument("--seeds", default="0", help="comma-separated sampling seeds (--model)")
  ap.add_argument("--steps", type=int, default=25)
  ap.add_argument("--guidance-scale", type=float, default=7.5)
  ap.add_argument("--num-frames", type=int, default=16)
  ap.add_argument("--height", type=int, default=64)
  ap.add_argument("--width", type=int, default=64)
  ap.add_argument("--batch", type=int, default=8, help="videos per generate call (--model)")
  ap.add_argument("--save-videos", help="also write the scored videos (mp4 + JSON sidecar) here")
  ap.add_argument("--probe", help="a probe folder (python -m vcjax.world.probe); default: the shipped one")
  ap.add_argument("--world-seed", type=int, default=0)
  ap.add_argument("--out", help="results JSON")
  args = ap.parse_args(argv)

  from vcjax.world import probe
  world = WorldConfig(seed=args.world_seed)
  probe_model = probe.load_probe(args.probe)
  errors: list[str] = []
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  if args.negative_prompts and not args.model:
    ap.error("--negative-prompts goes with --model (it guides sampling)")
  if args.videos:
    prompts = read_prompts(args.prompts) if args.prompts else None
    videos = file_videos(video_files(args.videos, prompts), errors)
  elif args.ground_truth:
    if args.prompts:
      ap.error("--ground-truth renders drawn captions; --prompts is for --model / --videos")
    videos = ground_truth_videos(world, args.num_prompts, args.split)
    if args.through_vae:
      videos = through_vae(videos, args.through_vae)
  else:
    if args.through_vae:
      ap.error("--through-vae goes with --ground-truth")
    prompts = read_prompts(args.prompts) if args.prompts else world_prompts(world, args.num_prompts, args.split)
    negatives = read_prompts(args.negative_prompts) if args.negative_prompts else None
    if negatives is not None and len(negatives) != len(prompts):
      ap.error(f"--negative-prompts: {len(negatives)} lines for {len(prompts)} prompts")
    videos = generated_videos(args.model, prompts, seeds, steps=args.steps, guidance_scale=args.guidance_scale,
                              num_frames=args.num_frames, height=args.height, width=args.width, batch=args.batch,
                              log=lambda s: print(s, file=sys.stderr), negative_prompts=negatives)
  t = time.time()
  result = evaluate(videos, probe_model, world, errors, save_videos=args.save_videos)
  result.update(source=dict(model=args.model, videos=args.videos, ground_truth=args.ground_truth,
                            through_vae=args.through_vae,
                            prompts=args.prompts, negative_prompts=args.negative_prompts,
                            split=None if args.prompts or args.videos else args.split,
                            steps=args.steps if args.model else None,
                            guidance_scale=args.guidance_scale if args.model else None),
                probe=args.probe or probe.SHIPPED, seconds=round(time.time() - t, 1))
  print(format_table(result))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return 0 if result["num_videos"] else 1


if __name__ == "__main__":
  raise SystemExit(main())
