"""A `Bundle`: the diffusers-named weights and vcjax configs of a whole AnimateDiff model, assembled from the files
users have: a base SD1.5 model (diffusers folder or LDM single file), a motion module (original
.ckpt/.safetensors or diffusers MotionAdapter), LoRAs and full-UNet overrides (VideoMaker).

Nothing here builds modules; `vcjax.conversion` turns a bundle into a converted folder.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from vcjax.models.configs import (MOTION_VERSIONS, CLIPTextConfig, UNet3DConfig, VAEConfig,
                                  norm_semantics)
from vcjax.weights import ldm, motion_keys, sources
from vcjax.weights.errors import CheckpointError


@dataclasses.dataclass
class Bundle:
  """Diffusers-named state dicts + configs of the three models (a model may be absent)."""
  unet: dict[str, np.ndarray]
  unet_config: UNet3DConfig
  vae: dict[str, np.ndarray] | None = None
  vae_config: VAEConfig | None = None
  text_encoder: dict[str, np.ndarray] | None = None
  text_config: CLIPTextConfig | None = None
  tokenizer_dir: str | None = None
  scheduler_config: dict[str, Any] | None = None  # a diffusers scheduler_config.json dict
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


# Stable Diffusion 1.5's scheduler/scheduler_config.json: what a base without one (an LDM single file, which
# records none) gets, as diffusers' from_single_file does for SD1.5.
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
                  "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}


def _read_scheduler(folder: str | None) -> tuple[dict[str, Any], str]:
  """(scheduler config, where it came from): `folder/scheduler/scheduler_config.json`, else SD1.5's."""
  path = os.path.join(folder, "scheduler", "scheduler_config.json") if folder else None
  if path and os.path.isfile(path):
    return _read_json(path), path
  return dict(SD15_SCHEDULER), "SD1.5's (the base carries no scheduler config)"


def _strip_type(name: str) -> str:
  """'CrossAttnDownBlock2D' / 'CrossAttnDownBlockMotion' -> 'CrossAttnDownBlock'."""
  for suffix in ("2D", "Motion", "3D"):
    name = name.removesuffix(suffix)
  return name


def unet_fields_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """UNet3DConfig fields from a diffusers UNet2DConditionModel / UNetMotionModel config.json."""
  heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)  # SD1.5's misnomer
  out = dict(in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
             block_out_channels=tuple(cfg["block_out_channels"]),
             down_block_types=tuple(_strip_type(t) for t in cfg["down_block_types"]),
             up_block_types=tuple(_strip_type(t) for t in cfg["up_block_types"]),
             layers_per_block=cfg.get("layers_per_block", 2),
             num_attention_heads=tuple(heads) if isinstance(heads, list) else heads,
             cross_attention_dim=cfg.get("cross_attention_dim", 768),
             norm_num_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5),
             use_linear_projection=cfg.get("use_linear_projection", False),
             flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=cfg.get("freq_shift", 0))
  tl = cfg.get("transformer_layers_per_block", 1)
  out["transformer_layers_per_block"] = tl if isinstance(tl, int) else tl[0]
  if "motion_num_attention_heads" in cfg:
    mh = cfg["motion_num_attention_heads"]
    out["motion_num_heads"] = mh if isinstance(mh, int) else mh[0]
  return out


