"""Text-to-video (AnimateDiff), VideoMaker (reference image) and CustomCrafter (dynamic LoRA) sampling.

    pipe = VideoPipeline.from_pretrained("converted/")
    out = pipe.generate(["a corgi running on the beach"], seeds=[0], num_frames=16, height=512, width=512)
    out.frames  # (B, F, H, W, 3) uint8

Videos are split across every local device: each (prompt, seed) job is one batch row and the batch is
sharded over a 1-D mesh (padded to a multiple of the device count), so one device or eight give the
same videos.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vcjax import compiler
from vcjax.diffusion import long_video
from vcjax.diffusion.sampling import sample_loop
from vcjax.diffusion.schedulers import SchedulerConfig, make_scheduler
from vcjax.models.free_noise import with_extra_frames


FREE_NOISE_SCOPES = ("motion", "unet")


@dataclasses.dataclass
class VideoOutput:
  latents: np.ndarray  # (B, F, h, w, 4) final latents (before the VAE scaling is undone)
  frames: np.ndarray | None  # (B, F, H, W, 3) uint8


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh named "data" over `devices` (default: every local device)."""
  devices = list(devices if devices is not None else jax.local_devices())
  return jax.sharding.Mesh(np.array(devices), ("data",))


def to_uint8(frames) -> np.ndarray:
  """[-1, 1] floats -> uint8 with rounding."""
  return np.asarray(jnp.round(jnp.clip((frames.astype(jnp.float32) + 1) * 127.5, 0, 255)).astype(jnp.uint8))


