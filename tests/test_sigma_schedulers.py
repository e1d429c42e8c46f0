"""Step-by-step parity of Euler, Euler ancestral, DPM-Solver++ 2M with Karras sigmas and LCM with diffusers
(fp32 vs fp32), with the fake model of tests/test_schedulers.py; plus one sampler run vs AnimateDiffPipeline.

Each side runs the whole loop and feeds its OWN previous sample back (so errors include propagation); the
model sees each side's scaled input (scale_input / scale_model_input). Stochastic steps get the same noise
on both sides: diffusers' randn_tensor is patched in the scheduler's module to return the noise we pass.
Tolerance: samples <= 1e-6 relative L2 at every step.
"""

import contextlib
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       LCMScheduler)

from tests.test_schedulers import SHAPE, W_T, X_INIT, _diffusers_kwargs, _record, fake_jax, rel
from vcjax.diffusion import schedulers as S
from vcjax.diffusion.lcm import lcm_timesteps

warnings.filterwarnings("ignore", category=FutureWarning)

STEPS = (4, 7, 25)


def _c(t) -> np.float32:
  return np.float32(float(t) / 1000.0)  # fractional timesteps too


def fake_torch(x, t):
  """tests/test_schedulers.py's fake model, at fractional timesteps (Euler's)."""
  return x / (1 + x.abs()) * 0.9 + float(_c(t)) * W_T


def make_diffusers(name, cfg, n):
  kw = _diffusers_kwargs(cfg)
  if name == "euler":
    d = EulerDiscreteScheduler(use_karras_sigmas=cfg.use_karras_sigmas, final_sigmas_type=cfg.final_sigmas_type,
                               **kw)
  elif name == "euler_a":
    d = EulerAncestralDiscreteScheduler(**kw)
  elif name == "dpmsolver++":
    d = DPMSolverMultistepScheduler(use_karras_sigmas=cfg.use_karras_sigmas, solver_order=cfg.solver_order,
                                    final_sigmas_type=cfg.final_sigmas_type, **kw)
  else:
    kw.pop("timestep_spacing")
    d = LCMScheduler(original_inference_steps=cfg.original_inference_steps, timestep_scaling=cfg.timestep_scaling,
                     clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_sample_range,
                     set_alpha_to_one=cfg.set_alpha_to_one, **kw)
  d.set_timesteps(n)
  return d


@contextlib.contextmanager
def fixed_noise(name, noises):
  """diffusers' randn_tensor in the scheduler's module returns noises[0], noises[1], ... in turn."""
  import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea
  import diffusers.schedulers.scheduling_lcm as lcm
  mod = {"euler_a": ea, "lcm": lcm}.get(name)
  if mod is None:
    yield
    return
  it = iter(noises)
  orig = mod.randn_tensor
  mod.randn_tensor = lambda shape, **kw: torch.from_numpy(np.array(next(it))).to(kw.get("dtype") or torch.float32)
  try:
    yield
  finally:
    mod.randn_tensor = orig


def step_noises(n, seed=1):
  r = np.random.default_rng(seed)
  return [r.standard_normal(SHAPE).astype(np.float32) for _ in range(n)]


