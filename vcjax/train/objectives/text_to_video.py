"""AnimateDiff's text-to-video objective: task "t2v" of train.py (eps or v prediction on video latents).

The UNet3D (spatial layers and motion modules; a fresh one has zero-initialised motion proj_out, so it
starts as an image model) is trained from scratch (config.unet: an architecture) or further (config.model:
a converted folder); the VAE is always frozen (from config.model). The text encoder is either frozen
(AnimateDiff, SD) or trained jointly with the UNet (`train_text_encoder`, as LDM trained its text
transformer; config.text_encoder builds a fresh one, sized to the tokenizer's vocabulary).

Which parameters train: `train_spatial` (every UNet parameter outside the motion modules) and
`train_motion` (the motion modules): AnimateDiff's two stages are (True, False) on images (num_frames 1)
then (False, True) on clips; joint training is (True, True).

Loss: mean squared eps error, optionally Min-SNR-gamma weighted; captions are replaced by the empty prompt
with probability `uncond_prob` (so classifier-free guidance has an unconditional branch to use).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax.diffusion import losses
from vcjax.diffusion.schedulers import SchedulerConfig, add_noise, snr, training_target
from vcjax.models.configs import reconfigure
from vcjax.models.tokenizer import check_length, load_tokenizer, tokenize
from vcjax.train.data import SyntheticSource, video_clip_loader
from vcjax.train.latents import encode
from vcjax.train.models import TrainModel, load_component
from vcjax.train.objectives.common import fresh_or_loaded, write_converted
from vcjax.train.state import count_params
from vcjax.train.task import Built, DiffusionHParams, Task


@dataclasses.dataclass(frozen=True, kw_only=True)
class T2VHParams(DiffusionHParams):
  train_spatial: bool = True
  train_motion: bool = True
  train_text_encoder: bool = False
  uncond_prob: float = 0.1
  min_snr_gamma: float = 0.0  # <= 0: plain eps MSE


def t2v_trainable(spatial: bool, motion: bool, text_encoder: bool):
  """Filter over parameter paths: unet.* outside / inside motion modules, text_encoder.*."""

  def f(path, value):
    if not isinstance(value, nnx.Param):
      return False
    names = [str(p) for p in path]
    if names[0] == "text_encoder":
      return text_encoder
    if names[0] != "unet":
      return False
    return motion if ("motion_modules" in names or "motion_module" in names) else spatial

  return f


def scheduler_json(sched: SchedulerConfig) -> dict:
  """The diffusers DDIMScheduler config a model trained with `sched`'s betas is sampled with."""
  return {"_class_name": "DDIMScheduler", "num_train_timesteps": sched.num_train_timesteps,
          "beta_start": sched.beta_start, "beta_end": sched.beta_end, "beta_schedule": sched.beta_schedule,
          "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "linspace",
          "prediction_type": sched.prediction_type}


class TextToVideoTask(Task):
  name = "t2v"
  HParams = T2VHParams

  def build(self, cfg, *, rngs: nnx.Rngs) -> Built:
    hp = self.hp
    if not cfg.model:
      raise ValueError("task t2v needs config.model: a converted folder with at least the VAE and tokenizer")
    tokenizer = load_tokenizer(cfg.get("tokenizer") or cfg.model)
    text_arch = dict(cfg.get("text_encoder") or {})
    if text_arch:  # a fresh text encoder fits the tokenizer it will read
      text_arch.setdefault("vocab_size", len(tokenizer))
      text_arch.setdefault("eos_token_id", tokenizer.eos_token_id)
    unet = fresh_or_loaded(cfg, "unet", rngs=rngs, compute_dtype=cfg.dtype)
    text_encoder = fresh_or_loaded(cfg, "text_encoder", rngs=rngs, arch=text_arch)
    vae = load_component(cfg.get("vae_model") or cfg.model, "vae", cfg.dtype)
    attention = cfg.get("attention", "auto")
    unet = reconfigure(unet, attention=attention, remat=cfg.get("remat", False))
    text_encoder = reconfigure(text_encoder, attention=attention)
    vae = reconfigure(vae, attention=attention)
    check_length(tokenizer, text_encoder.config.max_position_embeddings)
    self._empty_ids = tokenize(tokenizer, [""])[0]
    model = TrainModel(unet=unet, vae=vae, text_encoder=text_encoder)
    info = {"unet_parameters": count_params(nnx.state(unet, nnx.Param)),
            "text_encoder_parameters": count_params(nnx.state(text_encoder, nnx.Param))}
    return Built(model, t2v_trainable(hp.train_spatial, hp.train_motion, hp.train_text_encoder), tokenizer, info)

  def objective(self, model, latents, input_ids, noise, timesteps):
    """Deterministic part. latents/noise `(B, F, h, w, 4)`, input_ids `(B, T)`, timesteps `(B,)`. The
    target follows the schedule's prediction_type (eps by default)."""
    hp, sched = self.hp, self.hp.scheduler
    context = model.text_encoder(input_ids)
    if not hp.train_text_encoder:
      context = jax.lax.stop_gradient(context)
    out = model.unet(add_noise(sched, latents, noise, timesteps), timesteps, context)
    target = training_target(sched, latents, noise, timesteps)
    per = jnp.square(out.astype(jnp.float32) - target).reshape(latents.shape[0], -1).mean(-1)
    if hp.min_snr_gamma > 0:
      per = per * losses.min_snr_weight(snr(sched, timesteps), hp.min_snr_gamma, sched.prediction_type)
    return per.mean(), {}

  def loss(self, model, batch, key):
    k_vae, k_noise, k_t, k_drop = jax.random.split(key, 4)
    latents = encode(model.vae, batch["pixels"], k_vae)
    b = latents.shape[0]
    ids = jnp.asarray(batch["input_ids"])
    drop = jax.random.uniform(k_drop, (b,)) < self.hp.uncond_prob
    ids = jnp.where(drop[:, None], jnp.asarray(self._empty_ids, ids.dtype)[None], ids)
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    t = self.hp.sample_timesteps(k_t, b)
    return self.objective(model, latents, ids, noise, t)

  def data(self, cfg, tokenizer, *, batch_size: int, seed: int):
    """Captioned clips from a prepared folder (`python -m vcjax.world.export --kind t2v`); synthetic:
    random clips and two prompts (tests)."""
    if cfg.data.kind == "synthetic":
      ids = tokenize(tokenizer, ["a red circle moving left", "a blue star"])
      s, f = cfg.resolution, cfg.num_frames

      def example(rng: np.random.Generator, index: int) -> dict:
        return {"pixels": rng.uniform(-1, 1, (f, s, s, 3)).astype(np.float32), "input_ids": ids[index % 2]}

      return SyntheticSource(example, batch_size=batch_size, seed=seed, num_examples=cfg.data.num_examples)
    return video_clip_loader(cfg, tokenizer, batch_size=batch_size, seed=seed, frame_stride=1)

  def export(self, model, out: str, info: dict, cfg) -> None:
    """out/model: a converted folder (UNet, text encoder, the VAE and tokenizer of config.model, the
    training betas as a DDIM scheduler config) that VideoPipeline.from_pretrained / sample.py read. With
    config.vae_model, the VAE trained on is written in place of config.model's."""
    modules = {"unet": model.unet, "text_encoder": model.text_encoder}
    if cfg.get("vae_model"):
      modules["vae"] = model.vae
    write_converted(os.path.join(out, "model"), modules,
                    tokenizer_dir=cfg.get("tokenizer") or None, base=cfg.model,
                    scheduler=scheduler_json(self.hp.scheduler), info={"trained_by": "train.py task t2v"})
