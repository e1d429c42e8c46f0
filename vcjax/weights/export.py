"""vcjax -> PyTorch files: whole UNets (LoRA files are vcjax.weights.lora_files').

    save_unet(unet, "out/")             # out/config.json + diffusion_pytorch_model.safetensors (UNetMotionModel)
                                        #   + vcjax_export.json (norm semantics; a warning if not diffusers')
    unet_state_dict(unet, merge_lora=True)  # the diffusers state dict, attached LoRAs merged (lora_files.merge_lora)
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any, Mapping

import numpy as np
from flax import nnx

from vcjax.nn import lora as nn_lora
from vcjax.weights import keymaps, lora_files, sources
from vcjax.weights.errors import CheckpointError

UNET_WEIGHT_NAME = "diffusion_pytorch_model.safetensors"
EXPORT_INFO_NAME = "vcjax_export.json"  # beside config.json: what the export does not carry over
log = logging.getLogger(__name__)


def motion_pe_buffers(model: nnx.Module) -> dict[str, np.ndarray]:
  """diffusers' persistent `...transformer_blocks.k.pos_embed.pe` buffers `(1, max_len, C)` of every
  motion module (vcjax recomputes them; diffusers' state dict carries them)."""
  from vcjax.models.motion import MotionModule, sinusoidal_positions
  out = {}
  for path, m in nnx.iter_modules(model):
    if isinstance(m, MotionModule):
      c = int(m.proj_in.kernel.get_value().shape[1])
      pe = sinusoidal_positions(m.max_seq_length, c)[None]
      for k in range(len(m.transformer_blocks)):
        out[".".join(map(str, path)) + f".transformer_blocks.{k}.pos_embed.pe"] = pe
  return out


def unet_state_dict(model: nnx.Module, *, merge_lora: bool = False, buffers: bool = True) -> dict[str, np.ndarray]:
  """A vcjax UNet3D as a diffusers UNetMotionModel (UNet2DConditionModel without motion modules) state
  dict: diffusers names, PyTorch layouts, float as stored. merge_lora: fold attached LoRAs (at their
  current scale) into the weights; otherwise they are left out. buffers: include the motion pe buffers
  (a strict `load_state_dict` into UNetMotionModel needs them)."""
  shapes = keymaps.torch_shapes(model)
  sd = keymaps.export_state_dict(model, shapes)
  if len(sd) != len(shapes):
    raise CheckpointError(f"export: {len(shapes) - len(sd)} params could not be mapped to diffusers names")
  if merge_lora and nn_lora.lora_modules(model):
    sd = lora_files.merge_lora(sd, lora_files.lora_weights(model, fold_scale=True))
  if buffers:
    sd.update(motion_pe_buffers(model))
  # Own, writable, C-ordered arrays (views of jax buffers are read-only; torch.from_numpy warns on those).
  return {k: np.array(v, order="C") for k, v in sd.items()}


def diffusers_unet_config(config) -> dict[str, Any]:
  """config.json of the diffusers model with this UNet3DConfig's architecture: UNetMotionModel, or
  UNet2DConditionModel when the config has no motion modules."""
  if not config.flip_sin_to_cos or config.freq_shift != 0:
    raise CheckpointError("export: diffusers' UNetMotionModel fixes flip_sin_to_cos=True, freq_shift=0")
  if config.transformer_norm_eps != 1e-6:
    raise CheckpointError("export: diffusers fixes the spatial transformer GroupNorm eps at 1e-6")
  heads = config.num_attention_heads
  heads = list(heads) if isinstance(heads, (tuple, list)) else heads
  common = dict(in_channels=config.in_channels, out_channels=config.out_channels,
                block_out_channels=list(config.block_out_channels), layers_per_block=config.layers_per_block,
                norm_num_groups=config.norm_num_groups, norm_eps=config.norm_eps,
                cross_attention_dim=config.cross_attention_dim,
                transformer_layers_per_block=config.transformer_layers_per_block,
                use_linear_projection=config.use_linear_projection)
  if not config.use_motion_modules:
    return dict(_class_name="UNet2DConditionModel", attention_head_dim=heads, flip_sin_to_cos=True, freq_shift=0,
                down_block_types=[t + "2D" for t in config.down_block_types],
                up_block_types=[t + "2D" for t in config.up_block_types], **common)
  return dict(_class_name="UNetMotionModel", num_attention_heads=heads,
              down_block_types=[t + "Motion" for t in config.down_block_types],
              up_block_types=[t + "Motion" for t in config.up_block_types],
              motion_max_seq_length=config.motion_max_seq_length,
              motion_num_attention_heads=config.motion_num_heads, use_motion_mid_block=config.motion_mid_block,
              temporal_transformer_layers_per_block=config.motion_layers, **common)


_NORM_FLAGS = ("resnet_norm_across_frames", "out_norm_across_frames", "motion_norm_across_frames")
# diffusers' UNetMotionModel: 2-D norms per frame, the motion module's GroupNorm across frames.
_DIFFUSERS_NORMS = {"resnet_norm_across_frames": False, "out_norm_across_frames": False,
                    "motion_norm_across_frames": True}


def norm_semantics_of(config) -> tuple[str, dict[str, bool]]:
  """("diffusers" | "original" | "custom", the three *_norm_across_frames flags) of a UNet3DConfig.
  "original" = the AnimateDiff repo's (motion-module norm per frame, the resnets either way by version)."""
  flags = {k: bool(getattr(config, k)) for k in _NORM_FLAGS}
  if flags == _DIFFUSERS_NORMS:
    return "diffusers", flags
  same_2d = flags["resnet_norm_across_frames"] == flags["out_norm_across_frames"]
  return ("original" if same_2d and not flags["motion_norm_across_frames"] else "custom"), flags


def export_info(config, *, merge_lora: bool) -> dict[str, Any]:
  """What `save_unet` writes to vcjax_export.json: the norm semantics the weights were run with in vcjax,
  whether diffusers computes the same (it always uses its own), and the merged-LoRA flag."""
  name, flags = norm_semantics_of(config)
  info = {"exported_by": "vcjax", "diffusers_class": "UNetMotionModel" if config.use_motion_modules
          else "UNet2DConditionModel", "norm_semantics": name, "norm_flags": flags,
          "diffusers_norm_flags": dict(_DIFFUSERS_NORMS), "merge_lora": bool(merge_lora)}
  plain_2d = not config.use_motion_modules and not (flags["resnet_norm_across_frames"]
                                                    or flags["out_norm_across_frames"])
  info["diffusers_computes_the_same"] = name == "diffusers" or plain_2d
  if not info["diffusers_computes_the_same"]:
    info["note"] = ("diffusers' UNetMotionModel pools the motion-module GroupNorm across frames and normalises "
                    "resnet norms per frame; these weights ran with other statistics in vcjax (GroupNorm sites "
                    f"{flags}), so the exported model computes differently in diffusers. Load the folder in "
                    "vcjax with the flags above to reproduce the trained model.")
  return info


def save_unet(model: nnx.Module, path: str, *, merge_lora: bool = False) -> str:
  """Write the UNet as a diffusers model folder (config.json + diffusion_pytorch_model.safetensors +
  vcjax_export.json; `UNetMotionModel.from_pretrained(path)`), or, for a *.safetensors path, just the
  weights (the semantics then go into the safetensors metadata, key "vcjax_export"). Returns the weights
  file. Norm semantics: diffusers' UNetMotionModel behaves like vcjax's `diffusers` semantics; a model run
  with other GroupNorm statistics (e.g. `original`: motion-module norm per frame) computes differently
  there, so that export logs a warning and records it (`export_info`)."""
  sd = unet_state_dict(model, merge_lora=merge_lora)
  config = getattr(model, "config", None)
  info = export_info(config, merge_lora=merge_lora) if config is not None else None
  if info is not None and not info["diffusers_computes_the_same"]:
    msg = (f"export to {path}: the UNet runs with {info['norm_semantics']!r} norm semantics "
           f"({info['norm_flags']}); diffusers' UNetMotionModel uses its own ({info['diffusers_norm_flags']}), so "
           "the exported model computes differently in diffusers (recorded in the export's info)")
    log.warning(msg)
    warnings.warn(msg, stacklevel=2)
  file = sources.weights_file(path, UNET_WEIGHT_NAME)
  meta = {"format": "pt"}
  if info is not None:
    meta["vcjax_export"] = json.dumps(info, sort_keys=True)
  sources.save_safetensors(sd, file, metadata=meta)
  if not os.fspath(path).endswith(".safetensors") and config is not None:
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(diffusers_unet_config(config), f, indent=2)
    with open(os.path.join(path, EXPORT_INFO_NAME), "w") as f:
      json.dump(info, f, indent=2)
  return file


def state_dict_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> list[str]:
  """Keys whose arrays differ between two state dicts of the same keys (e.g. what GIRL training changed)."""
  return sorted(k for k in a if k in b and not np.array_equal(np.asarray(a[k]), np.asarray(b[k])))
