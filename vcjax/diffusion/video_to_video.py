"""Video-to-video (SDEdit on videos) as diffusers' `AnimateDiffVideoToVideoPipeline` does it.

  1. the input video's frames are resized to the output size (PIL Lanczos: diffusers' VaeImageProcessor
     default) and mapped to [-1, 1] (`load_init_video`);
  2. each frame is VAE-encoded to a posterior sample (diffusers' `retrieve_latents` default; or the mean) times
     the VAE's scaling factor (`encode_videos`);
  3. the full schedule of `steps` steps is truncated as diffusers' `get_timesteps`: the last
     min(int(steps * strength), steps) steps run (`start_step`), and the latents are noised to the first of them
     with the scheduler's own `add_noise` (no init_noise_sigma factor, as diffusers);
  4. the remaining steps denoise as text-to-video does (the skipped first steps leave the scheduler state
     untouched, so DPM-Solver++'s first run step is first order, as diffusers' fresh scheduler).

Random numbers (diffusers draws the posterior samples, then the noise, from one generator): the noise added in 3
is the video's initial-noise draw of text-to-video (pipeline.video_keys' first key, or `init_noise`), and the
posterior sample of video b uses `normal(fold_in(key(seed), POSTERIOR_STREAM), (F, h, w, C))`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax import compiler
from vcjax.diffusion import free_init as fi
from vcjax.diffusion.free_init import scheduler_add_noise, stream_keys
from vcjax.diffusion.schedulers import Scheduler

POSTERIOR_STREAM = 17  # fold_in index of the posterior-sample stream (pipeline.video_keys uses 0..2)
POSTERIORS = ("sample", "mean")


def start_step(steps: int, strength: float) -> int:
  """The index of the first step run: steps - min(int(steps * strength), steps) (diffusers' get_timesteps;
  every vcjax scheduler is first order in diffusers' sense, `scheduler.order == 1`)."""
  if not 0 < strength <= 1:
    raise ValueError(f"strength must be in (0, 1], got {strength!r}")
  run = min(int(steps * strength), steps)
  if run < 1:
    raise ValueError(f"strength {strength} of {steps} steps runs no step (int(steps * strength) = 0)")
  return steps - run


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """`(F, H', W', 3)` uint8 -> `(F, height, width, 3)` uint8 with PIL's Lanczos filter (diffusers' resample)."""
  from PIL import Image
  if frames.shape[1:3] == (height, width):
    return frames
  return np.stack([np.asarray(Image.fromarray(f).resize((width, height), resample=Image.LANCZOS)) for f in frames])


def to_unit_range(frames: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1]: x / 255 * 2 - 1 in float32, diffusers' pil_to_numpy + normalize."""
  return np.asarray(frames, np.float32) / np.float32(255.0) * np.float32(2) - np.float32(1)


def load_init_video(path: str, num_frames: int, height: int, width: int) -> np.ndarray:
  """The first `num_frames` frames of a video file (.mp4, .gif, ...) or frames folder, resized to height x width,
  as `(F, H, W, 3)` float32 in [-1, 1]. Raises MediaError (a ValueError) for a missing, unreadable or too short
  video."""
  from vcjax.media import MediaError, is_video, read_video_frames, video_length
  if not path or not os.path.exists(path):
    raise MediaError(f"init video not found: {path!r}")
  if os.path.isfile(path) and not is_video(path):
    raise MediaError(f"{path}: not a video file (expected .mp4, .gif, ... or a folder of frame images)")
  n = video_length(path)
  if n < num_frames:
    raise MediaError(f"{path}: has {n} frames, {num_frames} needed (set num_frames to at most {n})")
  frames = read_video_frames(path, range(num_frames))
  return to_unit_range(resize_frames(frames, height, width))


def posterior_keys(seeds):
  """`(B,)` keys of the posterior samples, each a function of its video's seed."""
  return stream_keys(seeds, POSTERIOR_STREAM)


@compiler.jit(static_argnums=(0, 4, 5))
def encode_videos(vae_def, vae_state, videos, keys, posterior: str = "sample", chunk: int | None = 16):
  """`(B, F, H, W, 3)` videos in [-1, 1] -> scaled latents `(B, F, h, w, 4)`: per video a posterior sample with
  its own key (`(B,)` keys), or the posterior mean; `chunk` frames through the encoder at a time."""
  vae = nnx.merge(vae_def, vae_state)
  if posterior == "mean":
    return vae.encode_video(videos, None, chunk_size=chunk)
  return jax.lax.map(lambda vk: vae.encode_video(vk[0][None], vk[1], chunk_size=chunk)[0], (videos, keys))


def noised_latents(scheduler: Scheduler, latents, noise, start: int):
  """Clean video latents `(B, F, h, w, C)` noised to the timestep of step `start` with the scheduler's own
  add_noise (diffusers' `scheduler.add_noise(init_latents, noise, timesteps[:1])`)."""
  t = np.asarray(scheduler.timesteps)[start]
  return scheduler_add_noise(scheduler, latents, noise, t.item())


def skip_before(start: int, steps: int, skip_steps=None) -> np.ndarray:
  """`(steps,)` bools: the steps before `start` skipped, on top of any `skip_steps` already set."""
  skip = np.arange(steps) < start
  if skip_steps is not None:
    skip = skip | np.asarray(skip_steps, bool)
  return skip


def sample_variants(run, latents, noise, noise_keys, vae, scheduler: Scheduler, seeds, *, make, init_video=None,
                    strength: float = 0.8, free_init=None, lora_scales=None, skip_steps=None):
  """VideoPipeline.generate's denoising when video-to-video or FreeInit is on.

  run(latents, scheduler, noise_keys, skip_steps=...) -> final latents: the pipeline's sample loop (pads and
  shards the batch). latents `(B, F, h, w, C)`: the text-to-video initial latents (noise times
  init_noise_sigma); noise: that noise; make(num_steps) -> a Scheduler like `scheduler` with that many steps.
  init_video: `(F, H, W, 3)` or `(B, F, H, W, 3)` in [-1, 1]; free_init: a FreeInitConfig or None.
  """
  b, steps = latents.shape[0], scheduler.num_steps
  if init_video is not None and free_init is not None:
    # diffusers re-truncates the already truncated step count at every FreeInit iteration (the steps shrink as
    # strength^k): not a schedule worth reproducing, and no other reference exists.
    raise ValueError("free_init and init_video (video-to-video) cannot be combined")
  if init_video is not None:
    start = start_step(steps, strength)
    videos = jnp.asarray(init_video, jnp.float32)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    f, h, w = latents.shape[1], latents.shape[2] * factor, latents.shape[3] * factor
    if videos.ndim == 4:
      videos = jnp.broadcast_to(videos[None], (b, *videos.shape))
    if videos.shape != (b, f, h, w, 3):
      raise ValueError(f"init_video must have shape {(f, h, w, 3)} or {(b, f, h, w, 3)}, got {videos.shape}")
    vae_def, vae_state = nnx.split(vae)
    clean = encode_videos(vae_def, vae_state, videos, posterior_keys(seeds))
    start_latents = noised_latents(scheduler, clean, noise, start)
    return run(start_latents, scheduler, noise_keys, skip_before(start, steps, skip_steps))
  fi.check_scheduler(scheduler.name)
  if free_init.use_fast_sampling and (lora_scales is not None or skip_steps is not None):
    raise ValueError("free_init use_fast_sampling changes the number of steps per iteration; a LoRA schedule "
                     "or skipped steps need a fixed one")
  return fi.sample_with_free_init(lambda x, s, k: run(x, s, k)[:b], latents, config=free_init, make=make,
                                  steps=steps, reinit_keys=fi.stream_keys(seeds, fi.FREE_INIT_STREAM),
                                  noise_keys=noise_keys)


def generate_options(cfg) -> dict:
  """sample.py's keys `init_video`, `strength` and `free_init` (configs/sample_animatediff.py) ->
  `VideoPipeline.generate` keyword arguments. Every bad value raises ValueError (MediaError for the video) before
  the model loads; free_init's fields are checked even when it is off."""
  out = {}
  strength = cfg.get("strength", 0.8)
  if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
    raise ValueError(f"strength must be in (0, 1], got {strength!r}")
  settings = cfg.get("free_init")
  if settings is not None:
    config = fi.FreeInitConfig.from_dict(settings.to_dict() if hasattr(settings, "to_dict") else settings)
    if settings.get("enabled"):
      fi.check_scheduler(cfg.scheduler.name)
      out["free_init"] = config
  if cfg.get("init_video"):
    if "free_init" in out:
      raise ValueError("free_init and init_video (video-to-video) cannot be combined")
    start_step(cfg.steps, strength)
    out["init_video"] = load_init_video(cfg.init_video, cfg.num_frames, cfg.height, cfg.width)
    out["strength"] = float(strength)
  return out
