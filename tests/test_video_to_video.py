"""Video-to-video (vcjax/diffusion/video_to_video.py) against diffusers' AnimateDiffVideoToVideoPipeline on the tiny
random model, both sides given the same posterior-sample noise and the same added noise: the library at several
schedulers and strengths, then sample.py (video-to-video and FreeInit) at batch 1 and 2 with 5 frames of 32x48,
and every bad value's one-line error."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from tests.reference import rel_err, to_channels_last_video
from vcjax.diffusion import video_to_video as v2v
from vcjax.diffusion.schedulers import SchedulerConfig
from vcjax.pipeline import VideoPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES, HEIGHT, WIDTH = 5, 32, 48
LATENT = (FRAMES, HEIGHT // 8, WIDTH // 8, 4)
CLASSES = {"ddim": "DDIMScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
           "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "lcm": "LCMScheduler"}


@pytest.fixture(scope="module")
def pipe(converted):
  return VideoPipeline.from_pretrained(converted)


@pytest.fixture(scope="module")
def source_frames():
  """`(F, 40, 56, 3)` uint8 frames (not the output size: both sides resize them)."""
  rng = np.random.default_rng(0)
  base = rng.integers(0, 255, (1, 40, 56, 3))
  return np.clip(base + rng.integers(-20, 20, (FRAMES, 40, 56, 3)), 0, 255).astype(np.uint8)


def frames_folder(path, frames):
  from PIL import Image
  os.makedirs(path, exist_ok=True)
  for i, f in enumerate(frames):
    Image.fromarray(f).save(os.path.join(path, f"{i:03d}.png"))
  return str(path)


def diffusers_v2v(paths_or_pipe, scheduler: str, frames, prompts, noise, seeds, strength, steps, monkeypatch,
                  guidance_scale=7.5, negative="blurry"):
  """AnimateDiffVideoToVideoPipeline on uint8 `frames` (one copy per prompt), its posterior samples and added noise
  replaced by vcjax's (`v2v.posterior_keys(seeds)`, `noise` `(B, F, h, w, C)`). -> final latents, vcjax layout."""
  import diffusers
  import diffusers.models.autoencoders.vae as vae_module
  import diffusers.pipelines.animatediff.pipeline_animatediff_video2video as v2v_module
  from PIL import Image
  ref = paths_or_pipe
  pipe = diffusers.AnimateDiffVideoToVideoPipeline.from_pipe(ref)
  pipe.scheduler = getattr(diffusers, CLASSES[scheduler]).from_config(ref.scheduler.config)
  keys = v2v.posterior_keys(seeds)
  posterior = iter(torch.from_numpy(np.asarray(jax.random.normal(k, LATENT)).transpose(0, 3, 1, 2).copy())
                   for k in keys)
  monkeypatch.setattr(vae_module, "randn_tensor", lambda shape, **kw: next(posterior).reshape(shape))
  added = torch.from_numpy(np.ascontiguousarray(np.asarray(noise).transpose(0, 1, 4, 2, 3)))  # (B, F, C, h, w)
  monkeypatch.setattr(v2v_module, "randn_tensor", lambda shape, **kw: added.reshape(shape))
  video = [Image.fromarray(f) for f in frames]
  with torch.no_grad():
    out = pipe(video=[video] * len(prompts), prompt=prompts, negative_prompt=[negative] * len(prompts),
               height=HEIGHT, width=WIDTH, num_inference_steps=steps, strength=strength,
               guidance_scale=guidance_scale, output_type="latent").frames.numpy()
  return to_channels_last_video(out)


@pytest.mark.parametrize("scheduler,strength,steps,batch", [("ddim", 0.6, 5, 2), ("dpmsolver++", 0.75, 4, 1),
                                                            ("euler", 1.0, 3, 1), ("dpmsolver++", 0.5, 4, 2)])
