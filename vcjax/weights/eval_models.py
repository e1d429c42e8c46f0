"""Torch-free loaders for the evaluation models: CLIP (a transformers `CLIPModel` folder), DINO (a
transformers `ViTModel` folder) and RAFT (the original `raft-things.pth`).

Every failure is a one-line CheckpointError naming the file or folder, including a folder of the wrong
kind (a ViT folder given as CLIP, a UNet given as DINO, ...).
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
from flax import nnx

from vcjax.models.clip_vision import CLIPConfig, CLIPModel
from vcjax.models.raft import RAFT, RAFTConfig, raft_state_dict
from vcjax.models.vit import ViTConfig, ViTModel
from vcjax.nn.abstract import abstract_module
from vcjax.weights import keymaps, sources
from vcjax.weights.errors import CheckpointError


def _read_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder}: no such model folder")
  if not os.path.isfile(path):
    raise CheckpointError(f"{folder}: not a transformers model folder (no config.json)")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{path}: not a JSON object")
  return config


def _check_kind(folder: str, config: dict, model_type: str, what: str) -> None:
  got = config.get("model_type") or config.get("_class_name") or "unknown"
  if got != model_type:
    raise CheckpointError(f"{folder}: config.json describes a {got!r} model, not {what} "
                          f"(model_type {model_type!r})")


def _read_weights(folder: str) -> dict[str, np.ndarray]:
  for name in sources._weight_candidates():  # the names transformers saves under, preferred first
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return sources._read_sharded(path, None) if name.endswith(".json") else sources.read_state_dict(path)
  raise CheckpointError(f"{folder}: no weights found (model.safetensors, pytorch_model.bin, ...)")


def _load(module: nnx.Module, state: Mapping[str, np.ndarray], what: str) -> nnx.Module:
  return keymaps.load_state_dict(module, state, ignore=[r"position_ids$", r"^logit_scale$", r"^pooler\."],
                                 what=what)


# ----------------------------------------------------------------------------------------------- CLIP


def clip_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers CLIPModel keys -> vcjax CLIPModel paths (the text tower sits at `text.`)."""
  out = {}
  for key, value in state.items():
    out["text." + key if key.startswith("text_model.") else key] = value
  return out


def load_clip(folder: str) -> CLIPModel:
  """vcjax CLIPModel from a transformers CLIPModel folder (config.json + model.safetensors / .bin)."""
  config = _read_config(folder)
  _check_kind(folder, config, "clip", "a CLIP model")
  cfg = CLIPConfig.from_dict(config)
  model = abstract_module(lambda rngs: CLIPModel(cfg, rngs=rngs))
  return _load(model, clip_state_dict(_read_weights(folder)), f"{folder} CLIP")


# ----------------------------------------------------------------------------------------------- DINO


def vit_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """ViTModel keys as saved by transformers; classifiers' `vit.` prefix is stripped."""
  return {k[4:] if k.startswith("vit.") else k: v for k, v in state.items()
          if not k.startswith("classifier.")}


def load_dino(folder: str) -> ViTModel:
  """vcjax ViTModel from a transformers ViT folder (e.g. facebook/dino-vits16)."""
  config = _read_config(folder)
  _check_kind(folder, config, "vit", "a ViT (DINO) model")
  cfg = ViTConfig.from_dict(config)
  model = abstract_module(lambda rngs: ViTModel(cfg, rngs=rngs))
  return _load(model, vit_state_dict(_read_weights(folder)), f"{folder} DINO ViT")


# ----------------------------------------------------------------------------------------------- RAFT


def load_raft(path: str, config: RAFTConfig | None = None) -> RAFT:
  """vcjax RAFT from the original code's checkpoint (`raft-things.pth`: `module.fnet.conv1.weight`, ...)."""
  if os.path.isdir(path):
    raise CheckpointError(f"{path}: is a folder; give the RAFT checkpoint file (raft-things.pth)")
  state = sources.read_state_dict(path)
  if not any(k.split(".", 1)[-1].startswith(("fnet.", "cnet.", "update_block.")) or
             k.startswith(("fnet.", "cnet.", "update_block.")) for k in state):
    raise CheckpointError(f"{path}: not a RAFT checkpoint (no fnet / cnet / update_block weights)")
  cfg = config or RAFTConfig()
  model = abstract_module(lambda rngs: RAFT(cfg, rngs=rngs))
  return keymaps.load_state_dict(model, raft_state_dict(state), ignore=[r"num_batches_tracked$"],
                                 what=f"{path} RAFT")
