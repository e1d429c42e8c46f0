"""vcjax -> PyTorch files: trained LoRAs (diffusers/PEFT, kohya, vcjax's own format) and whole UNets.

    save_lora_peft(unet, "out/")        # out/pytorch_lora_weights.safetensors, `unet.<module>.lora_A.weight`:
                                        #   pipe.load_lora_weights("out/") / unet.load_lora_adapter(..., prefix="unet")
    save_lora_kohya(unet, "x.safetensors")  # lora_unet_<module with _>.lora_down/.lora_up/.alpha (alpha = rank)
    save_lora(unet, "x.safetensors")    # vcjax's own: <vcjax path>.lora_down (in, r) / .lora_up (r, out)
    read_vcjax_lora("x.safetensors")    # -> {diffusers module name: LoRAWeight}, as read_lora(...)["unet"]
    save_unet(unet, "out/")             # out/config.json + diffusion_pytorch_model.safetensors (UNetMotionModel)
                                        #   + vcjax_export.json (norm semantics; a warning if not diffusers')

LoRA exports fold each layer's current run-time LoRAScale into `up` (so a LoRA trained at scale 1 exports
as trained) and write alpha = rank, i.e. scale 1 in every reader. A LoRA on a SpatialTransformer's
proj_in/proj_out is written as a 1x1-conv LoRA when the PyTorch model has convolutions there
(`use_linear_projection` False, SD1.5). vcjax LoRA files feed `vcjax.nn.lora.load_lora` (run time) and
`vcjax.weights.lora.merge_lora` (merged) directly; to merge one with the converter CLI, export it to PEFT.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections import Counter
from typing import Any, Mapping

import numpy as np
from flax import nnx

from vcjax.nn import lora as nn_lora
from vcjax.weights import keymaps, sources
from vcjax.weights.errors import CheckpointError
from vcjax.weights.lora import LoRAWeight

PEFT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
UNET_WEIGHT_NAME = "diffusion_pytorch_model.safetensors"
EXPORT_INFO_NAME = "vcjax_export.json"  # beside config.json: what the export does not carry over
log = logging.getLogger(__name__)
VCJAX_LORA_FORMAT = "vcjax-lora"
# SpatialTransformer proj_in/proj_out: 1x1 convs in PyTorch unless use_linear_projection.
_SPATIAL_PROJ = re.compile(r"(^|\.)attentions\.\d+\.proj_(in|out)$")


def _config(model) -> Any:
  return getattr(model, "config", None)


def _is_conv_1x1(module_path: str, config) -> bool:
  return (config is not None and not getattr(config, "use_linear_projection", True)
          and bool(_SPATIAL_PROJ.search(module_path)))


# ----------------------------------------------------------------------------- LoRA


def _lora_matrices(model: nnx.Module, fold_scale: bool) -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
  """{diffusers module name: (down (r, in[, 1, 1]), up (out, r[, 1, 1]), conv)} in PyTorch layout."""
  config = _config(model)
  found = nn_lora.lora_arrays(model)
  if not found:
    raise CheckpointError("the model carries no LoRA to export (attach one with vcjax.nn.lora.add_lora/load_lora)")
  out = {}
  for path, (down, up, scale) in found.items():
    down_t = np.ascontiguousarray(down.T, np.float32)
    up_t = np.ascontiguousarray(up.T * np.float32(scale if fold_scale else 1.0), np.float32)
    conv = _is_conv_1x1(path, config)
    if conv:
      down_t, up_t = down_t[:, :, None, None], up_t[:, :, None, None]
    out[nn_lora.diffusers_name(path)] = (down_t, up_t, conv)
  return out


def lora_to_peft(model: nnx.Module, *, prefix: str = "unet", fold_scale: bool = True
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict, PEFT adapter config) of the model's LoRAs in diffusers' format:
  `<prefix>.<diffusers module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r); lora_alpha = r."""
  mats = _lora_matrices(model, fold_scale)
  head = f"{prefix}." if prefix else ""
  sd, ranks = {}, {}
  for name, (down, up, _) in mats.items():
    sd[f"{head}{name}.lora_A.weight"] = down
    sd[f"{head}{name}.lora_B.weight"] = up
    ranks[name] = int(down.shape[0])
  r = Counter(ranks.values()).most_common(1)[0][0]
  pattern = {n: k for n, k in ranks.items() if k != r}
  config = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(mats), "lora_dropout": 0.0, "bias": "none", "use_dora": False,
            "use_rslora": False, "init_lora_weights": True}
  return sd, config


