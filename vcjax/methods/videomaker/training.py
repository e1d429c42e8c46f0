"""VideoMaker's GIRL objective (METHODS.md §3): `GirlTask`, task "girl" of train.py.

Trainable: spatial attn1 q/k/v/out outside the motion modules (+ every motion-module parameter with
`train_motion`, "Update Motion"). PISA with the reference as an extra last frame (`unet_with_reference`),
the reference lightly noised at t' = int(0.01 t), Min-SNR-weighted eps loss + 0.1 x the reference's loss,
condition dropout of text, reference or both.

`GirlTask.loss(model, batch, key)` draws every random quantity and calls the deterministic
`GirlTask.objective(...)`, which the gradient-parity test drives with explicit noise and timesteps.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax.diffusion import losses
from vcjax.diffusion.schedulers import add_noise, snr, training_target
from vcjax.methods.videomaker.reference import unet_with_reference
from vcjax.models.tokenizer import tokenize
from vcjax.train.data import SyntheticSource, video_clip_loader
from vcjax.train.latents import encode
from vcjax.train.models import load_for_training
from vcjax.train.task import Built, DiffusionHParams, Task


@dataclasses.dataclass(frozen=True, kw_only=True)
class GirlHParams(DiffusionHParams):
  """The objective's settings (config keys of the same names; defaults in configs/train_common.py)."""
  train_motion: bool
  min_snr_gamma: float  # <= 0: no Min-SNR weighting
  ref_loss_weight: float
  remind_divisor: int  # the reference is noised at t // remind_divisor
  drop_text: float
  drop_reference: float
  drop_both: float


def girl_trainable(train_motion: bool):
  """Filter: spatial attn1 params (to_q/k/v/out) outside motion modules [+ every motion-module param]."""

  def f(path, value):
    if not isinstance(value, nnx.Param):
      return False
    names = [str(p) for p in path]
    if names[0] != "unet":
      return False
    if "motion_modules" in names:
      return train_motion
    return "attentions" in names and "attn1" in names

  return f


def condition_dropout(u, p_text: float, p_ref: float, p_both: float):
  """u `(B,)` uniform [0, 1) -> (drop_text, drop_ref) bool `(B,)`: [0, p_text) text only, then p_ref
  reference only, then p_both both."""
  drop_text_only = u < p_text
  drop_ref_only = (u >= p_text) & (u < p_text + p_ref)
  drop_both = (u >= p_text + p_ref) & (u < p_text + p_ref + p_both)
  return drop_text_only | drop_both, drop_ref_only | drop_both


class GirlTask(Task):
  name = "girl"
  HParams = GirlHParams

  def build(self, cfg, *, rngs: nnx.Rngs) -> Built:
    del rngs  # nothing is initialised: GIRL fine-tunes existing weights
    model, tokenizer = load_for_training(cfg)
    self.hp.check_matches_base(cfg.model, self.name)
    return Built(model, girl_trainable(self.hp.train_motion), tokenizer, {})

  def objective(self, model, latents, reference, context, noise, ref_noise, timesteps):
    """Deterministic part of GIRL. latents/noise `(B, F, h, w, 4)`, reference/ref_noise `(B, 1, h, w, 4)`
    (reference already dropped out where it should be), context `(B, T, D)`. -> (loss, aux)."""
    hp, sched = self.hp, self.hp.scheduler
    noisy = add_noise(sched, latents, noise, timesteps)
    t_ref = timesteps // hp.remind_divisor  # int(0.01 t) for the default divisor 100
    ref_noisy = add_noise(sched, reference, ref_noise, t_ref)
    out, out_ref = unet_with_reference(model.unet, noisy, ref_noisy, timesteps, context, return_reference=True)
    gamma = hp.min_snr_gamma if hp.min_snr_gamma > 0 else None
    target = training_target(sched, latents, noise, timesteps)  # noise itself for eps prediction
    ref_target = training_target(sched, reference, ref_noise, t_ref)
    total, l_video, l_ref = losses.girl_loss(out, target, out_ref, ref_target, snr(sched, timesteps), gamma=gamma,
                                             ref_weight=hp.ref_loss_weight, prediction_type=sched.prediction_type)
    return total, {"loss_video": l_video, "loss_ref": l_ref}

  def loss(self, model, batch, key):
    hp = self.hp
    k_vae, k_ref, k_noise, k_rn, k_t, k_drop = jax.random.split(key, 6)
    latents = encode(model.vae, batch["pixels"], k_vae)
    reference = encode(model.vae, batch["reference"][:, None], k_ref)
    context = jax.lax.stop_gradient(model.text_encoder(batch["input_ids"]))
    b = latents.shape[0]
    drop_text, drop_ref = condition_dropout(jax.random.uniform(k_drop, (b,)), hp.drop_text, hp.drop_reference,
                                            hp.drop_both)
    context = jnp.where(drop_text[:, None, None], 0.0, context)
    reference = jnp.where(drop_ref[:, None, None, None, None], 0.0, reference)
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    ref_noise = jax.random.normal(k_rn, reference.shape, jnp.float32)
    t = hp.sample_timesteps(k_t, b)
    return self.objective(model, latents, reference, context, noise, ref_noise, t)

  def data(self, cfg, tokenizer, *, batch_size: int, seed: int):
    """Folders: prepared video datasets (`vcjax.data.prepare videos`, or the world's `--kind girl`) with SHP
    references; each read draws a temporal window from the clip's stored frames: frames `frame_stride`
    apart (CelebV-Text, stride 8) or, with sampling "window", evenly over `window` (VideoBooth).
    Synthetic: random clips plus a random reference image, two fixed prompts."""
    if cfg.data.kind == "synthetic":
      ids = tokenize(tokenizer, ["a video of a dog running", "a cat on a sofa"])
      s, f = cfg.resolution, cfg.num_frames

      def example(rng: np.random.Generator, index: int) -> dict:
        pixels = rng.uniform(-1, 1, (f, s, s, 3)).astype(np.float32)
        return {"pixels": pixels, "mask": np.ones((f, s, s, 1), np.float32), "input_ids": ids[index % 2],
                "reference": rng.uniform(-1, 1, (s, s, 3)).astype(np.float32)}

      return SyntheticSource(example, batch_size=batch_size, seed=seed, num_examples=cfg.data.num_examples)
    return video_clip_loader(cfg, tokenizer, batch_size=batch_size, seed=seed, frame_stride=8)

  def export(self, model, out: str, info: dict, cfg) -> None:
    """The whole UNet as a diffusers UNetMotionModel folder (what VideoMaker releases), unet_diffusers/; and
    model/: config.model's converted folder with this UNet in place of its own, which sample.py
    (configs/sample_videomaker.py --config.model=) and VideoPipeline.from_pretrained read."""
    from vcjax.train.objectives.common import write_converted
    from vcjax.weights.export import save_unet
    save_unet(model.unet, os.path.join(out, "unet_diffusers"))
    write_converted(os.path.join(out, "model"), {"unet": model.unet}, base=cfg.model,
                    info={"trained_by": "train.py task girl"})