def _unet_fields_from_ldm(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """An LDM single file carries no config: SD1.5's, with what the shapes tell (cross-attention width,
  linear vs conv projections)."""
  fields = {}
  for k, v in sd.items():
    if k.endswith("attn2.to_k.weight"):
      fields["cross_attention_dim"] = int(np.shape(v)[1])
    if k.endswith("proj_in.weight"):
      fields["use_linear_projection"] = np.ndim(v) == 2
  return fields


def _read_json(path: str) -> dict[str, Any]:
  import json
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read config ({e})") from None


def read_base(path: str, *, tokenizer: str | None = None, config_dir: str | None = None,
              dtype=None) -> Bundle:
  """A base image model: a diffusers folder (unet/, vae/, text_encoder/, tokenizer/) or an LDM file.

  An LDM single file carries no architecture config: SD1.5's is assumed unless `config_dir` names a
  diffusers folder whose unet/vae/text_encoder config.json describe it (as diffusers' from_single_file).
  """
  if sources.is_diffusers_folder(path):
    unet_cfg, unet = sources.read_diffusers_component(path, "unet", dtype)
    fields = unet_fields_from_diffusers(unet_cfg)
    bundle = Bundle(unet=unet, unet_config=UNet3DConfig(**fields), info={"base": "diffusers"})
    if os.path.isdir(os.path.join(path, "vae")):
      vae_cfg, bundle.vae = sources.read_diffusers_component(path, "vae", dtype)
      bundle.vae = ldm.modernize_vae_attention_keys(bundle.vae)
      bundle.vae_config = VAEConfig.from_dict(vae_cfg)
    if os.path.isdir(os.path.join(path, "text_encoder")):
      text_cfg, text = sources.read_diffusers_component(path, "text_encoder", dtype)
      bundle.text_encoder = ldm.ldm_clip_to_diffusers(text)
      bundle.text_config = CLIPTextConfig.from_dict(text_cfg)
    tok = os.path.join(path, "tokenizer")
    bundle.tokenizer_dir = tokenizer or (tok if os.path.isdir(tok) else None)
    bundle.scheduler_config, bundle.info["scheduler_source"] = _read_scheduler(path)
    return bundle
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file or diffusers model folder")
  state = sources.read_state_dict(path, dtype)
  if not ldm.is_ldm_checkpoint(state):
    raise CheckpointError(f"{path}: neither a diffusers folder nor an LDM single-file checkpoint "
                          "(no model.diffusion_model.* keys)")
  parts = ldm.split_ldm_checkpoint(state)
  cfg = lambda name: _read_json(os.path.join(config_dir, name, "config.json")) if config_dir else {}
  fields = unet_fields_from_diffusers(cfg("unet")) if config_dir else _unet_fields_from_ldm(parts["unet"])
  config = UNet3DConfig(**fields)
  if tokenizer is None and config_dir and os.path.isdir(os.path.join(config_dir, "tokenizer")):
    tokenizer = os.path.join(config_dir, "tokenizer")
  bundle = Bundle(unet=ldm.ldm_unet_to_diffusers(parts["unet"], config), unet_config=config,
                  tokenizer_dir=tokenizer, info={"base": "ldm"})
  bundle.scheduler_config, bundle.info["scheduler_source"] = _read_scheduler(config_dir)
  if parts["vae"]:
    bundle.vae, bundle.vae_config = ldm.ldm_vae_to_diffusers(parts["vae"]), VAEConfig.from_dict(cfg("vae"))
  if parts["text_encoder"]:
    bundle.text_encoder = ldm.ldm_clip_to_diffusers(parts["text_encoder"])
    bundle.text_config = CLIPTextConfig.from_dict(cfg("text_encoder"))
  return bundle


def read_motion_module(path: str, dtype=None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(diffusers-named motion weights, info) from an original .ckpt/.safetensors or a diffusers
  MotionAdapter (folder or weights file). info: source, max_seq_length, mid_block, layers, heads."""
  config = {}
  if os.path.isdir(path):
    parent, name = os.path.split(os.path.normpath(path))
    config, sd = sources.read_diffusers_component(parent, name, dtype)
  else:
    sd = sources.read_state_dict(path, dtype)
  source = "original" if motion_keys.is_original_motion_module(sd) else "diffusers"
  if source == "original":
    sd = motion_keys.original_motion_to_diffusers(sd)
  info = motion_keys.motion_info(sd)
  info["source"] = source
  if config:
    info["max_seq_length"] = config.get("motion_max_seq_length", info["max_seq_length"])
    info["mid_block"] = config.get("use_motion_mid_block", info["mid_block"])
    heads = config.get("motion_num_attention_heads", 8)
    info["heads"] = heads if isinstance(heads, int) else heads[0]
  return sd, info


def motion_fields(info: Mapping[str, Any], version: str | None, semantics: str | None) -> dict[str, Any]:
  """UNet3DConfig motion fields for a motion module: version and norm semantics default to what the
  weights say (original checkpoints -> `original` norms; diffusers ones -> `diffusers`)."""
  version = version or motion_keys.detect_version(info)
  if version not in MOTION_VERSIONS:
    raise CheckpointError(f"unknown motion module version {version!r}; expected one of {list(MOTION_VERSIONS)}")
  semantics = semantics or ("original" if info.get("source") == "original" else "diffusers")
  fields = dict(MOTION_VERSIONS[version], **norm_semantics(semantics, version))
  if info.get("max_seq_length"):
    fields["motion_max_seq_length"] = int(info["max_seq_length"])
  fields["motion_mid_block"] = bool(info["mid_block"])
  fields["motion_layers"] = int(info.get("layers", 1))
  fields["motion_num_heads"] = int(info.get("heads", 8))
  return dict(fields, version=version, semantics=semantics)


def assemble(base: str, motion_module: str | None = None, *, tokenizer: str | None = None,
             config_dir: str | None = None,
             loras: tuple[tuple[str, float], ...] = (), unet_weights: tuple[str, ...] = (),
             version: str | None = None, semantics: str | None = None, motion_heads: int | None = None,
             dtype=None) -> Bundle:
  """The whole model: base + motion module (+ LoRAs merged, + full-UNet overrides applied)."""
  bundle = read_base(base, tokenizer=tokenizer, config_dir=config_dir, dtype=dtype)
  if motion_module:
    motion, info = read_motion_module(motion_module, dtype)
    bundle.unet = {k: v for k, v in bundle.unet.items() if ".motion_modules." not in k}
    bundle.unet.update(motion)
  else:
    try:
      info = dict(motion_keys.motion_info(bundle.unet), source="diffusers")
    except CheckpointError as e:
      raise CheckpointError(f"{base}: the base has no motion modules; pass --motion-module") from e
  if motion_heads:
    info["heads"] = motion_heads
  fields = motion_fields(info, version, semantics)
  bundle.info.update(version=fields.pop("version"), semantics=fields.pop("semantics"),
                   motion_source=info["source"])
  bundle.unet_config = dataclasses.replace(bundle.unet_config, **fields)
  for path in unet_weights:  # e.g. VideoMaker's released UNet: applied over the base, non-strictly.
    override = sources.read_state_dict(path, dtype)
    if motion_keys.is_original_motion_module(override):
      override = motion_keys.original_motion_to_diffusers(override)
    known = {k: v for k, v in override.items() if k in bundle.unet}
    if not known:
      raise CheckpointError(f"{path}: none of its {len(override)} keys names a UNet weight")
    bundle.unet.update(known)
  if loras:
    from vcjax.weights import lora_files
    for path, scale in loras:
      parsed = lora_files.read_lora(path, {k.rpartition(".")[0] for k in bundle.unet},
                                    config=bundle.unet_config)
      bundle.unet = lora_files.merge_lora(bundle.unet, parsed.get("unet", {}), scale)
      if parsed.get("text_encoder") and bundle.text_encoder is not None:
        bundle.text_encoder = lora_files.merge_lora(bundle.text_encoder, parsed["text_encoder"], scale)
  return bundle
