"""The VAE objective: task "vae" of train.py (an AutoencoderKL trained from scratch or further).

Loss per frame: mean |x - decode(z)| (L1; sharper edges than L2 on the world's flat-coloured sprites) +
`l2_weight` x mean squared error + `subject_weight` x the L1 over the subject's pixels and a band of
`subject_dilation` pixels around them (the batch's `subject_mask`, which the world's export stores) +
`kl_weight` x KL(q(z|x) || N(0, I)) summed over latent elements and averaged over frames (LDM's
KL-regularised autoencoder without its perceptual / GAN terms: no pretrained LPIPS network can be had here,
and a 64x64 world does not need one). z is a posterior sample.

Batches are video clips (pixels `(B, F, H, W, 3)`); each step trains on `frames_per_clip` frames of each
clip drawn at random (frames of one clip are near-duplicates). At export the latent scaling factor is set
to 1 / std of the posterior means of a few batches (as SD's 0.18215 was chosen), so the UNet sees
unit-variance latents.

Why a subject term: the world's sprite covers about a tenth of a frame, so a plain L1 is spent on the
backgrounds' textures and the sprite comes back with the wrong hue (measured: colour read back correctly in
58% of clips after 5248 steps). Averaging the error over the subject's pixels alone gives the sprite the
same weight as the whole frame, whatever its size. The band around it matters as much: over the mask alone,
a sprite that bleeds its colour into a halo costs only the plain L1, and the decoder learnt exactly that
(measured: colour read back 0.90, but shapes rounded and bloated, shape 0.54; with the band, after 3000
steps: colour 1.00, shape 0.82, models/snapshots/README.md).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax.models.tokenizer import load_tokenizer
from vcjax.train.data import SyntheticSource, video_clip_loader
from vcjax.train.models import TrainModel
from vcjax.train.objectives.common import fresh_or_loaded, write_converted
from vcjax.train.state import count_params
from vcjax.train.task import Built, Task


@dataclasses.dataclass(frozen=True)
class VAEHParams:
  kl_weight: float = 1e-6
  l2_weight: float = 0.0
  subject_weight: float = 0.0
  subject_dilation: int = 3
  frames_per_clip: int = 2


def kl_divergence(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the first axis. `(N, ...)` -> `(N,)`."""
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return kl.reshape(kl.shape[0], -1).sum(-1)


def dilate(mask, pixels: int):
  """`(N, H, W, 1)` 0/1 mask grown by `pixels` in every direction (a (2p+1)^2 max filter)."""
  if pixels <= 0:
    return mask
  k = 2 * pixels + 1
  return jax.lax.reduce_window(mask, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, 1, 1, 1), "SAME")


class VAETask(Task):
  name = "vae"
  HParams = VAEHParams

  def build(self, cfg, *, rngs: nnx.Rngs) -> Built:
    vae = fresh_or_loaded(cfg, "vae", rngs=rngs, compute_dtype=cfg.dtype)
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.get("tokenizer") else None
    return Built(TrainModel(vae=vae), nnx.Param, tokenizer, {"vae_parameters": count_params(nnx.state(vae, nnx.Param))})

  def objective(self, model, frames, key, subject_mask=None):
    """frames `(N, H, W, 3)` in [-1, 1], subject_mask `(N, H, W, 1)` 0/1 or None -> (loss, aux)."""
    vae = model.vae
    mean, logvar = vae.encode(frames)
    z = vae.sample(mean, logvar, key)
    recon = vae.decode(z).astype(jnp.float32)
    err = recon - frames.astype(jnp.float32)
    l1 = jnp.abs(err).mean()
    l2 = jnp.square(err).mean()
    kl = kl_divergence(mean, logvar).mean()
    total = l1 + self.hp.l2_weight * l2 + self.hp.kl_weight * kl
    aux = {"loss_l1": l1, "loss_l2": l2, "kl": kl, "latent_std": jnp.std(mean.astype(jnp.float32))}
    if subject_mask is not None:
      m = dilate(subject_mask.astype(jnp.float32), self.hp.subject_dilation)
      # Per-pixel error averaged over channels and over the (dilated) subject's pixels; a frame without one adds 0.
      l1_subject = (jnp.abs(err) * m).sum() / jnp.maximum(m.sum() * err.shape[-1], 1.0)
      total = total + self.hp.subject_weight * l1_subject
      aux["loss_l1_subject"] = l1_subject
    elif self.hp.subject_weight:
      raise ValueError("subject_weight needs batches with a subject_mask (a with_tracks dataset, e.g. the world)")
    return total, aux

  def loss(self, model, batch, key):
    k_frames, k_z = jax.random.split(key)
    pixels = batch["pixels"]
    b, f = pixels.shape[:2]
    k = min(self.hp.frames_per_clip, f)
    idx = jax.random.permutation(k_frames, f)[:k]
    frames = jnp.take(pixels, idx, axis=1).reshape(b * k, *pixels.shape[2:])
    masks = batch.get("subject_mask")
    if masks is not None:
      masks = jnp.take(masks, idx, axis=1).reshape(b * k, *masks.shape[2:])
    return self.objective(model, frames, k_z, masks)

  def data(self, cfg, tokenizer, *, batch_size: int, seed: int):
    """World (or any) video clips from a prepared folder (`python -m vcjax.world.export --kind t2v`);
    synthetic: smooth random blobs, for tests."""
    if cfg.data.kind == "synthetic":
      s, f = cfg.resolution, cfg.num_frames

      def example(rng: np.random.Generator, index: int) -> dict:
        del index
        base = rng.uniform(-1, 1, (1, s // 4, s // 4, 3)).astype(np.float32)
        clip = np.repeat(np.repeat(np.repeat(base, 4, 1), 4, 2), f, 0)
        return {"pixels": clip}

      return SyntheticSource(example, batch_size=batch_size, seed=seed, num_examples=cfg.data.num_examples)
    if tokenizer is None:
      raise ValueError("task vae with data.kind 'folder' needs config.tokenizer (the loader tokenizes captions)")
    return video_clip_loader(cfg, tokenizer, batch_size=batch_size, seed=seed, frame_stride=1)

  def export(self, model, out: str, info: dict, cfg) -> None:
    """out/model: a converted folder holding the VAE (scaling factor measured), the tokenizer of
    config.tokenizer and, if config.model is a converted folder, its other components."""
    vae = model.vae
    std = self.latent_std(vae, cfg)
    info["latent_std"] = std
    vae.config = dataclasses.replace(vae.config, scaling_factor=float(1.0 / max(std, 1e-6)))
    info["scaling_factor"] = vae.config.scaling_factor
    write_converted(os.path.join(out, "model"), {"vae": vae}, tokenizer_dir=cfg.get("tokenizer") or None,
                    base=cfg.model or None, info={"trained_by": "train.py task vae"})

  def latent_std(self, vae, cfg, batches: int = 4) -> float:
    """Std of the posterior means over `batches` batches of the training data (seed + 1)."""
    tok = load_tokenizer(cfg.tokenizer) if cfg.get("tokenizer") else None
    data = self.data(cfg, tok, batch_size=max(1, min(cfg.batch_size, 8)), seed=cfg.seed + 1)
    graphdef, state = nnx.split(vae)
    from vcjax import compiler
    encode = compiler.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)[0])
    values = []
    for _ in range(batches):
      pixels = np.asarray(next(data)["pixels"], np.float32)
      values.append(np.asarray(encode(state, pixels.reshape(-1, *pixels.shape[2:])), np.float64).ravel())
    return float(np.concatenate(values).std())