def run(name, cfg, n):
  """Both loops; asserts each step; returns the worst relative error."""
  d = make_diffusers(name, cfg, n)
  sched = S.make_scheduler(name, cfg, n)
  # torch's vectorized float32 sqrt on CPU is not always correctly rounded (here 168 of the 1000 training
  # sigmas are one ulp from numpy's), so what diffusers derives from the sigmas -- the Karras timesteps, and
  # since diffusers 0.42 init_noise_sigma -- can be a few ulps away; the spaced timesteps are exact.
  if cfg.use_karras_sigmas:
    np.testing.assert_allclose(sched.timesteps, d.timesteps.numpy(), rtol=1e-6, atol=0)
  else:
    np.testing.assert_array_equal(sched.timesteps, d.timesteps.numpy())
  np.testing.assert_allclose(sched.init_noise_sigma, float(d.init_noise_sigma), rtol=5e-7, atol=0)  # <= 2 ulp
  if name in ("euler", "euler_a"):
    want = d.sigmas.numpy()
    got = np.concatenate([np.asarray(sched.tables.sigma), want[-1:]])
    np.testing.assert_allclose(got, want, rtol=2.5e-7, atol=0)  # torch's float32 sqrt: sometimes an ulp off
  noises = step_noises(n)
  x0 = X_INIT * np.float32(sched.init_noise_sigma)
  xt, xj = torch.from_numpy(x0.copy()), jnp.asarray(x0)
  state = sched.init_state(xj)
  worst = 0.0
  with fixed_noise(name, noises):
    for i, t in enumerate(d.timesteps):
      xt = d.step(fake_torch(d.scale_model_input(xt, t), t), t, xt).prev_sample
      eps = fake_jax(sched.scale_input(xj, i), _c(sched.timesteps[i]))
      xj, state = sched.step(state, eps, i, xj, noise=noises[i] if sched.needs_noise else None)
      err = rel(xj, xt.numpy())
      assert err <= 1e-6, (name, i, float(t), err)
      worst = max(worst, err)
  return worst


SPACINGS = S.TIMESTEP_SPACINGS


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("beta_schedule", S.BETA_SCHEDULES)
@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_euler_parity(name, beta_schedule, spacing):
  for steps_offset in (0, 1):
    cfg = S.SchedulerConfig(beta_schedule=beta_schedule, timestep_spacing=spacing, steps_offset=steps_offset)
    for n in STEPS:
      _record(f"{name} {beta_schedule} {spacing} offset={steps_offset} N={n}", run(name, cfg, n))


@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_variants(spacing):
  for kw in (dict(use_karras_sigmas=True), dict(final_sigmas_type="sigma_min"),
             dict(prediction_type="v_prediction"), dict(prediction_type="sample")):
    cfg = S.SchedulerConfig(timestep_spacing=spacing, **kw)
    for n in STEPS:
      _record(f"euler {spacing} {kw} N={n}", run("euler", cfg, n))
  cfg = S.SchedulerConfig(timestep_spacing=spacing, prediction_type="v_prediction")
  _record(f"euler_a {spacing} v_prediction N=25", run("euler_a", cfg, 25))


@pytest.mark.parametrize("beta_schedule", S.BETA_SCHEDULES)
def test_dpm_karras_parity(beta_schedule):
  for kw in ({}, dict(final_sigmas_type="sigma_min"), dict(solver_order=1), dict(prediction_type="v_prediction")):
    cfg = S.SchedulerConfig(beta_schedule=beta_schedule, use_karras_sigmas=True, **kw)
    for n in STEPS + (10, 20):
      _record(f"dpm++2m karras {beta_schedule} {kw} N={n}", run("dpmsolver++", cfg, n))


def test_lcm_parity():
  for beta_schedule in S.BETA_SCHEDULES:
    for n in (1, 2, 4, 6, 8, 25, 50):
      cfg = S.SchedulerConfig(beta_schedule=beta_schedule)
      _record(f"lcm {beta_schedule} N={n}", run("lcm", cfg, n))
  for kw in (dict(original_inference_steps=100), dict(timestep_scaling=5.0), dict(prediction_type="v_prediction"),
             dict(clip_sample=True, clip_sample_range=1.5), dict(set_alpha_to_one=False)):
    _record(f"lcm {kw} N=4", run("lcm", S.SchedulerConfig(**kw), 4))
  assert lcm_timesteps(S.SchedulerConfig(), 4).tolist() == [999, 759, 499, 259]


