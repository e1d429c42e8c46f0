"""Sample videos with vcjax: AnimateDiff text-to-video, VideoMaker (reference image), CustomCrafter
(subject LoRA with dynamic weighting). See configs/sample_*.py for the settings of each; with no --config,
configs/sample_world.py (the world model shipped in models/world/).

    python sample.py

    python sample.py --config configs/sample_animatediff.py --config.model=converted/ \
        --config.prompt="a corgi running on the beach" --config.output=outputs/corgi.mp4
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

# Without --config: the world model shipped in models/world/ (configs/sample_world.py).
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sample_world.py")
# Defined once per process: this file is also imported (tests; `python -m vcjax.eval.protocol` shares the flag).
if "config" not in flags.FLAGS:
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "a configs/sample_*.py file", lock_config=True)


def versions() -> dict[str, str]:
  from importlib.metadata import PackageNotFoundError, version
  out = {}
  for name in ("vcjax", "jax", "jaxlib", "flax", "numpy"):
    try:
      out[name] = version(name)
    except PackageNotFoundError:
      pass
  return out


def output_paths(output: str, index: int, count: int) -> str:
  stem, ext = os.path.splitext(output)
  return f"{stem}_{index}{ext or '.mp4'}" if count > 1 else (output if ext else output + ".mp4")


def read_prompts(cfg) -> list:
  """`cfg.prompt`, or one prompt per non-empty line of `cfg.prompt_file`; a .tsv whose header names a
  "prompt" column (as ../shared/data/prompts_*.tsv) gives that column; or `cfg.prompts`, prompt travel:
  one frame -> prompt dict (JSON or "frame:prompt|frame:prompt")."""
  if cfg.get("prompts"):
    from vcjax.diffusion.long_video import check_prompts, parse_prompts
    if cfg.prompt_file:
      raise ValueError("give prompts (prompt travel) or prompt_file, not both")
    travel = parse_prompts(cfg.prompts)
    check_prompts(travel, cfg.num_frames)
    return [travel]
  if not cfg.prompt_file:
    return [cfg.prompt]
  try:
    with open(cfg.prompt_file) as f:
      rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  except OSError as e:
    raise ValueError(f"cannot read prompt file {cfg.prompt_file}: {e.strerror}") from None
  column = 0
  if cfg.prompt_file.endswith(".tsv") and rows and "prompt" in rows[0]:
    column, rows = rows[0].index("prompt"), rows[1:]
  prompts = [r[column].strip() for r in rows if len(r) > column and r[column].strip()]
  if not prompts:
    raise ValueError(f"prompt file {cfg.prompt_file} holds no prompt")
  return prompts


def run(cfg) -> list[str]:
  import jax
  import numpy as np
  from tqdm import tqdm

  from vcjax.methods.customcrafter.schedule import lora_scales, skipped_steps
  from vcjax.media import write_video
  from vcjax.pipeline import VideoPipeline

  from vcjax.compiler import use_compilation_cache
  # Before anything compiles: a repeat run loads its executables, the small ones too (each costs a compile).
  use_compilation_cache(cfg.compilation_cache, min_compile_seconds=0.0)
  if not cfg.model or not os.path.isdir(cfg.model):
    hint = ("the world model, not trained yet: its recipe is configs/world_vae.py, then configs/world_t2v.py"
            if os.path.abspath(cfg.model or ".").endswith(os.path.join("models", "world")) else
            "convert one with convert/animatediff.py")
    raise ValueError(f"model folder not found: {cfg.model!r} ({hint})")
  if cfg.height % 8 or cfg.width % 8:
    raise ValueError(f"height and width must be divisible by 8, got {cfg.height}x{cfg.width}")
  from vcjax.diffusion.video_to_video import generate_options
  variants = generate_options(cfg)  # init_video, strength, free_init: checked (and the video read) before the model
  pipe = VideoPipeline.from_pretrained(cfg.model, dtype=cfg.dtype or None, attention=cfg.get("attention") or None)
  from vcjax.diffusion.long_video import enable_from_settings
  enable_from_settings(pipe, cfg.get("free_noise") and cfg.free_noise.to_dict())  # FreeNoise: any length
  if pipe.max_frames is not None and cfg.num_frames > pipe.max_frames:
    raise ValueError(f"{cfg.num_frames} frames exceed the motion module's positional-encoding length "
                     f"{pipe.max_frames} (--config.free_noise.enabled=True samples longer videos)")
  prompts = read_prompts(cfg)
  n = cfg.num_videos * len(prompts)  # each prompt with seeds seed, seed+1, ...
  seeds = [cfg.seed + i % cfg.num_videos for i in range(n)]
  prompts = [p for p in prompts for _ in range(cfg.num_videos)]
  references = None
  if cfg.reference:
    from vcjax.methods.videomaker import load_reference_image
    image = load_reference_image(cfg.reference, cfg.height, cfg.width)
    references = np.repeat(image[None], n, axis=0)
  scales = skip = None
  if cfg.lora:  # with the learned tokens beside it (train.py's token_embedding.safetensors) or cfg.token_embedding's
    pipe.load_lora(cfg.lora, token_embedding=cfg.token_embedding)
    scales = lora_scales(cfg.lora_schedule or "constant:1.0", cfg.steps)
    skip = skipped_steps(cfg.lora_schedule or "constant:1.0", cfg.steps)  # only "authors" skips a step
    skip = skip if skip.any() else None
  elif cfg.token_embedding and cfg.token_embedding != "none":
    pipe.load_textual_inversion(cfg.token_embedding)
  init_noise = None
  if cfg.init_noise:
    init_noise = np.load(cfg.init_noise).transpose(0, 2, 3, 4, 1)  # diffusers (B, C, F, H, W) -> vcjax
  overrides = {k: v for k, v in cfg.scheduler.items() if k != "name" and v is not None}
  scheduler_config = pipe.scheduler_settings(overrides)

  start = time.time()
  out = pipe.generate(prompts, seeds=seeds, negative_prompt=cfg.negative_prompt,
                      num_frames=cfg.num_frames, height=cfg.height, width=cfg.width, steps=cfg.steps,
                      guidance_scale=cfg.guidance_scale, scheduler=cfg.scheduler.name, eta=cfg.eta,
                      scheduler_config=scheduler_config, reference_images=references, lora_scales=scales,
                      skip_steps=skip, init_noise=init_noise,
                      reference_noise=cfg.reference_noise_ratio if cfg.reference_noise else None,
                      progress=lambda it: tqdm(it, desc="denoising", unit="step"), **variants)
  seconds = time.time() - start
  if cfg.save_latents:
    np.save(cfg.save_latents, out.latents.transpose(0, 4, 1, 2, 3))
  written = []
  for i in range(n):
    path = output_paths(cfg.output, i, n)
    written.append(write_video(path, out.frames[i], fps=cfg.fps))
    if cfg.gif:
      written.append(write_video(os.path.splitext(path)[0] + ".gif", out.frames[i], fps=cfg.fps))
    travel = prompts[i] if isinstance(prompts[i], dict) else None  # prompt travel: the text stays a string
    text = prompts[i] if travel is None else " | ".join(travel[k] for k in sorted(travel))  # (for CLIP-T)
    sidecar = dict(config=cfg.to_dict(), prompt=text, seed=seeds[i], seconds=round(seconds, 2),
                   **({} if travel is None else dict(frame_prompts=travel)),
                   scheduler=dict(name=cfg.scheduler.name, **scheduler_config.to_dict()),
                   added_tokens=pipe.added_tokens, versions=versions(),
                   devices=[str(d) for d in jax.local_devices()])
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
      json.dump(sidecar, f, indent=2)
  return written


def main(argv):
  del argv
  # absl's app.run turns Python logging up to INFO; JAX then reports every backend it could not start
  # ("Unable to initialize backend 'tpu'" on a CPU machine). A plain run prints the progress bar and paths.
  logging.getLogger("jax").setLevel(logging.WARNING)
  from vcjax.media import MediaError
  from vcjax.weights.errors import CheckpointError
  try:
    for path in run(flags.FLAGS.config):
      print(path)
  except (ValueError, CheckpointError, MediaError, FileNotFoundError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