def test_matches_diffusers_video_to_video(pipe, random_pipeline, source_frames, tmp_path, monkeypatch, scheduler,
                                          strength, steps, batch):
  from tests.test_sampling import diffusers_pipeline
  prompts, seeds = ["a cat surfing a wave", "a red boat"][:batch], [3, 11][:batch]
  noise = np.random.default_rng(2).standard_normal((batch, *LATENT)).astype(np.float32)
  video = v2v.load_init_video(frames_folder(tmp_path / "frames", source_frames), FRAMES, HEIGHT, WIDTH)
  got = pipe.generate(prompts, seeds=seeds, negative_prompt="blurry", num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                      steps=steps, scheduler=scheduler, scheduler_config=SchedulerConfig(), init_noise=noise,
                      init_video=video, strength=strength, decode=False, devices=jax.devices()[:1]).latents
  want = diffusers_v2v(diffusers_pipeline(random_pipeline), scheduler, source_frames, prompts, noise, seeds,
                       strength, steps, monkeypatch)
  err = rel_err(got, want)
  print(f"video-to-video {scheduler}, strength {strength}, {steps} steps, batch {batch}: rel err {err:.2e}")
  assert err <= 1e-3


@pytest.mark.parametrize("scheduler,module", [("euler_a", "scheduling_euler_ancestral_discrete"),
                                              ("lcm", "scheduling_lcm")])
def test_stochastic_schedulers_match_diffusers(pipe, random_pipeline, source_frames, tmp_path, monkeypatch,
                                               scheduler, module):
  """Euler ancestral and LCM draw noise every step: diffusers gets vcjax's (step i of video b: normal(fold_in(noise
  key b, i)), i counted in the full schedule, the skipped first steps included)."""
  import importlib
  from tests.test_sampling import diffusers_pipeline
  from vcjax.pipeline import video_keys
  prompts, seeds, steps, strength = ["a cat", "a dog"], [5, 6], 4, 0.75
  noise = np.random.default_rng(3).standard_normal((2, *LATENT)).astype(np.float32)
  video = v2v.load_init_video(frames_folder(tmp_path / "frames", source_frames), FRAMES, HEIGHT, WIDTH)
  got = pipe.generate(prompts, seeds=seeds, negative_prompt="blurry", num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                      steps=steps, scheduler=scheduler, scheduler_config=SchedulerConfig(), init_noise=noise,
                      init_video=video, strength=strength, decode=False, devices=jax.devices()[:1]).latents
  keys = video_keys(seeds)[2]
  start = v2v.start_step(steps, strength)
  draws = iter(to_torch_video(jax.vmap(lambda k, i=i: jax.random.normal(jax.random.fold_in(k, i), LATENT))(keys))
               for i in range(start, steps))
  monkeypatch.setattr(importlib.import_module(f"diffusers.schedulers.{module}"), "randn_tensor",
                      lambda shape, **kw: next(draws).reshape(shape))
  want = diffusers_v2v(diffusers_pipeline(random_pipeline), scheduler, source_frames, prompts, noise, seeds,
                       strength, steps, monkeypatch)
  err = rel_err(got, want)
  print(f"video-to-video {scheduler}, strength {strength}, {steps} steps, batch 2: rel err {err:.2e}")
  assert err <= 1e-3


def to_torch_video(x) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3)))


def test_start_step_is_diffusers_get_timesteps():
  from diffusers import AnimateDiffVideoToVideoPipeline, DDIMScheduler
  fake = type("P", (), {"scheduler": DDIMScheduler()})()
  for steps in (1, 4, 25):
    for strength in (0.05, 0.3, 0.5, 0.8, 0.99, 1.0):
      fake.scheduler.set_timesteps(steps)
      timesteps = fake.scheduler.timesteps
      want, n = AnimateDiffVideoToVideoPipeline.get_timesteps(fake, steps, timesteps, strength, "cpu")
      if n == 0:
        with pytest.raises(ValueError, match="runs no step"):
          v2v.start_step(steps, strength)
        continue
      start = v2v.start_step(steps, strength)
      assert timesteps[start:].tolist() == want.tolist() and steps - start == n