@pytest.mark.parametrize("name,kw,n", [("euler", {}, 25), ("euler", dict(timestep_spacing="leading"), 7),
                                       ("euler_a", {}, 25), ("euler_a", dict(timestep_spacing="trailing"), 4),
                                       ("dpmsolver++", dict(use_karras_sigmas=True), 25), ("lcm", {}, 4)])
def test_jitted_loop(name, kw, n):
  """The generic interface inside one jax.jit + lax.fori_loop (step index traced), noise from fold_in."""
  cfg = S.SchedulerConfig(**kw)
  sched = S.make_scheduler(name, cfg, n)
  c_table = np.array([_c(t) for t in sched.timesteps], np.float32)
  key = jax.random.key(3)

  @jax.jit
  def sample(sched, x):
    def body(i, carry):
      x, state, hist = carry
      eps = fake_jax(sched.scale_input(x, i), jnp.asarray(c_table)[i])
      x, state = sched.step(state, eps, i, x, jax.random.fold_in(key, i))
      return x, state, hist.at[i].set(x)
    hist = jnp.zeros((n,) + x.shape, x.dtype)
    return jax.lax.fori_loop(0, n, body, (x, sched.init_state(x), hist))[2]

  x0 = X_INIT * np.float32(sched.init_noise_sigma)
  hist = np.asarray(sample(sched, jnp.asarray(x0)))
  d = make_diffusers(name, cfg, n)
  noises = [np.array(jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32)) for i in range(n)]
  xt = torch.from_numpy(x0.copy())
  worst = 0.0
  with fixed_noise(name, noises):
    for i, t in enumerate(d.timesteps):
      xt = d.step(fake_torch(d.scale_model_input(xt, t), t), t, xt).prev_sample
      err = rel(hist[i], xt.numpy())
      assert err <= 1e-6, (i, float(t), err)
      worst = max(worst, err)
  _record(f"jit fori_loop {name} {kw} N={n}", worst)


def test_config_and_errors():
  # The new fields read from diffusers' configs; options we do not implement still fail loudly.
  for cls in (EulerDiscreteScheduler, LCMScheduler):
    c = S.SchedulerConfig.from_dict(dict(cls(beta_start=0.00085, beta_end=0.012).config))
    assert (c.use_karras_sigmas, c.original_inference_steps, c.timestep_scaling) == (False, 50, 10.0)
  assert S.SchedulerConfig.from_dict({"use_karras_sigmas": True}).use_karras_sigmas
  for bad in ({"interpolation_type": "log_linear"}, {"timestep_type": "continuous"}, {"sigma_min": 0.1},
              {"use_exponential_sigmas": True}):
    with pytest.raises(ValueError):
      S.SchedulerConfig.from_dict(bad)
  with pytest.raises(ValueError):
    S.make_scheduler("euler_a", S.SchedulerConfig(use_karras_sigmas=True), 10)
  with pytest.raises(ValueError):
    S.make_scheduler("lcm", S.SchedulerConfig(), 51)  # more than original_inference_steps
  with pytest.raises(ValueError):
    S.make_scheduler("euler", S.SchedulerConfig(), 10, eta=1.0)
  with pytest.raises(ValueError):
    S.make_scheduler("euler_a", S.SchedulerConfig(prediction_type="sample"), 10)
  with pytest.raises(ValueError):
    S.make_scheduler("lcm", S.SchedulerConfig(), 4).step((), X_INIT, 0, X_INIT)  # stochastic: noise or key
  for alias in ("euler_ancestral", "Euler-A", "EulerAncestralDiscrete"):
    assert S.make_scheduler(alias, None, 4).name == "euler_a"
  assert S.make_scheduler("ddim", None, 4).scale_input(X_INIT, 0) is X_INIT


# --------------------------------------------------------------------------------------------------
# The sampler (VideoPipeline.generate -> sampling.denoise_step) vs diffusers' AnimateDiffPipeline: the
# scaled model input, init_noise_sigma, fractional timesteps and per-video step noise all reach the UNet.

FRAMES, SIZE = 4, 64  # 8x8 latents