def _weights_file(path: str, default_name: str) -> str:
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return path
  os.makedirs(path, exist_ok=True)
  return os.path.join(path, default_name)


def save_lora_peft(model: nnx.Module, path: str, *, prefix: str = "unet", fold_scale: bool = True) -> str:
  """Write the model's LoRAs as diffusers' `save_lora_weights` does (a folder gets
  pytorch_lora_weights.safetensors; a *.safetensors path is used as is). The adapter config goes into the
  safetensors metadata (`lora_adapter_metadata`, keys prefixed with `prefix.`). Returns the file."""
  sd, config = lora_to_peft(model, prefix=prefix, fold_scale=fold_scale)
  meta = {f"{prefix}.{k}" if prefix else k: v for k, v in config.items()}
  file = _weights_file(path, PEFT_WEIGHT_NAME)
  sources.save_safetensors(sd, file, metadata={"format": "pt",
                                               "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)})
  return file


def lora_to_kohya(model: nnx.Module, *, prefix: str = "lora_unet_", fold_scale: bool = True) -> dict[str, np.ndarray]:
  """kohya-ss names: `lora_unet_<diffusers module, "." -> "_">.lora_down.weight` / `.lora_up.weight` /
  `.alpha` (= rank, so alpha / rank = 1)."""
  sd = {}
  for name, (down, up, _) in _lora_matrices(model, fold_scale).items():
    key = prefix + name.replace(".", "_")
    sd[f"{key}.lora_down.weight"] = down
    sd[f"{key}.lora_up.weight"] = up
    sd[f"{key}.alpha"] = np.asarray(down.shape[0], np.float32)
  return sd


def save_lora_kohya(model: nnx.Module, path: str, *, fold_scale: bool = True) -> str:
  sd = lora_to_kohya(model, fold_scale=fold_scale)
  ranks = sorted({int(v.shape[0]) for k, v in sd.items() if k.endswith(".lora_down.weight")})
  file = _weights_file(path, "lora.safetensors")
  sources.save_safetensors(sd, file, metadata={"ss_network_module": "networks.lora",
                                               "ss_network_dim": str(ranks[-1]), "ss_network_alpha": str(ranks[-1])})
  return file


def save_lora(model: nnx.Module, path: str) -> str:
  """vcjax's own LoRA file: `<vcjax module path>.lora_down` (in, r) / `.lora_up` (r, out), float32, as
  trained (the run-time LoRAScale is not stored); metadata format=vcjax-lora and rank."""
  found = nn_lora.lora_arrays(model)
  if not found:
    raise CheckpointError("the model carries no LoRA to save")
  sd = {}
  for p, (down, up, _) in found.items():
    sd[f"{p}.lora_down"], sd[f"{p}.lora_up"] = down, up
  ranks = sorted({int(d.shape[1]) for d, _, _ in found.values()})
  file = _weights_file(path, "lora.safetensors")
  sources.save_safetensors(sd, file, metadata={"format": VCJAX_LORA_FORMAT,
                                               "rank": ",".join(map(str, ranks))})
  return file


def is_vcjax_lora(path: str) -> bool:
  """Whether `path` is a safetensors file written by `save_lora` (its metadata says format=vcjax-lora)."""
  from vcjax.weights.lora import _safetensors_metadata
  return os.path.isfile(path) and _safetensors_metadata(os.fspath(path)).get("format") == VCJAX_LORA_FORMAT


def read_vcjax_lora(path: str) -> dict[str, LoRAWeight]:
  """A file written by `save_lora` -> {diffusers module name: LoRAWeight(down (r, in), up (out, r), 1.0)},
  the form of `read_lora(...)["unet"]`: pass it to `vcjax.nn.lora.load_lora` or `merge_lora`."""
  sd = sources.read_state_dict(path)
  pairs: dict[str, dict[str, np.ndarray]] = {}
  bad = []
  for key, value in sd.items():
    module, _, role = key.rpartition(".")
    if role not in ("lora_down", "lora_up") or not module or np.ndim(value) != 2:
      bad.append(key)
      continue
    pairs.setdefault(module, {})[role] = np.asarray(value, np.float32)
  bad += [m for m, d in pairs.items() if len(d) != 2]
  if bad or not pairs:
    shown = ", ".join(sorted(bad)[:6]) or "no keys"
    raise CheckpointError(f"{path}: not a vcjax LoRA file (expected <module>.lora_down / .lora_up pairs; "
                          f"{len(bad)} odd keys: {shown})")
  out = {}
  for module, d in sorted(pairs.items()):
    down, up = d["lora_down"], d["lora_up"]
    if down.shape[1] != up.shape[0]:
      raise CheckpointError(f"{path}: LoRA of {module!r} has down {down.shape} and up {up.shape}")
    out[nn_lora.diffusers_name(module)] = LoRAWeight(down=np.ascontiguousarray(down.T),
                                                     up=np.ascontiguousarray(up.T), scale=1.0)
  return out


# ----------------------------------------------------------------------------- UNet


def torch_shapes(model: nnx.Module, config=None) -> dict[str, tuple[int, ...]]:
  """{diffusers key: PyTorch shape} of every nnx.Param of a vcjax model (kernels HWIO -> OIHW, linear
  (in, out) -> (out, in), SpatialTransformer proj_in/out -> (out, in, 1, 1) unless use_linear_projection).
  Buffers (the motion modules' pe) are not params; see `motion_pe_buffers`."""
  config = config if config is not None else _config(model)
  out = {}
  for path, (shape, _) in keymaps.module_param_shapes(model).items():
    module, _, name = path.rpartition(".")
    key = nn_lora.diffusers_name(module) + (".bias" if name == "bias" else ".weight")
    if name == "kernel" and len(shape) == 4:
      out[key] = (shape[3], shape[2], shape[0], shape[1])
    elif name == "kernel" and len(shape) == 2:
      out[key] = (shape[1], shape[0], 1, 1) if _is_conv_1x1(module, config) else (shape[1], shape[0])
    else:
      out[key] = tuple(shape)
  return out


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
  shapes = torch_shapes(model)
  sd = keymaps.export_state_dict(model, shapes)
  if len(sd) != len(shapes):
    raise CheckpointError(f"export: {len(shapes) - len(sd)} params could not be mapped to diffusers names")
  if merge_lora and nn_lora.lora_modules(model):
    for name, (down, up, _) in _lora_matrices(model, fold_scale=True).items():
      key = name + ".weight"
      w = sd[key]
      delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
      sd[key] = (w.astype(np.float32) + delta.reshape(w.shape)).astype(w.dtype)
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
  config = _config(model)
  info = export_info(config, merge_lora=merge_lora) if config is not None else None
  if info is not None and not info["diffusers_computes_the_same"]:
    msg = (f"export to {path}: the UNet runs with {info['norm_semantics']!r} norm semantics "
           f"({info['norm_flags']}); diffusers' UNetMotionModel uses its own ({info['diffusers_norm_flags']}), so "
           "the exported model computes differently in diffusers (recorded in the export's info)")
    log.warning(msg)
    warnings.warn(msg, stacklevel=2)
  file = _weights_file(path, UNET_WEIGHT_NAME)
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
