"""The two training objectives: what is trainable, and the loss of one batch.

  * "subject" (CustomCrafter, METHODS.md §4): rank-4 LoRA on to_q/to_k/to_v of every spatial attn1 and
    attn2, plus a new text token whose embedding row is trained (the CLIP text encoder runs inside the
    step); masked L2 (or L1) eps loss with prior preservation; no gradient through the k/v of the start
    token in cross-attention.
  * "girl" (VideoMaker, §3): spatial attn1 q/k/v/out outside the motion modules (+ all motion-module
    parameters if `train_motion`), PISA with the reference as an extra last frame, the reference lightly
    noised at t' = int(0.01 t), Min-SNR-weighted eps loss + 0.1 x reference loss, condition dropout.

Each loss is split in two: `*_loss(model, batch, key, cfg)` draws every random quantity (VAE posterior
samples, noise, timesteps, dropout) and calls the deterministic `*_objective(model, ...)`, which the
gradient-parity test drives with explicit noise and timesteps.

Models live in a `TrainModel` (unet, vae, text_encoder); parameter paths start with those names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax import loading
from vcjax.diffusion import losses
from vcjax.diffusion.schedulers import SchedulerConfig, add_noise, snr
from vcjax.methods.videomaker import unet_with_reference
from vcjax.models.configs import CLIPTextConfig, UNet3DConfig, VAEConfig
from vcjax.nn.attention import set_attention
from vcjax.train import hooks
from vcjax.nn import lora
from vcjax.weights import store

TASKS = ("subject", "girl")
# LoRA targets (a regex on module paths): q/k/v of attn1 and attn2 in the spatial transformers only.
SUBJECT_LORA_TARGETS = lora.CUSTOMCRAFTER_TARGETS


class TrainModel(nnx.Module):
  """The models one objective needs, under fixed names (parameter paths unet.*, vae.*, text_encoder.*)."""

  def __init__(self, unet, vae, text_encoder):
    self.unet = unet
    self.vae = vae
    self.text_encoder = text_encoder


_CONFIGS = {"unet": UNet3DConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}


def load_component(folder: str, component: str, compute_dtype: str = "float32"):
  """A converted component with float32 parameters computing in `compute_dtype` (e.g. bfloat16)."""
  cfg = dict(store.read_config(folder)[component], dtype=compute_dtype, param_dtype="float32")
  module = loading.abstract(component, _CONFIGS[component].from_dict(cfg))
  return store.set_params(module, store.read_component(folder, component), what=f"{folder} {component}")


def load_models(folder: str, compute_dtype: str = "float32") -> TrainModel:
  """UNet and VAE compute in `compute_dtype`; the text encoder stays float32 (small, and trained rows)."""
  return TrainModel(load_component(folder, "unet", compute_dtype), load_component(folder, "vae", compute_dtype),
                    load_component(folder, "text_encoder", "float32"))


# --------------------------------------------------------------------------------------------- setup


def add_placeholder_token(tokenizer, token: str, class_word: str, text_encoder) -> tuple[int, np.ndarray]:
  """Add `token` to the tokenizer; -> (its id, initial embedding = mean of the class word's token rows).

  (Custom Diffusion requires a single-token class word; the mean is the same thing then, and defined
  for words the tokenizer splits.)
  """
  if tokenizer.add_tokens([token]) == 0 and token not in tokenizer.get_vocab():
    raise ValueError(f"could not add token {token!r} to the tokenizer")
  token_id = int(tokenizer.convert_tokens_to_ids(token))
  class_ids = tokenizer(class_word, add_special_tokens=False)["input_ids"]
  if not class_ids:
    raise ValueError(f"class word {class_word!r} tokenizes to nothing")
  table = np.asarray(text_encoder.text_model.embeddings.token_embedding.embedding[...])
  return token_id, table[np.asarray(class_ids)].mean(axis=0)


def setup_subject(model: TrainModel, cfg, tokenizer, *, rngs: nnx.Rngs):
  """Install the subject-LoRA training changes in `model` (in place). -> (trainable filter, info dict)."""
  token_id, init = add_placeholder_token(tokenizer, cfg.new_token, cfg.class_word, model.text_encoder)
  hooks.add_new_tokens(model.text_encoder, [token_id], init[None])
  lora.add_lora(model.unet, rank=cfg.lora_rank, targets=cfg.lora_targets, rngs=rngs)
  if cfg.detach_start_token:
    set_attention(model.unet, "start_token_detach")
  trainable = nnx.Any(lora.LoRAParam, nnx.PathContains("new_token_embedding"))
  return trainable, {"new_token_id": token_id}


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


def setup_girl(model: TrainModel, cfg, tokenizer, *, rngs: nnx.Rngs):
  del tokenizer, rngs
  return girl_trainable(cfg.train_motion), {}


# ---------------------------------------------------------------------------------------------- data


def latent_mask(mask, latent_hw):
  """Pixel loss mask `(B, F, H, W, 1)` -> latent mask `(B, F, h, w, 1)`: a latent pixel is valid only if
  its whole f x f pixel patch is (min-pool; Custom Diffusion likewise shrinks the valid box)."""
  b, f, hgt, wid, c = mask.shape
  h, w = latent_hw
  if hgt % h or wid % w:
    raise ValueError(f"mask {mask.shape[2:4]} is not a multiple of the latent size {latent_hw}")
  m = jnp.asarray(mask, jnp.float32).reshape(b, f, h, hgt // h, w, wid // w, c)
  return m.min(axis=(3, 5))


def encode(vae, pixels, key):
  """Frozen VAE posterior sample x scaling factor. `(B, F, H, W, 3)` -> `(B, F, h, w, 4)`."""
  return jax.lax.stop_gradient(vae.encode_video(pixels, key).astype(jnp.float32))


def _repeat_frames(x, frames: int):
  """Images as single-frame clips `(B, 1, ...)` -> static clips `(B, frames, ...)`."""
  if x is None or x.shape[1] == frames:
    return x
  if x.shape[1] != 1:
    raise ValueError(f"batch has {x.shape[1]} frames, config wants {frames}")
  return jnp.repeat(x, frames, axis=1)


# --------------------------------------------------------------------------------------------- subject


def subject_objective(model: TrainModel, latents, mask, input_ids, is_prior, noise, timesteps, cfg,
                      sched: SchedulerConfig):
  """Deterministic part of the subject loss. latents/noise `(B, F, h, w, 4)`, mask `(B, F, h, w, 1)` or
  None, input_ids `(B, T)`, is_prior `(B,)`, timesteps `(B,)` int. -> (loss, aux metrics)."""
  context = model.text_encoder(input_ids)
  noisy = add_noise(sched, latents, noise, timesteps)
  eps = model.unet(noisy, timesteps, context)
  per = losses.masked_error(eps, noise, mask, kind=cfg.loss_kind)
  total, inst, prior = losses.prior_preservation_loss(per, is_prior, cfg.prior_loss_weight)
  return total, {"loss_instance": inst, "loss_prior": prior}


def subject_loss(model: TrainModel, batch, key, cfg, sched: SchedulerConfig):
  k_vae, k_noise, k_t = jax.random.split(key, 3)
  pixels = batch["pixels"]
  latents = _repeat_frames(encode(model.vae, pixels, k_vae), cfg.num_frames)
  mask = batch.get("mask")
  if mask is not None:
    mask = _repeat_frames(latent_mask(mask, latents.shape[2:4]), cfg.num_frames)
  b = latents.shape[0]
  noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
  t = jax.random.randint(k_t, (b,), 0, sched.num_train_timesteps)
  is_prior = batch.get("is_prior", jnp.zeros((b,), jnp.float32))
  return subject_objective(model, latents, mask, batch["input_ids"], is_prior, noise, t, cfg, sched)


# ------------------------------------------------------------------------------------------------ GIRL


def condition_dropout(u, p_text: float, p_ref: float, p_both: float):
  """u `(B,)` uniform [0, 1) -> (drop_text, drop_ref) bool `(B,)`: [0, p_text) text only, then p_ref
  reference only, then p_both both."""
  drop_text_only = u < p_text
  drop_ref_only = (u >= p_text) & (u < p_text + p_ref)
  drop_both = (u >= p_text + p_ref) & (u < p_text + p_ref + p_both)
  return drop_text_only | drop_both, drop_ref_only | drop_both


def girl_objective(model: TrainModel, latents, reference, context, noise, ref_noise, timesteps, cfg,
                   sched: SchedulerConfig):
  """Deterministic part of GIRL. latents/noise `(B, F, h, w, 4)`, reference/ref_noise `(B, 1, h, w, 4)`
  (reference already dropped out where it should be), context `(B, T, D)`. -> (loss, aux)."""
  noisy = add_noise(sched, latents, noise, timesteps)
  t_ref = timesteps // cfg.remind_divisor  # int(0.01 t) for the default divisor 100
  ref_noisy = add_noise(sched, reference, ref_noise, t_ref)
  eps, eps_ref = unet_with_reference(model.unet, noisy, ref_noisy, timesteps, context, return_reference=True)
  gamma = cfg.min_snr_gamma if cfg.min_snr_gamma > 0 else None
  total, l_video, l_ref = losses.girl_loss(eps, noise, eps_ref, ref_noise, snr(sched, timesteps), gamma=gamma,
                                           ref_weight=cfg.ref_loss_weight,
                                           prediction_type=sched.prediction_type)
  return total, {"loss_video": l_video, "loss_ref": l_ref}


def girl_loss(model: TrainModel, batch, key, cfg, sched: SchedulerConfig):
  k_vae, k_ref, k_noise, k_rn, k_t, k_drop = jax.random.split(key, 6)
  latents = encode(model.vae, batch["pixels"], k_vae)
  reference = encode(model.vae, batch["reference"][:, None], k_ref)
  context = jax.lax.stop_gradient(model.text_encoder(batch["input_ids"]))
  b = latents.shape[0]
  drop_text, drop_ref = condition_dropout(jax.random.uniform(k_drop, (b,)), cfg.drop_text, cfg.drop_reference,
                                          cfg.drop_both)
  context = jnp.where(drop_text[:, None, None], 0.0, context)
  reference = jnp.where(drop_ref[:, None, None, None, None], 0.0, reference)
  noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
  ref_noise = jax.random.normal(k_rn, reference.shape, jnp.float32)
  t = jax.random.randint(k_t, (b,), 0, sched.num_train_timesteps)
  return girl_objective(model, latents, reference, context, noise, ref_noise, t, cfg, sched)


SETUP = {"subject": setup_subject, "girl": setup_girl}
LOSSES = {"subject": subject_loss, "girl": girl_loss}