@pytest.fixture(scope="module")
def pipe(converted):
  from vcjax.pipeline import VideoPipeline
  return VideoPipeline.from_pretrained(converted)


def _diffusers_pipeline(random_pipeline, scheduler):
  from diffusers import AnimateDiffPipeline, AutoencoderKL, MotionAdapter, UNet2DConditionModel
  from transformers import CLIPTextModel, CLIPTokenizer
  base = random_pipeline["base"]
  return AnimateDiffPipeline(
      vae=AutoencoderKL.from_pretrained(os.path.join(base, "vae")),
      text_encoder=CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder")),
      tokenizer=CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer")),
      unet=UNet2DConditionModel.from_pretrained(os.path.join(base, "unet")),
      motion_adapter=MotionAdapter.from_pretrained(random_pipeline["motion_diffusers"]), scheduler=scheduler)


@pytest.mark.parametrize("name,steps,cfg_scale", [("euler", 10, 7.5), ("euler_a", 6, 7.5), ("lcm", 4, 1.5)])
def test_generate_matches_animatediff_pipeline(pipe, random_pipeline, name, steps, cfg_scale):
  from tests.reference import rel_err, to_channels_last_video
  from vcjax.pipeline import video_keys
  cfg = S.SchedulerConfig(timestep_spacing="linspace", steps_offset=1)
  d_sched = make_diffusers(name, cfg, steps)
  ref = _diffusers_pipeline(random_pipeline, d_sched)
  shape = (FRAMES, SIZE // 8, SIZE // 8, 4)
  noise = np.random.default_rng(0).standard_normal((1,) + shape).astype(np.float32)
  # The per-step noise vcjax draws for seed 0 (step i: fold_in(key, i)), handed to diffusers' randn_tensor.
  key = video_keys([0])[2][0]
  step_noise = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape)).transpose(3, 0, 1, 2)[None]
                for i in range(steps)]
  prompt, negative = "a cat surfing a wave", "blurry"
  with torch.no_grad(), fixed_noise(name, step_noise):
    want = ref(prompt=prompt, negative_prompt=negative, num_frames=FRAMES, height=SIZE, width=SIZE,
               num_inference_steps=steps, guidance_scale=cfg_scale,
               latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3).copy()), output_type="latent").frames.numpy()
  got = pipe.generate([prompt], seeds=[0], negative_prompt=negative, num_frames=FRAMES, height=SIZE, width=SIZE,
                      steps=steps, guidance_scale=cfg_scale, scheduler=name, init_noise=noise, scheduler_config=cfg,
                      decode=False, devices=jax.devices()[:1])
  err = rel_err(got.latents, to_channels_last_video(want))
  _record(f"generate {name} N={steps} CFG {cfg_scale} vs AnimateDiffPipeline: final latents", err)
  assert err <= 1e-4, err


# --------------------------------------------------------------------------------------------------
# AnimateLCM: its motion module (original AnimateDiff names, v2 layout with a mid block) and its kohya
# LoRA (`lora_unet_...`), both in those layouts at tiny size, converted by convert/animatediff.py and
# sampled with 4 LCM steps, vs diffusers' AnimateDiffPipeline + LCMScheduler + load_lora_weights.

LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "time_emb_proj"]


def _kohya_lora(unet_dir, path, rank=4, alpha=2.0):
  """A random LoRA on the (spatial) UNet in kohya naming, as AnimateLCM_sd15_t2v_lora.safetensors."""
  from diffusers import UNet2DConditionModel
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict
  from safetensors.numpy import save_file
  torch.manual_seed(1)
  unet = UNet2DConditionModel.from_pretrained(unet_dir)
  unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=LCM_TARGETS, init_lora_weights=False))
  sd = {k: v.detach().numpy() * np.float32(0.5) for k, v in get_peft_model_state_dict(unet).items()}
  out = {}
  for k, v in sd.items():
    mod, kind = k.rsplit(".lora_", 1)
    stem = "lora_unet_" + mod.replace(".", "_")
    out[stem + (".lora_down.weight" if kind.startswith("A") else ".lora_up.weight")] = np.ascontiguousarray(v)
    out[stem + ".alpha"] = np.asarray(alpha, np.float32)
  save_file(out, path)
  return sorted(out)


