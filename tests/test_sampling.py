"""Text-to-video sampling: parity with diffusers' AnimateDiffPipeline, one compile, device invariance."""

import os

import jax
import numpy as np
import pytest
import torch

from tests.reference import rel_err, to_channels_last_video
from vcjax.diffusion import sampling
from vcjax.diffusion.schedulers import SchedulerConfig
from vcjax.pipeline import VideoPipeline

FRAMES, SIZE = 4, 64  # 8x8 latents


@pytest.fixture(scope="module")
def pipe(converted):
  return VideoPipeline.from_pretrained(converted)


def diffusers_pipeline(random_pipeline):
  from diffusers import (AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter,
                         UNet2DConditionModel)
  from transformers import CLIPTextModel, CLIPTokenizer
  base = random_pipeline["base"]
  scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
                            clip_sample=False, set_alpha_to_one=True, timestep_spacing="linspace")
  return AnimateDiffPipeline(
      vae=AutoencoderKL.from_pretrained(os.path.join(base, "vae")),
      text_encoder=CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder")),
      tokenizer=CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer")),
      unet=UNet2DConditionModel.from_pretrained(os.path.join(base, "unet")),
      motion_adapter=MotionAdapter.from_pretrained(random_pipeline["motion_diffusers"]),
      scheduler=scheduler)


def test_matches_diffusers_animatediff_pipeline(pipe, random_pipeline):
  ref = diffusers_pipeline(random_pipeline)
  noise = np.random.default_rng(0).standard_normal((1, 4, FRAMES, SIZE // 8, SIZE // 8)).astype(np.float32)
  prompt, negative = "a cat surfing a wave", "blurry"
  with torch.no_grad():
    want = ref(prompt=prompt, negative_prompt=negative, num_frames=FRAMES, height=SIZE, width=SIZE,
               num_inference_steps=25, guidance_scale=7.5, latents=torch.from_numpy(noise),
               output_type="latent").frames.numpy()
  got = pipe.generate([prompt], seeds=[0], negative_prompt=negative, num_frames=FRAMES, height=SIZE,
                      width=SIZE, steps=25, guidance_scale=7.5, init_noise=to_channels_last_video(noise),
                      scheduler_config=SchedulerConfig(timestep_spacing="linspace"), decode=False, devices=jax.devices()[:1])
  err = rel_err(got.latents, to_channels_last_video(want))
  print(f"final latents vs AnimateDiffPipeline (25 DDIM steps, CFG 7.5): rel err {err:.2e}")
  assert err <= 1e-3


def test_step_compiles_once(pipe, caplog):
  sampling.denoise_step.clear_cache()
  with jax.log_compiles(True), caplog.at_level("WARNING"):
    pipe.generate(["a"], seeds=[1], num_frames=2, height=SIZE, width=SIZE, steps=3, decode=False,
                  devices=jax.devices()[:1])
  compiles = [r for r in caplog.records if "Compiling jit(denoise_step)" in r.getMessage()]
  assert len(compiles) == 1


def test_eight_devices_give_the_same_videos_as_one(pipe):
  """DDIM with eta = 1 draws fresh noise every step: the strictest case for device invariance."""
  assert len(jax.devices()) == 8
  prompts = [f"prompt {i}" for i in range(6)]  # 6 jobs on 8 devices: padding is exercised too
  kw = dict(num_frames=2, height=SIZE, width=SIZE, steps=4, scheduler="ddim", eta=1.0, decode=True)
  one = pipe.generate(prompts, seeds=list(range(6)), devices=jax.devices()[:1], **kw)
  eight = pipe.generate(prompts, seeds=list(range(6)), devices=jax.devices(), **kw)
  assert rel_err(eight.latents, one.latents) <= 1e-5
  assert np.abs(eight.frames.astype(int) - one.frames.astype(int)).max() <= 1
  # A video depends on its own prompt and seed only, not on the batch it was sampled in.
  shuffled = pipe.generate(prompts[::-1], seeds=list(range(6))[::-1], devices=jax.devices(), **kw)
  assert rel_err(shuffled.latents[::-1], one.latents) <= 1e-5
  assert rel_err(one.latents[0], one.latents[1]) > 0.1


def test_skipped_step_leaves_the_latents_for_the_next_timestep(pipe):
  """CustomCrafter's released sampler ("authors" schedule, N=4, K=3): steps 0, 1 at the low scale, step 2
  never applied, step 3 at the high scale from the latents step 1 left. Checked against the same steps
  driven by hand through `denoise_step`, and against the run that skips nothing."""
  from flax import nnx

  from vcjax.methods.customcrafter.schedule import lora_scales, skipped_steps
  from vcjax.diffusion.schedulers import make_scheduler
  spec, n = "authors:3:0.4:0.8", 4
  skip = skipped_steps(spec, n)
  assert skip.tolist() == [False, False, True, False]
  noise = np.random.default_rng(3).standard_normal((1, 2, SIZE // 8, SIZE // 8, 4)).astype(np.float32)
  kw = dict(seeds=[0], num_frames=2, height=SIZE, width=SIZE, steps=n, guidance_scale=None, init_noise=noise,
            decode=False, devices=jax.devices()[:1])
  got = pipe.generate(["a"], skip_steps=skip, **kw).latents
  full = pipe.generate(["a"], **kw).latents
  sched = make_scheduler("ddim", pipe.scheduler_settings(), n)  # what generate() uses: the model's
  graphdef, params = nnx.split(pipe.unet)
  cond = pipe.encode_prompts(["a"])
  latents, state = jax.numpy.asarray(noise) * sched.init_noise_sigma, None
  state = sched.init_state(latents)
  for i in (0, 1, 3):
    latents, state, _ = sampling.denoise_step(graphdef, params, latents, state, jax.numpy.int32(i), scheduler=sched,
                                           cond=cond, uncond=cond, guidance_scale=1.0, use_cfg=False)
  err = rel_err(got, np.asarray(latents))
  print(f"skipped step vs hand-driven steps 0, 1, 3: rel err {err:.2e}; vs no skip {rel_err(got, full):.2e}")
  assert err <= 1e-6
  assert rel_err(got, full) > 1e-2
  assert lora_scales(spec, n).tolist() == pytest.approx([0.4, 0.4, 0.8, 0.8])
  with pytest.raises(ValueError, match="skip_steps has 3 entries"):
    pipe.generate(["a"], skip_steps=skip[:3], **kw)


def test_input_errors(pipe):
  with pytest.raises(ValueError, match="divisible by 8"):
    pipe.generate(["a"], seeds=[0], height=60, width=64)
  with pytest.raises(ValueError, match="positional-encoding length"):
    pipe.generate(["a"], seeds=[0], num_frames=pipe.max_frames + 1, height=64, width=64)
