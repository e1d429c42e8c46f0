"""sample.py as a user runs it, against diffusers: the CLI on a model of shapes no other test uses.

The model: a tiny SD + AnimateDiff v2 pipeline whose tokenizer and text encoder have 16 positions (not 77),
whose motion module is an original-format .ckpt with 4 heads (not 8; converted with --motion-heads 4), and
whose own scheduler config (DDIM, linear betas, "leading" spacing, steps_offset 0, clip_sample on,
set_alpha_to_one off) sample.py must start from, overriding four fields by name as diffusers' AnimateDiff
docs do. Videos of 5 frames at 32x48 (latents 4x6). Each case runs `sample.py` in a subprocess with the
initial noise given, and compares its final latents with diffusers' AnimateDiffPipeline (or, for VideoMaker,
the authors' denoising loop re-stated over diffusers' UNetMotionModel with the PISA processor) on the same
weights: relative L2 error <= 1e-4.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.reference import rel_err

pytestmark = pytest.mark.slow  # sample.py subprocesses against diffusers pipelines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES, HEIGHT, WIDTH, STEPS = 5, 32, 48, 4
NEGATIVE = "blurry"
# configs/sample_animatediff.py's overrides, as diffusers' AnimateDiff docs pass them to from_pretrained.
OVERRIDES = dict(clip_sample=False, timestep_spacing="linspace", beta_schedule="linear", steps_offset=1)
def run_sample(tmp_path, config: str, model: str, noise: np.ndarray, *args: str):
  """sample.py with initial latents `noise` (diffusers layout); -> (final latents, first sidecar, stderr)."""
  np.save(tmp_path / "noise.npy", noise)
  cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--config", os.path.join(ROOT, "configs", config),
         f"--config.model={model}", f"--config.height={HEIGHT}", f"--config.width={WIDTH}",
         f"--config.num_frames={FRAMES}", f"--config.steps={STEPS}", f"--config.negative_prompt={NEGATIVE}",
         f"--config.init_noise={tmp_path / 'noise.npy'}", f"--config.save_latents={tmp_path / 'final.npy'}",
         f"--config.output={tmp_path / 'v.mp4'}", "--config.gif=False", *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  sidecars = sorted(p for p in os.listdir(tmp_path) if p.endswith(".json"))
  with open(tmp_path / sidecars[0]) as f:
    return np.load(tmp_path / "final.npy"), json.load(f), proc.stderr


def diffusers_pipeline(paths, scheduler_cls="DDIMScheduler"):
  import diffusers
  from transformers import CLIPTextModel, CLIPTokenizer
  base = paths["base"]
  scheduler = getattr(diffusers, scheduler_cls).from_pretrained(base, subfolder="scheduler", **OVERRIDES)
  return diffusers.AnimateDiffPipeline(
      vae=diffusers.AutoencoderKL.from_pretrained(os.path.join(base, "vae")),
      text_encoder=CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder")),
      tokenizer=CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer")),
      unet=diffusers.UNet2DConditionModel.from_pretrained(os.path.join(base, "unet")),
      motion_adapter=diffusers.MotionAdapter.from_pretrained(paths["motion_diffusers"]),
      scheduler=scheduler)


def initial_noise(batch: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, 4, FRAMES, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


def sampler_noise(seeds) -> list[torch.Tensor]:
  """The per-step DDIM noise vcjax draws for these seeds (vcjax.pipeline.video_keys: step i of video b uses
  fold_in(noise key b, i)), in diffusers' layout, one `(B, C, F, h, w)` tensor per step."""
  import jax
  from vcjax.pipeline import video_keys
  _, _, keys = video_keys(seeds)
  shape = (FRAMES, HEIGHT // 8, WIDTH // 8, 4)
  steps = [jax.vmap(lambda k, i=i: jax.random.normal(jax.random.fold_in(k, i), shape))(keys) for i in range(STEPS)]
  return [torch.from_numpy(np.asarray(s).transpose(0, 4, 1, 2, 3).copy()) for s in steps]


def test_one_prompt_ddim_starts_from_the_models_scheduler(odd_model, tmp_path):
  noise = initial_noise(1)
  got, sidecar, stderr = run_sample(tmp_path, "sample_animatediff.py", odd_model["converted"], noise,
                                    "--config.prompt=a red fox jumping over a log")
  used = sidecar["scheduler"]
  # the model's own fields survive (set_alpha_to_one False), the four named overrides win
  assert used["set_alpha_to_one"] is False and used["timestep_spacing"] == "linspace"
  assert used["beta_schedule"] == "linear" and used["steps_offset"] == 1 and used["clip_sample"] is False
  # a quiet run: no absl INFO line about libtpu, no fork() warning from the video writer
  assert "libtpu" not in stderr and "fork" not in stderr, stderr[-2000:]
  pipe = diffusers_pipeline(odd_model)
  assert pipe.tokenizer.model_max_length == 16
  with torch.no_grad():
    want = pipe(prompt="a red fox jumping over a log", negative_prompt=NEGATIVE, num_frames=FRAMES,
                height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=7.5,
                latents=torch.from_numpy(noise), output_type="latent").frames.numpy()
  err = rel_err(got, want)
  print(f"sample.py 1 prompt, DDIM eta 0 vs AnimateDiffPipeline: rel err {err:.2e}")
  assert err <= 1e-4


def test_three_prompts_ddim_eta_1(odd_model, tmp_path, monkeypatch):
  prompts = ["a cat", "two dogs playing in the snow at night", "a boat"]
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
  noise = initial_noise(3, seed=1)
  got, _, _ = run_sample(tmp_path, "sample_animatediff.py", odd_model["converted"], noise,
                         f"--config.prompt_file={tmp_path / 'prompts.txt'}", "--config.eta=1.0",
                         "--config.seed=7")
  import diffusers.schedulers.scheduling_ddim as ddim
  steps = iter(sampler_noise([7, 7, 7]))  # each prompt's first seed
  monkeypatch.setattr(ddim, "randn_tensor", lambda shape, **kw: next(steps).reshape(shape))
  pipe = diffusers_pipeline(odd_model)
  with torch.no_grad():
    want = pipe(prompt=prompts, negative_prompt=[NEGATIVE] * 3, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                num_inference_steps=STEPS, guidance_scale=7.5, eta=1.0, latents=torch.from_numpy(noise),
                output_type="latent").frames.numpy()
  err = rel_err(got, want)
  print(f"sample.py 3 prompts, DDIM eta 1 vs AnimateDiffPipeline: rel err {err:.2e}")
  assert got.shape == (3, 4, FRAMES, HEIGHT // 8, WIDTH // 8) and err <= 1e-4


def test_dpm_solver(odd_model, tmp_path):
  noise = initial_noise(1, seed=2)
  got, sidecar, _ = run_sample(tmp_path, "sample_animatediff.py", odd_model["converted"], noise,
                               "--config.prompt=a lighthouse", "--config.scheduler.name=dpmsolver++",
                               "--config.guidance_scale=5.0")
  assert sidecar["scheduler"]["name"] == "dpmsolver++"
  pipe = diffusers_pipeline(odd_model, "DPMSolverMultistepScheduler")
  with torch.no_grad():
    want = pipe(prompt="a lighthouse", negative_prompt=NEGATIVE, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                num_inference_steps=STEPS, guidance_scale=5.0, latents=torch.from_numpy(noise),
                output_type="latent").frames.numpy()
  err = rel_err(got, want)
  print(f"sample.py DPM-Solver++ vs AnimateDiffPipeline: rel err {err:.2e}")
  assert err <= 1e-4


def test_lora_with_the_paper_schedule(odd_model, tmp_path):
  """CustomCrafter: a PEFT LoRA file, scale 0.4 for the first 2 steps then 0.8 ("paper:2"), DDIM eta 0 (the
  sample config's eta 1 is overridden: diffusers cannot be given vcjax's per-step noise through LoRA hooks
  as simply) vs diffusers' load_lora_weights + set_adapters per step."""
  import jax
  from flax import nnx
  from vcjax.loading import load_unet
  from vcjax.nn.lora import add_lora, lora_modules
  from vcjax.weights.lora_files import save_lora_peft
  unet = load_unet(odd_model["converted"])
  add_lora(unet, rank=4, rngs=nnx.Rngs(0))
  for i, m in enumerate(lora_modules(unet).values()):
    m.lora_up.set_value(0.2 * jax.random.normal(jax.random.key(i), m.lora_up.get_value().shape))
  lora = save_lora_peft(unet, str(tmp_path / "peft"))
  noise = initial_noise(1, seed=3)
  got, sidecar, _ = run_sample(tmp_path, "sample_customcrafter.py", odd_model["converted"], noise,
                               "--config.prompt=a dog", f"--config.lora={lora}", "--config.lora_schedule=paper:2",
                               "--config.eta=0.0", "--config.guidance_scale=12.0")
  assert sidecar["scheduler"]["timestep_spacing"] == "leading" and sidecar["scheduler"]["set_alpha_to_one"] is False
  import diffusers
  pipe = diffusers_pipeline(odd_model)
  pipe.scheduler = diffusers.DDIMScheduler.from_pretrained(
      odd_model["base"], subfolder="scheduler", **dict(OVERRIDES, timestep_spacing="leading"))
  pipe.load_lora_weights(lora, adapter_name="subject")
  scales = [0.4, 0.4, 0.8, 0.8]
  pipe.set_adapters(["subject"], [scales[0]])

  def next_scale(p, i, t, kwargs):
    if i + 1 < STEPS:
      p.set_adapters(["subject"], [scales[i + 1]])
    return kwargs

  with torch.no_grad():
    want = pipe(prompt="a dog", negative_prompt=NEGATIVE, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                num_inference_steps=STEPS, guidance_scale=12.0, latents=torch.from_numpy(noise),
                output_type="latent", callback_on_step_end=next_scale).frames.numpy()
  err = rel_err(got, want)
  pipe.set_adapters(["subject"], [0.8])
  with torch.no_grad():
    constant = pipe(prompt="a dog", negative_prompt=NEGATIVE, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                    num_inference_steps=STEPS, guidance_scale=12.0, latents=torch.from_numpy(noise),
                    output_type="latent").frames.numpy()
  print(f"sample.py LoRA 'paper:2' vs diffusers with per-step adapter scales: rel err {err:.2e} "
        f"(vs constant 0.8: {rel_err(got, constant):.2e})")
  assert err <= 1e-4 and rel_err(got, constant) > 1e-3


def videomaker_reference(odd_model, image: np.ndarray, noise: np.ndarray, prompt: str, *, ratio):
  """The VideoMaker authors' denoising loop (their model/pipline.py, re-stated) over diffusers'
  UNetMotionModel with the PISA processor on every spatial attn1: reference latent (posterior sample with
  vcjax's key, so both sides sample the same) appended as the last frame, CFG with a zero reference, and
  optionally the reference noised each step at int(ratio t) with the frame mean of the latents."""
  import diffusers
  import jax
  from transformers import CLIPTextModel, CLIPTokenizer
  from tests.test_pisa import install_pisa_
  from vcjax.pipeline import video_keys
  base = odd_model["base"]
  unet = diffusers.UNetMotionModel.from_unet2d(
      diffusers.UNet2DConditionModel.from_pretrained(os.path.join(base, "unet")),
      diffusers.MotionAdapter.from_pretrained(odd_model["motion_diffusers"])).eval()
  install_pisa_(unet, FRAMES)
  vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(base, "vae")).eval()
  tok = CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer"))
  text = CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder")).eval()
  sched = diffusers.DDIMScheduler.from_pretrained(base, subfolder="scheduler", **OVERRIDES)
  sched.set_timesteps(STEPS)
  with torch.no_grad():
    ids = tok([NEGATIVE, prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    embeds = text(ids)[0].repeat_interleave(FRAMES + 1, dim=0)
    dist = vae.encode(torch.from_numpy(image.transpose(2, 0, 1)[None].copy())).latent_dist
    _, ref_keys, _ = video_keys([42])
    eps = np.asarray(jax.random.normal(ref_keys[0], (1, HEIGHT // 8, WIDTH // 8, 4))).transpose(0, 3, 1, 2)
    ref = ((dist.mean + dist.std * torch.from_numpy(eps.copy())) * vae.config.scaling_factor)[:, :, None]
    refs = torch.cat([torch.zeros_like(ref), ref])
    latents = torch.from_numpy(noise)
    for t in sched.timesteps:
      x = torch.cat([latents] * 2)
      if ratio is not None:
        refs = sched.add_noise(refs, x.mean(dim=2, keepdim=True), torch.tensor(int(t * ratio), dtype=torch.int))
      out = unet(torch.cat([x, refs], dim=2), t, encoder_hidden_states=embeds).sample
      eps_u, eps_c = out.chunk(2)
      pred = (eps_u + 8.0 * (eps_c - eps_u))[:, :, :FRAMES]
      latents = sched.step(pred, t, latents).prev_sample
  return latents.numpy()


@pytest.mark.parametrize("noised", [False, True])
def test_videomaker(odd_model, tmp_path, noised):
  from PIL import Image
  from vcjax.methods.videomaker import load_reference_image
  rng = np.random.default_rng(4)
  Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
  noise = initial_noise(1, seed=4)
  extra = ["--config.reference_noise=True"] if noised else []
  got, sidecar, _ = run_sample(tmp_path, "sample_videomaker.py", odd_model["converted"], noise,
                               "--config.prompt=a person waving", f"--config.reference={tmp_path / 'ref.png'}",
                               *extra)
  assert sidecar["seed"] == 42 and sidecar["config"]["guidance_scale"] == 8.0
  image = load_reference_image(tmp_path / "ref.png", HEIGHT, WIDTH)
  want = videomaker_reference(odd_model, image, noise, "a person waving", ratio=0.01 if noised else None)
  err = rel_err(got, want)
  print(f"sample.py VideoMaker (reference noise {noised}) vs the authors' loop over diffusers + PISA: "
        f"rel err {err:.2e}")
  assert err <= 1e-4
  if noised:  # the noising really acts
    clean = videomaker_reference(odd_model, image, noise, "a person waving", ratio=None)
    assert rel_err(got, clean) > 1e-4