class VideoPipeline:
  """UNet3D + VAE + CLIP text encoder + tokenizer, and the model's scheduler settings.

  scheduler_config: the model's diffusers scheduler config (a `scheduler_config.json` dict; what
  `convert/animatediff.py` writes to `scheduler/`), or None for vcjax's AnimateDiff defaults.
  """

  def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: Mapping[str, Any] | None = None):
    self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
    self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else None
    self.added_tokens: dict[str, str] = {}  # token -> the file its embedding came from (load_textual_inversion)
    # FreeNoise with scope "unet" (diffusion/context_windows.py): the UNet runs on frame windows; None: off.
    self.context_windows = None

  @classmethod
  def from_pretrained(cls, folder: str, *, dtype=None, attention=None) -> "VideoPipeline":
    """attention: the attention kernel of every model (an `AttentionConfig`, or a string such as
    "chunked" / "chunked,chunk_bytes=8388608"); None keeps the converted configs' (automatic)."""
    from vcjax import loading
    from vcjax.models.configs import reconfigure
    models = (loading.load_unet(folder, dtype=dtype), loading.load_vae(folder, dtype=dtype),
              loading.load_text_encoder(folder, dtype=dtype))
    if attention is not None:
      models = tuple(reconfigure(m, attention=attention) for m in models)
    return cls(*models, loading.load_tokenizer(folder), loading.load_scheduler_config(folder))

  def scheduler_settings(self, overrides: Mapping[str, Any] | None = None) -> SchedulerConfig:
    """The model's scheduler config with `overrides` (field -> value) on top, as diffusers'
    `DDIMScheduler.from_pretrained(model, subfolder="scheduler", **overrides)`. Fields vcjax does not
    implement raise ValueError; unknown names too."""
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(SchedulerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
      raise ValueError(f"unknown scheduler field(s) {unknown}; known: {sorted(known)}")
    base = self.scheduler_config if self.scheduler_config is not None else SchedulerConfig().to_dict()
    return SchedulerConfig.from_dict({**base, **overrides})

  @property
  def vae_scale(self) -> int:
    """Image pixels per latent pixel (8 for SD's VAE)."""
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  @property
  def max_frames(self) -> int | None:
    """The longest video the motion modules take: their positional-encoding length; None (any) with FreeNoise."""
    return None if self.free_noise is not None else self.unet.config.motion_max_seq_length

  @property
  def free_noise(self):
    """The FreeNoiseConfig in use (either scope), or None."""
    return self.unet.config.free_noise if self.unet.config.free_noise is not None else self.context_windows

  def enable_free_noise(self, context_length: int | None = 16, context_stride: int = 4,
                        weighting_scheme: str = "pyramid", noise_type: str = "shuffle_context",
                        scope: str = "motion") -> None:
    """Long videos with FreeNoise, as diffusers' `enable_free_noise` (same arguments and defaults; None
    context_length: the motion module's length). In place; keeps LoRA and attention variants.

    scope: "motion" (diffusers': windows in every motion module's attention) or "unet" (the whole UNet on
    each window, `diffusion/context_windows.py`: memory bounded by the window, not equal to diffusers)."""
    from vcjax.models.free_noise import FreeNoiseConfig, set_free_noise
    if scope not in FREE_NOISE_SCOPES:
      raise ValueError(f"free_noise.scope must be one of {FREE_NOISE_SCOPES}, got {scope!r}")
    length = context_length or self.unet.config.motion_max_seq_length
    if length > self.unet.config.motion_max_seq_length:
      raise ValueError(f"free_noise.context_length {length} exceeds the motion module's positional-encoding "
                       f"length {self.unet.config.motion_max_seq_length}")
    config = FreeNoiseConfig(length, context_stride, weighting_scheme, noise_type)
    set_free_noise(self.unet, config if scope == "motion" else None)
    self.context_windows = config if scope == "unet" else None

  def disable_free_noise(self) -> None:
    from vcjax.models.free_noise import set_free_noise
    set_free_noise(self.unet, None)
    self.context_windows = None

  def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
    """`(B, T, D)` CLIP last hidden states, T the tokenizer's length (`model_max_length`)."""
    from vcjax.models.new_tokens import expand_prompt
    from vcjax.models.tokenizer import check_length, tokenize
    check_length(self.tokenizer, self.text_encoder.config.max_position_embeddings)
    graphdef, state = nnx.split(self.text_encoder)
    prompts = [expand_prompt(self.tokenizer, p) for p in prompts]  # multi-vector tokens, as diffusers
    return _encode_text(graphdef, state, jnp.asarray(tokenize(self.tokenizer, prompts)))

  def load_lora(self, path: str, *, scale: float = 1.0, token_embedding: str | None = "") -> list[str]:
    """Attach a LoRA file (vcjax, diffusers/PEFT or kohya) to the UNet, unmerged, at a run-time scale.

    token_embedding: "" loads the `token_embedding.safetensors` beside the LoRA if there is one (train.py
    writes the subject's "<new1>" there); a path loads that file; None or "none" loads none. -> tokens added.
    """
    from vcjax.weights.lora_files import load_lora_file
    from vcjax.weights.textual_inversion import token_file_beside
    load_lora_file(self.unet, path, scale=scale)
    if token_embedding == "":
      token_embedding = token_file_beside(path)
    if not token_embedding or token_embedding == "none":
      return []
    return self.load_textual_inversion(token_embedding)

  def load_textual_inversion(self, path: str, token: str | None = None) -> list[str]:
    """Learned tokens from a file (vcjax's token_embedding.safetensors, diffusers' learned_embeds, A1111
    embeddings; `vcjax.weights.textual_inversion`) into the tokenizer and the text encoder's table.
    token renames a single-embedding file's token. -> the tokens added (name, name_1, ... if multi-vector)."""
    from vcjax.models.new_tokens import add_tokens
    from vcjax.weights.textual_inversion import read_token_embeddings
    tokens = list(add_tokens(self.tokenizer, self.text_encoder, read_token_embeddings(path, token)))
    self.added_tokens.update({t: str(path) for t in tokens})
    return tokens

  def generate(self, prompts: Sequence[str], *, seeds: Sequence[int], negative_prompt: str | Sequence[str] = "",
               num_frames: int = 16, height: int = 512, width: int = 512, steps: int = 25,
               guidance_scale: float = 7.5, scheduler: str = "ddim", eta: float = 0.0,
               scheduler_config: SchedulerConfig | None = None, reference_images=None,
               lora_scales=None, skip_steps=None, init_noise=None, reference_noise: float | None = None,
               init_video=None, strength: float = 0.8, free_init=None, decode: bool = True,
               decode_chunk: int = 4, devices=None, progress: Callable | None = None) -> VideoOutput:
    """Sample one video per (prompt, seed).

    reference_images: `(B, H, W, 3)` in [-1, 1] for VideoMaker, or None. lora_scales: `(steps,)` scale of
    the attached LoRA per step, or None. skip_steps: `(steps,)` bools, steps not applied (see
    `sampling.sample_loop`), or None. init_noise: `(B, F, h, w, 4)` initial latents (else drawn
    from each seed). scheduler_config: None for the model's (`scheduler_settings()`). reference_noise:
    VideoMaker's optional reference noising ratio (the authors' `ref_noisy_ratio`, 0.01), None for off.
    init_video: video-to-video's input, `(F, H, W, 3)` or `(B, F, H, W, 3)` in [-1, 1], denoised from
    `strength` (`diffusion/video_to_video.py`; init_noise is then the noise added to it). free_init: a
    `diffusion.free_init.FreeInitConfig` to run FreeInit's iterations, or None.
    """
    f = self.vae_scale
    if height % f or width % f:
      raise ValueError(f"height and width must be divisible by {f}, got {height}x{width}")
    if self.max_frames is not None and num_frames > self.max_frames:
      raise ValueError(f"{num_frames} frames exceed the motion module's positional-encoding length "
                       f"{self.max_frames}")
    b = len(prompts)
    if len(seeds) != b:
      raise ValueError(f"{b} prompts but {len(seeds)} seeds")
    negatives = [negative_prompt] * b if isinstance(negative_prompt, str) else list(negative_prompt)
    if scheduler_config is None:
      scheduler_config = self.scheduler_settings()
    sched = make_scheduler(scheduler, scheduler_config, steps, eta=eta)

    mesh = data_mesh(devices)
    n_dev = mesh.devices.size
    pad = (-b) % n_dev
    rows = lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x
    shard = lambda x: jax.device_put(rows(x), NamedSharding(mesh, P("data")))

    # A prompt may be a frame -> prompt dict (prompt travel): then `(B, F, T, D)` (diffusion/long_video.py).
    cond = long_video.frame_prompts(self.encode_prompts, prompts, num_frames)
    uncond = long_video.per_frame(self.encode_prompts(negatives), cond)
    init_keys, ref_keys, noise_keys = video_keys(seeds)
    shape = (num_frames, height // f, width // f, self.unet.config.in_channels)
    if self.free_noise is not None:  # FreeNoise's noise types
      init_noise = long_video.initial_noise(init_keys, shape, self.free_noise, init_noise)
    elif init_noise is None:
      init_noise = jax.vmap(lambda k: jax.random.normal(k, shape))(init_keys)
    noise = jnp.asarray(init_noise, jnp.float32)
    latents = noise * sched.init_noise_sigma
    if latents.shape != (b, *shape):
      raise ValueError(f"init_noise must have shape {(b, *shape)}, got {latents.shape}")
    reference = None
    if reference_images is not None:
      vae_def, vae_state = nnx.split(self.vae)
      reference = _encode_references(vae_def, vae_state, jnp.asarray(reference_images, jnp.float32), ref_keys)
      # The reference frame joins every FreeNoise window; with prompt travel it gets frame 0's prompt.
      cond, uncond = long_video.with_reference_frame(cond), long_video.with_reference_frame(uncond)

    graphdef, params = nnx.split(self.unet if reference is None else with_extra_frames(self.unet, 1))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    if lora_scales is not None and len(lora_scales) != steps:
      raise ValueError(f"lora_scales has {len(lora_scales)} entries for {steps} steps")

    def run(x, s, keys, skip=skip_steps):  # (b, ...) initial latents -> padded, sharded final latents
      return sample_loop(graphdef, params, shard(x), scheduler=s, cond=shard(cond),
                         uncond=shard(uncond), guidance_scale=guidance_scale,
                         reference=None if reference is None else shard(reference),
                         lora_scales=None if lora_scales is None else jnp.asarray(lora_scales, jnp.float32),
                         noise_keys=shard(keys), skip_steps=skip, progress=progress,
                         reference_noise=reference_noise, windows=self.context_windows)

    if init_video is not None or free_init is not None:  # diffusion/video_to_video.py, diffusion/free_init.py
      from vcjax.diffusion.video_to_video import sample_variants
      make = lambda n: make_scheduler(scheduler, scheduler_config, n, eta=eta)  # FreeInit's per-iteration steps
      latents = sample_variants(run, latents, noise, noise_keys, self.vae, sched, seeds, make=make,
                                init_video=init_video, strength=strength, free_init=free_init,
                                lora_scales=lora_scales, skip_steps=skip_steps)
    else:
      latents = run(latents, sched, noise_keys)
    frames = None
    if decode:  # Decoded where the latents are: each device decodes its own videos.
      vae_def, vae_params = nnx.split(self.vae)
      vae_params = jax.device_put(vae_params, NamedSharding(mesh, P()))
      frames = to_uint8(_decode(vae_def, vae_params, latents, decode_chunk)[:b])
    return VideoOutput(latents=np.asarray(latents[:b]), frames=frames)


def video_keys(seeds: Sequence[int]):
  """`(B,)` PRNG keys per video, each a function of its seed alone: (initial noise, reference posterior
  sample, per-step sampler noise — step i uses fold_in(key, i))."""
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
  return tuple(jax.vmap(lambda k, j=j: jax.random.fold_in(k, j))(keys) for j in range(3))


@compiler.jit(static_argnums=(0,))
def _encode_references(vae_def, vae_state, images, keys):
  """`(B, H, W, 3)` reference images -> `(B, 1, h, w, 4)`, each a posterior sample with its own key."""
  from vcjax.methods.videomaker import encode_reference
  vae = nnx.merge(vae_def, vae_state)
  return jnp.concatenate([encode_reference(vae, images[i:i + 1], keys[i]) for i in range(images.shape[0])])


@compiler.jit(static_argnums=(0,))
def _encode_text(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids)


@compiler.jit(static_argnums=(0, 3))
def _decode(graphdef, params, latents, chunk):
  """`(B, F, h, w, 4)` scaled latents -> `(B, F, H, W, 3)` in [-1, 1], frame chunks at a time."""
  return nnx.merge(graphdef, params).decode_video(latents, chunk_size=chunk)
