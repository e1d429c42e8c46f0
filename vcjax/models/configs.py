"""Architecture configs as frozen dataclasses (JSON-serialisable, hashable for jit).

Presets: SD1.5 UNet + AnimateDiff v1/v2/v3 motion modules, the SD VAE, SD1.5's CLIP ViT-L/14 text
tower, and tiny versions of each for tests. See ../shared/docs/METHODS.md §1.

Besides the architecture, a config carries how the model runs, where that is static: `attention` (the
kernel and its chunk settings, an `AttentionConfig`; a string such as "chunked" or
"chunked,chunk_bytes=8388608" is accepted) and, for the UNet, `remat` (gradient checkpointing per
resnet / spatial transformer / motion module). Configs are hashed into the graphdef, so a compiled
function's cache key includes them. Saved configs without these fields (older folders) load with the
defaults; `reconfigure` changes them on a built model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vcjax.models.free_noise import FreeNoiseConfig
from vcjax.nn.attention import AttentionConfig

# Which GroupNorm sites pool statistics across frames. "original" depends on the motion-module version.
NORM_SEMANTICS = ("original", "diffusers")


def _parse_attention(config) -> None:
  # A frozen dataclass: the field is replaced in place once, at construction (str / dict -> AttentionConfig).
  object.__setattr__(config, "attention", AttentionConfig.parse(config.attention))


def reconfigure(module, **fields):
  """`module` (UNet3D, AutoencoderKL or CLIPTextModel) rebuilt with `fields` of its config replaced and
  the same parameters, for the fields that leave the parameter tree alone (`attention`, `remat`,
  the UNet's `free_noise`). Returns
  `module` itself when nothing changes. Attention variants set on the old module are not carried over:
  reconfigure first, then set them."""
  from flax import nnx

  from vcjax.nn.abstract import abstract_module
  config = module.config
  new = dataclasses.replace(config, **fields)
  if new == config:
    return module
  rebuilt = abstract_module(lambda rngs: type(module)(new, rngs=rngs))
  nnx.update(rebuilt, nnx.state(module))
  return rebuilt


@dataclasses.dataclass(frozen=True)
class UNet3DConfig:
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock", "CrossAttnDownBlock", "CrossAttnDownBlock",
                                       "DownBlock")
  up_block_types: tuple[str, ...] = ("UpBlock", "CrossAttnUpBlock", "CrossAttnUpBlock", "CrossAttnUpBlock")
  layers_per_block: int = 2
  num_attention_heads: int | tuple[int, ...] = 8  # SD1.5's "attention_head_dim 8": a head COUNT.
  transformer_layers_per_block: int = 1
  cross_attention_dim: int = 768
  norm_num_groups: int = 32
  norm_eps: float = 1e-5  # resnets and conv_norm_out
  transformer_norm_eps: float = 1e-6  # spatial transformer GroupNorm
  use_linear_projection: bool = False  # SD1.5: 1x1 conv proj_in/out; SD2: linear
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  # AnimateDiff motion modules.
  use_motion_modules: bool = True
  motion_num_heads: int = 8
  motion_layers: int = 1  # transformer blocks per motion module
  motion_max_seq_length: int = 32  # positional-encoding length: 24 (v1) or 32 (v2, v3)
  motion_mid_block: bool = False  # v2 only
  # GroupNorm statistics per site: True pools over frames, False normalises each frame.
  resnet_norm_across_frames: bool = False
  out_norm_across_frames: bool = False  # conv_norm_out
  motion_norm_across_frames: bool = True
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  # How it runs (no effect on the parameters).
  attention: AttentionConfig = AttentionConfig()
  remat: bool = False
  # FreeNoise's sliding frame windows in the motion modules (models/free_noise.py), None: off.
  free_noise: FreeNoiseConfig | None = None

  def __post_init__(self):
    _parse_attention(self)
    object.__setattr__(self, "free_noise", FreeNoiseConfig.parse(self.free_noise))

  def heads(self, block: int) -> int:
    h = self.num_attention_heads
    return h[block] if isinstance(h, (tuple, list)) else h

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "UNet3DConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
    return cls(**d)


def norm_semantics(semantics: str, version: str) -> dict[str, bool]:
  """The three `*_norm_across_frames` flags for `original` (AnimateDiff repo) or `diffusers`.

  original: v1 (and SDXL beta) resnets and conv_norm_out pool across frames; v2/v3 use per-frame
  "inflated" norms; the motion module normalises each frame. diffusers' UNetMotionModel: every 2-D
  norm per frame, the motion module's GroupNorm across frames.
  """
  if semantics == "diffusers":
    return dict(resnet_norm_across_frames=False, out_norm_across_frames=False,
                motion_norm_across_frames=True)
  if semantics == "original":
    pooled = version in ("v1", "sdxl")
    return dict(resnet_norm_across_frames=pooled, out_norm_across_frames=pooled,
                motion_norm_across_frames=False)
  raise ValueError(f"norm semantics must be one of {NORM_SEMANTICS}, got {semantics!r}")


MOTION_VERSIONS = {
    "v1": dict(motion_max_seq_length=24, motion_mid_block=False),
    "v2": dict(motion_max_seq_length=32, motion_mid_block=True),
    "v3": dict(motion_max_seq_length=32, motion_mid_block=False),
}


def sd15_unet(version: str = "v3", semantics: str = "original", **overrides) -> UNet3DConfig:
  """SD1.5 UNet with an AnimateDiff motion module of `version` (v1, v2, v3)."""
  kw = dict(MOTION_VERSIONS[version], **norm_semantics(semantics, version))
  kw.update(overrides)
  return UNet3DConfig(**kw)


def tiny_unet(**overrides) -> UNet3DConfig:
  """A few-hundred-kB UNet3D with every kind of block, for tests."""
  kw = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock", "DownBlock"),
            up_block_types=("UpBlock", "CrossAttnUpBlock"), layers_per_block=2, num_attention_heads=2,
            cross_attention_dim=32, motion_num_heads=2, motion_max_seq_length=24)
  kw.update(overrides)
  return UNet3DConfig(**kw)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: AttentionConfig = AttentionConfig()  # the mid-block attention's kernel

  def __post_init__(self):
    _parse_attention(self)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})


def tiny_vae(**overrides) -> VAEConfig:
  return VAEConfig(**dict(dict(block_out_channels=(32, 64), layers_per_block=1), **overrides))


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: AttentionConfig = AttentionConfig()

  def __post_init__(self):
    _parse_attention(self)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPTextConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})


def tiny_clip_text(**overrides) -> CLIPTextConfig:
  return CLIPTextConfig(**dict(dict(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    eos_token_id=999), **overrides))
