"""One-call loaders: vcjax models from a converted folder, or from a diffusers-named state dict in memory.
Writing a converted folder is vcjax.conversion's.

    unet = vcjax.load_unet("converted/")          # UNet3D
    vae = vcjax.load_vae("converted/")            # AutoencoderKL
    text = vcjax.load_text_encoder("converted/")  # CLIPTextModel
    tok = vcjax.load_tokenizer("converted/")      # CLIP tokenizer (vcjax.models.clip_bpe.ClipBPE)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
from flax import nnx

from vcjax.models.clip_text import CLIPTextModel
from vcjax.models.configs import CLIPTextConfig, UNet3DConfig, VAEConfig
from vcjax.models.unet3d import UNet3D
from vcjax.models.vae import AutoencoderKL
from vcjax.nn.abstract import abstract_module
from vcjax.weights import keymaps, store
from vcjax.weights.errors import CheckpointError

_COMPONENTS: dict[str, tuple[type, type]] = {
    "unet": (UNet3D, UNet3DConfig),
    "vae": (AutoencoderKL, VAEConfig),
    "text_encoder": (CLIPTextModel, CLIPTextConfig),
}
# Diffusers buffers vcjax recomputes instead of loading.
_IGNORE = {"unet": [r"pos_embed\.pe$", r"pos_encoder\.pe$"], "vae": [], "text_encoder": [r"position_ids$"]}


def abstract(component: str, config) -> nnx.Module:
  """The module of `component` with shapes but no weights (nothing allocated)."""
  cls, _ = _COMPONENTS[component]
  return abstract_module(lambda rngs: cls(config, rngs=rngs))


def from_state_dict(component: str, config, state_dict, *, strict: bool = True, dtype=None) -> nnx.Module:
  """Build `component` from a diffusers-named PyTorch state dict."""
  return keymaps.load_state_dict(abstract(component, config), state_dict, strict=strict,
                                 ignore=_IGNORE[component], dtype=dtype, what=component)


def with_dtype(config, dtype):
  """`config` with its dtype and param_dtype set to `dtype` (unchanged for None)."""
  if dtype is None:
    return config
  name = jnp.dtype(dtype).name
  return type(config).from_dict(dict(config.to_dict(), dtype=name, param_dtype=name))


def _load(component: str, folder: str, dtype=None) -> nnx.Module:
  configs = store.read_config(folder)
  if component not in configs:
    raise CheckpointError(f"{folder}: the converted model has no {component}")
  _, config_cls = _COMPONENTS[component]
  config = with_dtype(config_cls.from_dict(configs[component]), dtype)
  module = abstract(component, config)
  return store.set_params(module, store.read_component(folder, component), what=f"{folder} {component}")


def load_unet(folder: str, *, dtype=None) -> UNet3D:
  """UNet3D from a converted folder: `unet(latents (B,F,H,W,C), timesteps (B,), context (B,T,D))`."""
  return _load("unet", folder, dtype)


def load_vae(folder: str, *, dtype=None) -> AutoencoderKL:
  return _load("vae", folder, dtype)


def load_text_encoder(folder: str, *, dtype=None) -> CLIPTextModel:
  return _load("text_encoder", folder, dtype)


def load_tokenizer(folder: str):
  from vcjax.models.tokenizer import load_tokenizer as _load_tokenizer
  return _load_tokenizer(os.path.join(folder, "tokenizer") if os.path.isdir(os.path.join(folder, "tokenizer"))
                         else folder)


def load_scheduler_config(folder: str) -> dict[str, Any] | None:
  """The model's diffusers scheduler config (`scheduler/scheduler_config.json`), None if it has none
  (folders converted before vcjax kept it: samplers then use vcjax's AnimateDiff defaults)."""
  path = os.path.join(folder, "scheduler", "scheduler_config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read scheduler config ({e})") from None


def read_info(folder: str) -> dict[str, Any]:
  """The converted folder's JSON config (model configs + provenance)."""
  return store.read_config(folder)