def test_load_init_video_formats_and_errors(tmp_path, source_frames):
  from vcjax.media import MediaError, write_video
  folder = frames_folder(tmp_path / "frames", source_frames)
  got = v2v.load_init_video(folder, 3, HEIGHT, WIDTH)
  assert got.shape == (3, HEIGHT, WIDTH, 3) and got.dtype == np.float32 and -1 <= got.min() and got.max() <= 1
  for ext in (".mp4", ".gif"):
    path = write_video(str(tmp_path / f"v{ext}"), source_frames, fps=8)
    assert v2v.load_init_video(path, FRAMES, 24, 40).shape == (FRAMES, 24, 40, 3)
  with pytest.raises(MediaError, match="has 5 frames, 6 needed"):
    v2v.load_init_video(folder, 6, HEIGHT, WIDTH)
  with pytest.raises(MediaError, match="not found"):
    v2v.load_init_video(str(tmp_path / "nothing.mp4"), 2, HEIGHT, WIDTH)
  (tmp_path / "broken.mp4").write_bytes(b"not a video")
  with pytest.raises(MediaError):
    v2v.load_init_video(str(tmp_path / "broken.mp4"), 2, HEIGHT, WIDTH)
  with pytest.raises(ValueError, match="strength must be in"):
    v2v.start_step(4, 0.0)
  with pytest.raises(ValueError, match="strength must be in"):
    v2v.start_step(4, 1.5)


def test_generate_errors(pipe):
  from vcjax.diffusion.free_init import FreeInitConfig
  kw = dict(seeds=[0], num_frames=2, height=HEIGHT, width=WIDTH, steps=2, decode=False)
  with pytest.raises(ValueError, match="init_video must have shape"):
    pipe.generate(["a"], init_video=np.zeros((3, HEIGHT, WIDTH, 3), np.float32), **kw)
  with pytest.raises(ValueError, match="cannot be combined"):
    pipe.generate(["a"], init_video=np.zeros((2, HEIGHT, WIDTH, 3), np.float32), free_init=FreeInitConfig(), **kw)
  with pytest.raises(ValueError, match="does not support the euler"):
    pipe.generate(["a"], scheduler="euler", free_init=FreeInitConfig(), **kw)


# --------------------------------------------------------------------------------------------------- sample.py


def cli(tmp_path, *args):
  cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--config", os.path.join(ROOT, "configs",
                                                                                    "sample_animatediff.py"),
         f"--config.output={tmp_path / 'v.mp4'}", "--config.gif=False", "--config.compilation_cache=", *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


@pytest.mark.slow
def test_cli_video_to_video_batch_1(random_pipeline, converted, source_frames, tmp_path, monkeypatch):
  """A .gif input of another size, DDIM from the model's scheduler with the config's overrides."""
  from tests.test_sample_parity import NEGATIVE, STEPS, diffusers_pipeline, run_sample
  from vcjax.media import read_video_frames, write_video
  gif = write_video(str(tmp_path / "in.gif"), source_frames, fps=8)
  noise = np.random.default_rng(5).standard_normal((1, 4, *LATENT[:3])).astype(np.float32)
  got, sidecar, stderr = run_sample(tmp_path, "sample_animatediff.py", converted, noise, "--config.prompt=a fox",
                                    f"--config.init_video={gif}", "--config.strength=0.75", "--config.seed=4")
  assert "fork" not in stderr, stderr[-2000:]  # the video is read before JAX starts its threads
  assert sidecar["config"]["init_video"] == gif and sidecar["config"]["strength"] == 0.75
  assert sidecar["config"]["free_init"]["enabled"] is False and sidecar["config"]["free_init"]["num_iters"] == 3
  decoded = read_video_frames(gif, range(FRAMES))  # what sample.py read: the gif's palette frames
  want = diffusers_v2v(diffusers_pipeline(random_pipeline), "ddim", decoded, ["a fox"],
                       to_channels_last_video(noise), [4], 0.75, STEPS, monkeypatch, negative=NEGATIVE)
  err = rel_err(to_channels_last_video(got), want)
  print(f"sample.py video-to-video (gif, DDIM, strength 0.75) vs AnimateDiffVideoToVideoPipeline: rel err {err:.2e}")
  assert err <= 1e-3