def test_animatelcm_layouts_convert_and_sample_like_diffusers(random_pipeline, tmp_path):
  import json

  from convert.animatediff import main as convert_main
  from tests.reference import rel_err, to_channels_last_video
  from vcjax.pipeline import VideoPipeline, video_keys
  keys = _kohya_lora(os.path.join(random_pipeline["base"], "unet"), str(tmp_path / "lcm_lora.safetensors"))
  assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
  assert any(k.startswith("lora_unet_mid_block_resnets_0_conv1.") for k in keys)
  mm = torch.load(random_pipeline["motion_original"], map_location="cpu", weights_only=True)["state_dict"]
  assert any(k.startswith("mid_block.motion_modules.0.temporal_transformer.") for k in mm)  # AnimateLCM's layout
  with open(os.path.join(random_pipeline["motion_diffusers"], "config.json")) as f:
    heads = json.load(f)["motion_num_attention_heads"]
  out = str(tmp_path / "animatelcm")
  assert convert_main(["--base", random_pipeline["base"], "--motion-module", random_pipeline["motion_original"],
                       "--motion-heads", str(heads), "--norm-semantics", "diffusers",
                       "--lora", f"{tmp_path / 'lcm_lora.safetensors'}:0.8", "--out", out]) == 0

  steps, cfg_scale = 4, 1.5
  cfg = S.SchedulerConfig(beta_schedule="linear")  # diffusers' AnimateLCM example: LCMScheduler, linear betas
  ref = _diffusers_pipeline(random_pipeline, make_diffusers("lcm", cfg, steps))
  ref.load_lora_weights(str(tmp_path / "lcm_lora.safetensors"), adapter_name="lcm-lora")
  ref.set_adapters(["lcm-lora"], [0.8])
  shape = (FRAMES, SIZE // 8, SIZE // 8, 4)
  noise = np.random.default_rng(2).standard_normal((1,) + shape).astype(np.float32)
  key = video_keys([0])[2][0]
  step_noise = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape)).transpose(3, 0, 1, 2)[None]
                for i in range(steps)]
  prompt = "a rocket launching"
  with torch.no_grad(), fixed_noise("lcm", step_noise):
    want = ref(prompt=prompt, negative_prompt="", num_frames=FRAMES, height=SIZE, width=SIZE,
               num_inference_steps=steps, guidance_scale=cfg_scale,
               latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3).copy()), output_type="latent").frames.numpy()
  got = VideoPipeline.from_pretrained(out).generate(
      [prompt], seeds=[0], negative_prompt="", num_frames=FRAMES, height=SIZE, width=SIZE, steps=steps,
      guidance_scale=cfg_scale, scheduler="lcm", init_noise=noise, scheduler_config=cfg, decode=False,
      devices=jax.devices()[:1])
  err = rel_err(got.latents, to_channels_last_video(want))
  _record("AnimateLCM layouts (original mm + kohya LoRA 0.8), 4 LCM steps vs diffusers: final latents", err)
  assert err <= 1e-4, err
  # The LoRA really is in there: without it diffusers' result moves well away.
  ref.set_adapters(["lcm-lora"], [0.0])
  with torch.no_grad(), fixed_noise("lcm", step_noise):
    plain = ref(prompt=prompt, negative_prompt="", num_frames=FRAMES, height=SIZE, width=SIZE,
                num_inference_steps=steps, guidance_scale=cfg_scale,
                latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3).copy()), output_type="latent").frames.numpy()
  assert rel_err(plain, want) > 1e-2
