"""Rename LDM single-file Stable Diffusion 1.5 checkpoints to diffusers names (and back).

Community fine-tunes ship one .safetensors/.ckpt holding the whole pipeline in the original
latent-diffusion (LDM) naming:
  model.diffusion_model.*          the UNet (input_blocks / middle_block / output_blocks numbering)
  first_stage_model.*              the VAE (encoder.down.i.block.j, decoder.up.i REVERSED, mid.attn_1 ...)
  cond_stage_model.transformer.*   the CLIP text tower (already transformers names: text_model.*)
Everything here is a pure function on flat dicts of arrays: keys are renamed, arrays are passed through
untouched (same objects), except that `diffusers_vae_to_ldm` turns the VAE mid-attention linears back
into the 1x1 convs LDM stores. vcjax's loader (`keymaps.load_state_dict`) squeezes 1x1 convs into
linears, so the forward direction leaves them 4-D.

Both directions of the UNet and the VAE are driven by ONE generated table of module pairs
(ldm_prefix, diffusers_prefix, kind) plus, per kind, one table of inner sub-module renames, so the
two directions cannot drift apart. A key is matched on its longest module prefix in the table;
keys that match nothing raise CheckpointError (a silent drop would load a half-initialised model).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from vcjax.weights.errors import CheckpointError

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
_PARTS = (("unet", LDM_UNET_PREFIX), ("vae", LDM_VAE_PREFIX), ("text_encoder", LDM_CLIP_PREFIX))

# Inner renames per kind of module: (ldm sub-module, diffusers sub-module). None = names are kept
# (any sub-path allowed); a tuple = the sub-module must be one of these (anything else is unknown).
_INNER: dict[str, tuple[tuple[str, str], ...] | None] = {
    "same": None,
    # SpatialTransformer == Transformer2DModel inner names (norm, proj_in, transformer_blocks, proj_out).
    "transformer": None,
    "unet_resnet": (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                    ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
                    ("skip_connection", "conv_shortcut")),
    "vae_resnet": (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                   ("nin_shortcut", "conv_shortcut")),
    "vae_attn": (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"),
                 ("proj_out", "to_out.0")),
}
# LDM's VAE attention projections are 1x1 convs; diffusers' are linears.
_VAE_ATTN_PROJ = ("to_q", "to_k", "to_v", "to_out.0")

Table = list[tuple[str, str, str]]  # (ldm module prefix, diffusers module prefix, kind)


# ---------------------------------------------------------------------------------------------------
# The one renaming engine.


def _rename(sd: Mapping[str, Any], table: Table, to_diffusers: bool, what: str) -> dict[str, Any]:
  """Rename every key of `sd` through `table` in one direction; unknown keys raise CheckpointError."""
  src, dst = (0, 1) if to_diffusers else (1, 0)
  lookup = {entry[src]: (entry[dst], entry[2]) for entry in table}
  inner = {kind: None if pairs is None else {p[src]: p[dst] for p in pairs}
           for kind, pairs in _INNER.items()}
  out, unknown = {}, []
  for key, value in sd.items():
    new = _rename_key(key, lookup, inner)
    if new is None:
      unknown.append(key)
    else:
      out[new] = value
  if unknown:
    unknown.sort()
    shown = ", ".join(unknown[:8]) + (", ..." if len(unknown) > 8 else "")
    direction = "LDM -> diffusers" if to_diffusers else "diffusers -> LDM"
    raise CheckpointError(f"{what} ({direction}): {len(unknown)} keys with no known name: {shown}")
  if len(out) != len(sd):  # the table is a bijection, so this only fires on a table bug
    raise CheckpointError(f"{what}: several keys renamed onto the same name")
  return out


def _rename_key(key: str, lookup: Mapping[str, tuple[str, str]],
                inner: Mapping[str, Mapping[str, str] | None]) -> str | None:
  parts = key.split(".")
  for cut in range(len(parts) - 1, 0, -1):  # longest module prefix first
    hit = lookup.get(".".join(parts[:cut]))
    if hit is None:
      continue
    new_prefix, kind = hit
    rest = parts[cut:]
    renames = inner[kind]
    if renames is None:
      return ".".join([new_prefix] + rest)
    sub = renames.get(".".join(rest[:-1]))
    return None if sub is None else f"{new_prefix}.{sub}.{rest[-1]}"
  return None


# ---------------------------------------------------------------------------------------------------
# UNet.


def _cfg(config: Any, name: str) -> Any:
  return config[name] if isinstance(config, Mapping) else getattr(config, name)


def _unet_layout(config: Any) -> tuple[int, int, list[bool], list[bool]]:
  """(number of levels, resnets per down block, down level has attention, up level has attention)."""
  n = len(_cfg(config, "block_out_channels"))
  lpb = _cfg(config, "layers_per_block")
  if isinstance(lpb, (tuple, list)):
    if len(set(lpb)) != 1:
      raise CheckpointError(f"LDM UNet numbering needs one layers_per_block, got {lpb}")
    lpb = lpb[0]
  down = [("CrossAttn" in t) for t in _cfg(config, "down_block_types")]
  up = [("CrossAttn" in t) for t in _cfg(config, "up_block_types")]
  if len(down) != n or len(up) != n:
    raise CheckpointError(f"UNet config: {n} levels but {len(down)} down / {len(up)} up block types")
  return n, int(lpb), down, up


def unet_key_table(config: Any) -> Table:
  """Module pairs (ldm, diffusers, kind) of an SD-style UNet2DConditionModel.

  config: anything with block_out_channels, layers_per_block, down_block_types, up_block_types (a vcjax
  UNet3DConfig or a diffusers config dict); a block type containing "CrossAttn" has attention.
  The mid block is UNetMidBlock2DCrossAttn (resnet, transformer, resnet), as in SD1.5.
  """
  n, lpb, down_attn, up_attn = _unet_layout(config)
  table: Table = [
      ("time_embed.0", "time_embedding.linear_1", "same"),
      ("time_embed.2", "time_embedding.linear_2", "same"),
      ("input_blocks.0.0", "conv_in", "same"),
      ("out.0", "conv_norm_out", "same"),
      ("out.2", "conv_out", "same"),
      ("middle_block.0", "mid_block.resnets.0", "unet_resnet"),
      ("middle_block.1", "mid_block.attentions.0", "transformer"),
      ("middle_block.2", "mid_block.resnets.1", "unet_resnet"),
  ]
  # input_blocks: 0 is conv_in, then per level `lpb` (resnet[, transformer]) entries and, except on the
  # last level, one downsampler entry.
  for i in range(n):
    for j in range(lpb):
      idx = 1 + i * (lpb + 1) + j
      table.append((f"input_blocks.{idx}.0", f"down_blocks.{i}.resnets.{j}", "unet_resnet"))
      if down_attn[i]:
        table.append((f"input_blocks.{idx}.1", f"down_blocks.{i}.attentions.{j}", "transformer"))
    if i < n - 1:
      idx = 1 + i * (lpb + 1) + lpb
      table.append((f"input_blocks.{idx}.0.op", f"down_blocks.{i}.downsamplers.0.conv", "same"))
  # output_blocks: lpb + 1 entries per level; the last entry of a level (but the last level) also
  # holds the upsampler, after the transformer when there is one.
  for i in range(n):
    for j in range(lpb + 1):
      idx = i * (lpb + 1) + j
      table.append((f"output_blocks.{idx}.0", f"up_blocks.{i}.resnets.{j}", "unet_resnet"))
      if up_attn[i]:
        table.append((f"output_blocks.{idx}.1", f"up_blocks.{i}.attentions.{j}", "transformer"))
      if i < n - 1 and j == lpb:
        slot = 2 if up_attn[i] else 1
        table.append((f"output_blocks.{idx}.{slot}.conv", f"up_blocks.{i}.upsamplers.0.conv", "same"))
  return table


def ldm_unet_to_diffusers(sd: Mapping[str, Any], config: Any) -> dict[str, Any]:
  """LDM UNet keys (`model.diffusion_model.` already stripped) -> diffusers UNet2DConditionModel keys.

  Arrays are passed through unchanged. Raises CheckpointError on keys the layout of `config` lacks.
  """
  return _rename(sd, unet_key_table(config), True, "UNet")


def diffusers_unet_to_ldm(sd: Mapping[str, Any], config: Any) -> dict[str, Any]:
  """Inverse of `ldm_unet_to_diffusers` (no prefix added)."""
  return _rename(sd, unet_key_table(config), False, "UNet")


# ---------------------------------------------------------------------------------------------------
# VAE.


def _max_index(keys, pattern: str) -> int:
  found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
  return max(found) + 1 if found else 0


def _vae_layout(sd: Mapping[str, Any]) -> tuple[int, int, int]:
  """(levels, encoder resnets per level, decoder resnets per level) read off either naming."""
  keys = list(sd)
  n = max(_max_index(keys, r"encoder\.down(?:_blocks)?\.(\d+)\."),
          _max_index(keys, r"decoder\.up(?:_blocks)?\.(\d+)\."))
  enc = _max_index(keys, r"encoder\.down(?:_blocks)?\.\d+\.(?:block|resnets)\.(\d+)\.")
  dec = _max_index(keys, r"decoder\.up(?:_blocks)?\.\d+\.(?:block|resnets)\.(\d+)\.")
  return n, enc, dec


def vae_key_table(levels: int, encoder_layers: int, decoder_layers: int) -> Table:
  """Module pairs (ldm, diffusers, kind) of an AutoencoderKL with `levels` blocks.

  LDM's decoder.up.k is diffusers' decoder.up_blocks.(levels-1-k): LDM numbers the decoder by
  resolution (like the encoder), diffusers in execution order.
  """
  table: Table = [(name, name, "same") for name in ("quant_conv", "post_quant_conv")]
  for part in ("encoder", "decoder"):
    table += [
        (f"{part}.conv_in", f"{part}.conv_in", "same"),
        (f"{part}.conv_out", f"{part}.conv_out", "same"),
        (f"{part}.norm_out", f"{part}.conv_norm_out", "same"),
        (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", "vae_resnet"),
        (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", "vae_resnet"),
        (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", "vae_attn"),
    ]
  for i in range(levels):
    for j in range(encoder_layers):
      table.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", "vae_resnet"))
    if i < levels - 1:
      table.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv",
                    "same"))
    k = levels - 1 - i
    for j in range(decoder_layers):
      table.append((f"decoder.up.{k}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", "vae_resnet"))
    if i < levels - 1:
      table.append((f"decoder.up.{k}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", "same"))
  return table


def ldm_vae_to_diffusers(sd: Mapping[str, Any]) -> dict[str, Any]:
  """LDM VAE keys (`first_stage_model.` already stripped) -> diffusers AutoencoderKL keys.

  The layout (levels, resnets per level) is read off the keys. The mid-attention q/k/v/proj_out stay
  (C, C, 1, 1) convs; vcjax's loader squeezes them into linears.
  """
  return _rename(sd, vae_key_table(*_vae_layout(sd)), True, "VAE")


def diffusers_vae_to_ldm(sd: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `ldm_vae_to_diffusers`; 2-D mid-attention weights become LDM's (C, C, 1, 1) convs."""
  sd = modernize_vae_attention_keys(sd)
  out_ldm = {}
  for key, value in sd.items():
    module, _, leaf = key.rpartition(".")
    if (leaf == "weight" and getattr(value, "ndim", 0) == 2 and ".mid_block.attentions." in module
        and module.endswith(_VAE_ATTN_PROJ)):
      value = value[:, :, None, None]
    out_ldm[key] = value
  return _rename(out_ldm, vae_key_table(*_vae_layout(out_ldm)), False, "VAE")