@pytest.mark.slow
def test_cli_free_init_batch_2(random_pipeline, converted, tmp_path, monkeypatch):
  """Two videos (seeds 7 and 8), FreeInit on DPM-Solver++ with fast sampling and the Gaussian filter."""
  from tests.test_free_init import diffusers_free_init
  from tests.test_sample_parity import STEPS, diffusers_pipeline, run_sample
  from vcjax.diffusion import free_init as fi
  noise = np.random.default_rng(6).standard_normal((2, 4, *LATENT[:3])).astype(np.float32)
  got, sidecar, _ = run_sample(tmp_path, "sample_animatediff.py", converted, noise, "--config.prompt=a fox",
                               "--config.num_videos=2", "--config.seed=7", "--config.scheduler.name=dpmsolver++",
                               "--config.free_init.enabled=True", "--config.free_init.use_fast_sampling=True",
                               "--config.free_init.method=gaussian")
  assert sidecar["config"]["free_init"]["method"] == "gaussian" and sidecar["config"]["free_init"]["enabled"]
  cfg = fi.FreeInitConfig(use_fast_sampling=True, method="gaussian")
  keys = fi.stream_keys([7, 8], fi.FREE_INIT_STREAM)
  fresh = [np.asarray(fi.reinit_noise(keys, k, LATENT)) for k in range(1, cfg.num_iters)]
  ref = diffusers_pipeline(random_pipeline, "DPMSolverMultistepScheduler")
  want = diffusers_free_init(ref, cfg, ["a fox"] * 2, to_channels_last_video(noise), fresh, monkeypatch,
                             steps=STEPS)
  err = rel_err(to_channels_last_video(got), want)
  print(f"sample.py FreeInit (DPM-Solver++, fast, gaussian), 2 videos vs diffusers enable_free_init: rel err {err:.2e}")
  assert err <= 1e-3


BAD = [
    (["--config.strength=0"], "error: strength must be in (0, 1], got 0"),
    (["--config.strength=1.5"], "error: strength must be in (0, 1], got 1.5"),
    (["--config.free_init.method=box"], "error: free_init method 'box' is unknown"),
    (["--config.free_init.num_iters=0"], "error: free_init num_iters must be an integer >= 1, got 0"),
    (["--config.free_init.spatial_stop_frequency=2.0"], "error: free_init spatial_stop_frequency must be in [0, 1]"),
    (["--config.init_video=/nonexistent/in.mp4"], "error: init video not found: '/nonexistent/in.mp4'"),
    (["--config.init_video=BROKEN"], "error: BROKEN: cannot decode video"),
    (["--config.init_video=SHORT", "--config.num_frames=9"], "error: SHORT: has 5 frames, 9 needed"),
    (["--config.init_video=SHORT", "--config.free_init.enabled=True"], "error: free_init and init_video"),
    (["--config.free_init.enabled=True", "--config.scheduler.name=euler"], "error: free_init does not support"),
    (["--config.init_video=SHORT", "--config.steps=2", "--config.strength=0.4"], "runs no step"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", BAD)
def test_cli_errors(converted, source_frames, tmp_path, args, message):
  broken = tmp_path / "broken.mp4"
  broken.write_bytes(b"not a video")
  short = frames_folder(tmp_path / "short", source_frames)
  subs = {"BROKEN": str(broken), "SHORT": short}
  args = [a.replace("BROKEN", subs["BROKEN"]).replace("SHORT", subs["SHORT"]) for a in args]
  message = message.replace("BROKEN", subs["BROKEN"]).replace("SHORT", subs["SHORT"])
  proc = cli(tmp_path, f"--config.model={converted}", "--config.num_frames=5", "--config.height=32",
             "--config.width=48", *args)
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
