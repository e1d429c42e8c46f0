"""CustomCrafter's subject-LoRA objective (METHODS.md §4): `SubjectTask`, task "subject" of train.py.

Trainable: a rank-4 LoRA on to_q/to_k/to_v of every spatial attn1 and attn2 (`LORA_TARGETS`, customcrafter/__init__.py), plus the new
token's embedding row (the CLIP text encoder runs inside the step). Loss: masked L1 (the authors' code; the
paper says L2) eps loss on static clips made from subject images, with prior preservation on class images;
no gradient through the k/v of the start token in cross-attention (the "start_token_detach" variant).

`SubjectTask.loss(model, batch, key)` draws every random quantity (VAE posterior samples, noise,
timesteps) and calls the deterministic `SubjectTask.objective(...)`, which the gradient-parity test drives
with explicit noise and timesteps.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax.diffusion import losses
from vcjax.methods.customcrafter import LORA_TARGETS
from vcjax.diffusion.schedulers import add_noise, training_target
from vcjax.models.tokenizer import tokenize
from vcjax.models.trainable_tokens import add_placeholder_token, add_trainable_tokens
from vcjax.nn import lora
from vcjax.nn.attention import set_attention
from vcjax.train.data import SyntheticSource, folder_loader
from vcjax.train.latents import encode, latent_mask, repeat_frames
from vcjax.train.models import load_for_training
from vcjax.train.task import Built, DiffusionHParams, Task

__all__ = ["LORA_TARGETS", "SubjectHParams", "SubjectTask"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SubjectHParams(DiffusionHParams):
  """The objective's settings (config keys of the same names; defaults in configs/train_common.py)."""
  new_token: str
  class_word: str
  lora_rank: int
  lora_targets: str
  detach_start_token: bool
  loss_kind: str  # "l1" (authors' code) | "l2" (paper)
  prior_loss_weight: float
  num_frames: int  # subject images are repeated into static clips of this many frames


class SubjectTask(Task):
  name = "subject"
  HParams = SubjectHParams

  def build(self, cfg, *, rngs: nnx.Rngs) -> Built:
    model, tokenizer = load_for_training(cfg)
    self.hp.check_matches_base(cfg.model, self.name)
    trainable, info = self.setup(model, tokenizer, rngs=rngs)
    return Built(model, trainable, tokenizer, info)

  def setup(self, model, tokenizer, *, rngs: nnx.Rngs):
    """Install the subject-LoRA training changes in `model` (in place). -> (trainable filter, info)."""
    hp = self.hp
    token_id, init = add_placeholder_token(tokenizer, hp.new_token, hp.class_word, model.text_encoder)
    add_trainable_tokens(model.text_encoder, [token_id], init[None])
    lora.add_lora(model.unet, rank=hp.lora_rank, targets=hp.lora_targets, rngs=rngs)
    if hp.detach_start_token:
      set_attention(model.unet, "start_token_detach")
    trainable = nnx.Any(lora.LoRAParam, nnx.PathContains("new_token_embedding"))
    return trainable, {"new_token_id": token_id}

  def objective(self, model, latents, mask, input_ids, is_prior, noise, timesteps):
    """Deterministic part of the loss. latents/noise `(B, F, h, w, 4)`, mask `(B, F, h, w, 1)` or None,
    input_ids `(B, T)`, is_prior `(B,)`, timesteps `(B,)` int. -> (loss, aux metrics)."""
    context = model.text_encoder(input_ids)
    noisy = add_noise(self.hp.scheduler, latents, noise, timesteps)
    out = model.unet(noisy, timesteps, context)  # eps or v, per the schedule's prediction_type
    target = training_target(self.hp.scheduler, latents, noise, timesteps)
    per = losses.masked_error(out, target, mask, kind=self.hp.loss_kind)
    total, inst, prior = losses.prior_preservation_loss(per, is_prior, self.hp.prior_loss_weight)
    return total, {"loss_instance": inst, "loss_prior": prior}

  def loss(self, model, batch, key):
    k_vae, k_noise, k_t = jax.random.split(key, 3)
    latents = repeat_frames(encode(model.vae, batch["pixels"], k_vae), self.hp.num_frames)
    mask = batch.get("mask")
    if mask is not None:
      mask = repeat_frames(latent_mask(mask, latents.shape[2:4]), self.hp.num_frames)
    b = latents.shape[0]
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    t = self.hp.sample_timesteps(k_t, b)
    is_prior = batch.get("is_prior", jnp.zeros((b,), jnp.float32))
    return self.objective(model, latents, mask, batch["input_ids"], is_prior, noise, t)

  def data(self, cfg, tokenizer, *, batch_size: int, seed: int):
    """Folders: prepared subject datasets (`vcjax.data.prepare subject`), augmented as the config says.
    Synthetic: random single-frame images with a random valid rectangle, alternating subject / class rows
    (prompts "a <token> <class>" / "a <class>")."""
    hp = self.hp
    if cfg.data.kind == "synthetic":
      ids = tokenize(tokenizer, [f"a {hp.new_token} {hp.class_word}", f"a {hp.class_word}"])
      s = cfg.resolution

      def example(rng: np.random.Generator, index: int) -> dict:
        mask = np.zeros((1, s, s, 1), np.float32)
        y0, x0 = rng.integers(0, s // 4, 2)
        y1, x1 = s - rng.integers(0, s // 4, 2)
        pixels = rng.uniform(-1, 1, (1, s, s, 3)).astype(np.float32)
        mask[:, y0:y1, x0:x1] = 1.0
        is_prior = index % 2 == 1
        return {"pixels": pixels, "mask": mask, "input_ids": ids[int(is_prior)], "is_prior": np.asarray(is_prior)}

      return SyntheticSource(example, batch_size=batch_size, seed=seed, num_examples=cfg.data.num_examples)
    return folder_loader(cfg, "customcrafter", tokenizer, batch_size=batch_size, seed=seed,
                         size=cfg.resolution, num_frames=hp.num_frames, placeholder=hp.new_token,
                         class_word=hp.class_word, with_prior=hp.prior_loss_weight > 0,
                         rescale=cfg.get("augment", "authors"), caption_dropout=cfg.get("caption_dropout", 0.2),
                         use_captions=cfg.get("use_captions", False))

  def export(self, model, out: str, info: dict, cfg) -> None:
    """The new token's embedding (token_embedding.safetensors: {token: (D,)}) and the LoRA, as vcjax's own
    file (sample.py --config.lora) and as diffusers / PEFT's pytorch_lora_weights.safetensors."""
    from vcjax.weights.lora_files import save_lora, save_lora_peft
    from vcjax.weights.sources import save_safetensors
    info["new_token"] = self.hp.new_token
    emb = np.asarray(model.text_encoder.text_model.embeddings.new_token_embedding[...])
    save_safetensors({self.hp.new_token: emb[0]}, os.path.join(out, "token_embedding.safetensors"))
    save_lora(model.unet, os.path.join(out, "lora.safetensors"))
    save_lora_peft(model.unet, os.path.join(out, "pytorch_lora_weights.safetensors"))