_OLD_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_VAE_ATTN_RE = re.compile(
    r"^(.*\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def modernize_vae_attention_keys(sd: Mapping[str, Any]) -> dict[str, Any]:
  """Old diffusers VAE attention names (query/key/value/proj_attn) -> to_q/to_k/to_v/to_out.0.

  Other keys (and all arrays) are passed through unchanged.
  """
  out = {}
  for key, value in sd.items():
    m = _OLD_VAE_ATTN_RE.match(key)
    out[f"{m.group(1)}.{_OLD_VAE_ATTN[m.group(2)]}.{m.group(3)}" if m else key] = value
  return out


def is_ldm_vae(sd: Mapping[str, Any]) -> bool:
  """Whether `sd` is a bare LDM-named VAE (e.g. a standalone `vae-ft-mse` .ckpt, no prefix)."""
  return any(k.startswith("encoder.down.") or k.startswith("decoder.up.") for k in sd)


# ---------------------------------------------------------------------------------------------------
# CLIP text tower.

_CLIP_TOP = ("embeddings.", "encoder.", "final_layer_norm.")


def ldm_clip_to_diffusers(sd: Mapping[str, Any]) -> dict[str, Any]:
  """LDM CLIP keys (`cond_stage_model.transformer.` stripped) -> transformers CLIPTextModel keys.

  SD1.5 files already use `text_model.*`; older ones lack that level and get it added. position_ids
  (a constant buffer) is dropped.
  """
  out, unknown = {}, []
  for key, value in sd.items():
    if key.startswith(LDM_CLIP_PREFIX):  # tolerate an unstripped prefix
      key = key[len(LDM_CLIP_PREFIX):]
    if key.endswith("position_ids"):
      continue
    if not key.startswith("text_model."):
      key = "text_model." + key
    if key[len("text_model."):].startswith(_CLIP_TOP):
      out[key] = value
    else:
      unknown.append(key)
  if unknown:
    shown = ", ".join(sorted(unknown)[:8])
    raise CheckpointError(f"CLIP text: {len(unknown)} keys with no known name: {shown}")
  return out


# ---------------------------------------------------------------------------------------------------
# Whole single-file checkpoints.


def _unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
  # Lightning-era .ckpt files nest the weights under "state_dict".
  inner = sd.get("state_dict") if isinstance(sd, Mapping) else None
  return inner if isinstance(inner, Mapping) else sd


def is_ldm_checkpoint(sd: Mapping[str, Any]) -> bool:
  """Whether `sd` is an LDM single-file checkpoint (keys under model.diffusion_model. & co)."""
  return any(k.startswith(prefix) for k in _unwrap(sd) for _, prefix in _PARTS)


def split_ldm_checkpoint(sd: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """{"unet", "vae", "text_encoder"}: the three parts with their LDM prefixes stripped (still LDM names).

  Everything else (EMA copies, scheduler buffers such as alphas_cumprod) is dropped. A part that is
  absent comes back as an empty dict.
  """
  sd = _unwrap(sd)
  parts: dict[str, dict[str, Any]] = {name: {} for name, _ in _PARTS}
  for key, value in sd.items():
    for name, prefix in _PARTS:
      if key.startswith(prefix):
        parts[name][key[len(prefix):]] = value
        break
  return parts


def join_ldm_checkpoint(parts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """Inverse of `split_ldm_checkpoint`: LDM-named parts -> one prefixed flat dict."""
  out = {}
  for name, prefix in _PARTS:
    for key, value in parts.get(name, {}).items():
      out[prefix + key] = value
  unknown = set(parts) - {name for name, _ in _PARTS}
  if unknown:
    raise CheckpointError(f"LDM checkpoint parts must be unet/vae/text_encoder, got {sorted(unknown)}")
  return out
