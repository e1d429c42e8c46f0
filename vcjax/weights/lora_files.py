"""LoRA files, every flavour, in and out: read them into one form (`read_lora` -> {module: LoRAWeight}), merge
them into a diffusers-named state dict (`merge_lora`, the one merge of PyTorch-layout weights: conversion and
export both call it), attach them to a vcjax model unmerged (`load_lora`, `load_lora_file`, through
vcjax.nn.lora.attach_loras) and write a model's LoRAs (`save_lora_peft`, `save_lora_kohya`, `save_lora`).
Module names go through the one rename table (vcjax.weights.keymaps.vcjax_name / diffusers_name) and
matrices through the one layout conversion (`to_flax` / `to_torch`).

Flavours (METHODS.md §2), told apart by their key suffixes:
  * diffusers / PEFT: `<module>.lora_A.weight` (down) / `.lora_B.weight` (up), optionally prefixed `unet.`,
    `text_encoder.` or `base_model.model.`. Scale lora_alpha / r (alpha / sqrt(r) with rsLoRA) when an
    alpha is known: from `.alpha` keys, an `adapter_config.json` beside the file, or the
    `lora_adapter_metadata` diffusers writes into the safetensors header; else 1.
  * kohya: `lora_unet_<module path, "." written "_">.lora_down.weight` / `.lora_up.weight` / `.alpha`,
    scale alpha / rank (1 without `.alpha`); the path may use diffusers or LDM (input_blocks...) names;
    `lora_te_` / `lora_te1_` / `lora_te2_` for the text encoder(s).
  * AnimateDiff motion LoRA / v3 domain adapter (also old diffusers attention-processor LoRAs):
    `<attention>.processor.to_q_lora.down.weight` / `.up.weight`, merged as W += alpha * up @ down with
    no rank factor (alpha is the user's scale); motion-module names are renamed to diffusers ones
    (`.temporal_transformer` dropped, `attention_blocks.0/1` -> `attn1/attn2`).
An underscore (kohya) name is never split by guessing where a "." was: it is looked up in a table made
from the target model's real module names (and their LDM names), so names that contain "_" resolve
exactly. Everything is numpy; down/up keep PyTorch layout: down (r, in[, kh, kw]), up (out, r[, 1, 1]).

Writing (a model's attached LoRAs):

    save_lora_peft(unet, "out/")        # out/pytorch_lora_weights.safetensors, `unet.<module>.lora_A.weight`:
                                        #   pipe.load_lora_weights("out/") / unet.load_lora_adapter(..., prefix="unet")
    save_lora_kohya(unet, "x.safetensors")  # lora_unet_<module with _>.lora_down/.lora_up/.alpha (alpha = rank)
    save_lora(unet, "x.safetensors")    # vcjax's own: <vcjax path>.lora_down (in, r) / .lora_up (r, out)
    read_vcjax_lora("x.safetensors")    # -> {diffusers module name: LoRAWeight}, as read_lora(...)["unet"]

Exports fold each layer's current run-time LoRAScale into `up` (so a LoRA trained at scale 1 exports as
trained) and write alpha = rank, i.e. scale 1 in every reader. A LoRA on a SpatialTransformer's
proj_in/proj_out is written as a 1x1-conv LoRA when the PyTorch model has convolutions there
(`use_linear_projection` False, SD1.5). vcjax LoRA files feed `load_lora` (run time) and `merge_lora`
(merged) directly; to merge one with the converter CLI, export it to PEFT.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
from flax import nnx

from vcjax.nn import lora as nn_lora
from vcjax.weights import keymaps, sources
from vcjax.weights.errors import CheckpointError

PEFT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
VCJAX_LORA_FORMAT = "vcjax-lora"


@dataclass
class LoRAWeight:
  """One low-rank update of a module's weight: delta W = scale * up @ down (reshaped for convs)."""
  down: np.ndarray  # (r, in) or (r, in, kh, kw)
  up: np.ndarray  # (out, r) or (out, r, 1, 1)
  scale: float = 1.0

  @property
  def rank(self) -> int:
    return int(self.down.shape[0])

  def delta(self) -> np.ndarray:
    """up @ down in float32, (out, in * kh * kw); `scale` NOT applied."""
    up = np.asarray(self.up, np.float32).reshape(self.up.shape[0], -1)
    down = np.asarray(self.down, np.float32).reshape(self.down.shape[0], -1)
    return up @ down


# (key suffix, role). Longest suffixes first where one ends another.
_SUFFIXES = (
    (".lora_A.weight", "down", "peft"), (".lora_B.weight", "up", "peft"),
    (".lora_down.weight", "down", "kohya"), (".lora_up.weight", "up", "kohya"),
    (".lora_linear_layer.down.weight", "down", "proc"), (".lora_linear_layer.up.weight", "up", "proc"),
    (".lora.down.weight", "down", "proc"), (".lora.up.weight", "up", "proc"),
    (".alpha", "alpha", None),
)
_PROCESSOR_RE = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# (key prefix, component, underscore-named). `base_model.model.` (PEFT) is stripped before these.
_PREFIXES = (
    ("lora_unet_", "unet", True), ("lora_te1_", "text_encoder", True), ("lora_te2_", "text_encoder_2", True),
    ("lora_te_", "text_encoder", True), ("unet.", "unet", False), ("text_encoder_2.", "text_encoder_2", False),
    ("text_encoder.", "text_encoder", False), ("model.diffusion_model.", "unet", False),
)
_CLIP_KOHYA_RE = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn|mlp)_(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$")
_LORA_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "adapter_model.bin",
               "pytorch_lora_weights.bin")


def module_names(state_dict: Iterable[str]) -> set[str]:
  """Names of the modules that own a `.weight` in a state dict (the possible LoRA targets)."""
  return {k[:-len(".weight")] for k in state_dict if k.endswith(".weight")}


def parse_lora_arg(text: str) -> tuple[str, float]:
  """"path:0.8" -> ("path", 0.8); "path" -> ("path", 1.0). Only the last ":" splits, and only when a finite
  number follows it, so "C:\\loras\\x.safetensors" stays a path."""
  head, sep, tail = text.rpartition(":")
  if sep and head:
    try:
      value = float(tail)
    except ValueError:
      value = None
    if value is not None and math.isfinite(value):
      return head, value
  return text, 1.0


# ----------------------------------------------------------------------------- reading


def _safetensors_metadata(path: str) -> dict:
  """The `__metadata__` of a safetensors header ({} for other files or when absent)."""
  try:
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      if n <= 0 or n > os.path.getsize(path) - 8:
        return {}
      header = json.loads(f.read(n))
  except (OSError, ValueError):
    return {}
  meta = header.get("__metadata__") if isinstance(header, dict) else None
  return meta if isinstance(meta, dict) else {}


def _adapter_configs(path: str) -> dict[str, dict]:
  """PEFT adapter configs per component, from the safetensors metadata diffusers writes (keys
  `unet.lora_alpha`, ... or unprefixed) or from an `adapter_config.json` beside the file."""
  configs: dict[str, dict] = {}
  raw = _safetensors_metadata(path).get("lora_adapter_metadata")
  if raw:
    try:
      meta = json.loads(raw)
    except ValueError:
      meta = {}
    for key, value in (meta if isinstance(meta, dict) else {}).items():
      comp, dot, field = key.partition(".")
      if dot and comp in ("unet", "text_encoder", "text_encoder_2"):
        configs.setdefault(comp, {})[field] = value
      else:
        configs.setdefault("", {})[key] = value
  beside = os.path.join(os.path.dirname(path), "adapter_config.json")
  if os.path.isfile(beside):
    try:
      with open(beside, encoding="utf-8") as f:
        data = json.load(f)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{beside}: not valid JSON ({e})") from None
    if isinstance(data, dict):
      configs.setdefault("", data)
  return configs


def _load(source) -> tuple[str, dict[str, np.ndarray], dict[str, dict]]:
  if isinstance(source, Mapping):
    return "LoRA state dict", {k: np.asarray(v) for k, v in source.items()}, {}
  path = os.fspath(source)
  if os.path.isdir(path):
    found = [os.path.join(path, n) for n in _LORA_FILES if os.path.isfile(os.path.join(path, n))]
    if not found:
      raise CheckpointError(f"{path}: no LoRA file in this folder (looked for {', '.join(_LORA_FILES)})")
    path = found[0]
  return path, sources.read_state_dict(path), _adapter_configs(path)


def _config_scale(config: Mapping | None, module: str, rank: int) -> float:
  if not config or config.get("lora_alpha") is None:
    return 1.0
  alpha = float(config["lora_alpha"])
  for pattern, value in (config.get("alpha_pattern") or {}).items():
    if re.match(rf"(.*\.)?({pattern})$", module):  # PEFT's rule for pattern keys
      alpha = float(value)
      break
  return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _infer_unet_layout(names: Iterable[str]) -> dict | None:
  """The four config fields `ldm.unet_key_table` needs, read off diffusers module names."""
  names = list(names)
  levels = {int(m.group(1)) for n in names if (m := re.match(r"down_blocks\.(\d+)\.", n))}
  if not levels:
    return None
  n = max(levels) + 1
  lpb = len({m.group(1) for x in names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", x))})
  has = lambda prefix: any(x.startswith(prefix) for x in names)
  return dict(block_out_channels=[0] * n, layers_per_block=lpb,
              down_block_types=["CrossAttnDownBlock2D" if has(f"down_blocks.{i}.attentions.") else "DownBlock2D"
                                for i in range(n)],
              up_block_types=["CrossAttnUpBlock2D" if has(f"up_blocks.{i}.attentions.") else "UpBlock2D"
                              for i in range(n)])


def _ldm_names(names: set[str], config) -> dict[str, str]:
  """{LDM module name: diffusers module name} for the UNet modules the LDM numbering covers."""
  from vcjax.weights.ldm import diffusers_unet_to_ldm, unet_key_table
  try:
    config = config if config is not None else _infer_unet_layout(names)
    if config is None:
      return {}
    prefixes = {entry[1] for entry in unet_key_table(config)}
  except (CheckpointError, KeyError, AttributeError, TypeError):
    return {}
  covered = [n for n in names if any(n.startswith(p + ".") or n == p for p in prefixes)]
  try:
    renamed = diffusers_unet_to_ldm({n + ".weight": n for n in covered}, config)
  except CheckpointError:  # some name the table does not know: rename one at a time, skipping those
    renamed = {}
    for n in covered:
      try:
        renamed.update(diffusers_unet_to_ldm({n + ".weight": n}, config))
      except CheckpointError:
        pass
  return {k[:-len(".weight")]: v for k, v in renamed.items()}


class _Resolver:
  """Maps a file's module name (dotted or underscored) onto a target module name, or None."""

  def __init__(self, names: set[str] | None, ldm: Mapping[str, str] | None = None, clip_fallback=False):
    self.names = names
    self.dotted = dict(ldm or {})
    self.dotted.update({n: n for n in names or ()})
    self.under: dict[str, str | None] = {}
    for src, dst in self.dotted.items():
      u = src.replace(".", "_")
      self.under[u] = dst if self.under.get(u, dst) == dst else None  # None marks an ambiguous name
    self.clip_fallback = clip_fallback

  def __call__(self, name: str, underscored: bool) -> str | None:
    if underscored:
      if self.names is None and self.clip_fallback:
        m = _CLIP_KOHYA_RE.match(name)
        return f"text_model.encoder.layers.{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None
      return self.under.get(name)
    if self.names is None:  # nothing to check against: trust dotted names
      return name
    for cand in (name, _animatediff_rename(name)):
      if cand in self.dotted:
        return self.dotted[cand]
    return None


def _animatediff_rename(name: str) -> str:
  """Original AnimateDiff motion-module names -> diffusers UNetMotionModel names."""
  name = name.replace(".temporal_transformer.", ".")
  return re.sub(r"\.attention_blocks\.(\d+)(?=\.|$)", lambda m: f".attn{int(m.group(1)) + 1}", name)


def _split_key(key: str) -> tuple[str, bool, str, str, str | None] | None:
  """key -> (component, underscored, module name as in the file, role, flavour), or None if unknown."""
  rest = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
  component, underscored = "unet", False
  for prefix, comp, under in _PREFIXES:
    if rest.startswith(prefix):
      component, underscored, rest = comp, under, rest[len(prefix):]
      break
  m = _PROCESSOR_RE.match(rest)
  if m:
    proj = "to_out.0" if m.group(2) == "to_out" else m.group(2)
    return component, underscored, f"{m.group(1)}.{proj}", m.group(3), "proc"
  for suffix, role, flavour in _SUFFIXES:
    if rest.endswith(suffix) and len(rest) > len(suffix):
      return component, underscored, rest[:-len(suffix)], role, flavour
  return None


def _fail(where: str, what: str, keys: list[str]) -> CheckpointError:
  keys = sorted(keys)
  shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
  return CheckpointError(f"{where}: {len(keys)} {what}: {shown}")


def read_lora(source, module_names: set[str], *, config: Any = None,
              text_encoder_module_names: set[str] | None = None,
              adapter_config: Mapping | None = None) -> dict[str, dict[str, LoRAWeight]]:
  """Read a LoRA (file, PEFT/diffusers folder, or flat {key: array} dict) into
  {component: {target module name: LoRAWeight}}; components "unet" and "text_encoder" are always
  present (maybe empty), "text_encoder_2" when the file has one.

  module_names: the diffusers module names of the target UNet (`module_names(state_dict)`); every UNet
    LoRA must name one of them, directly, as an underscore (kohya) name, as an LDM name, or as an
    original AnimateDiff motion-module name.
  config: the UNet's config (block_out_channels, layers_per_block, down/up_block_types) for LDM names;
    read off `module_names` when None.
  text_encoder_module_names: as `module_names` for the text encoder; without it dotted names are kept
    as they are and kohya names resolve only for CLIP's encoder layers.
  adapter_config: a PEFT adapter config ({"lora_alpha", "alpha_pattern", "use_rslora"}) overriding what
    is found beside / inside the file.
  Raises CheckpointError listing unknown or unmatched keys, unpaired down/up and rank mismatches.
  """
  where, sd, configs = _load(source)
  if adapter_config is not None:
    configs = {"": dict(adapter_config)}
  names = set(module_names)
  resolvers = {"unet": _Resolver(names, _ldm_names(names, config)),
               "text_encoder": _Resolver(set(text_encoder_module_names) if text_encoder_module_names else None,
                                         clip_fallback=True),
               "text_encoder_2": _Resolver(None, clip_fallback=True)}
  parts: dict[tuple[str, str], dict[str, Any]] = {}
  unknown = []
  for key, value in sd.items():
    split = _split_key(key)
    target = split and resolvers[split[0]](split[2], split[1])
    if not target:
      unknown.append(key)
      continue
    entry = parts.setdefault((split[0], target), {})
    if split[3] in entry:
      raise CheckpointError(f"{where}: two LoRA keys give the {split[3]} of {split[0]} module {target!r} "
                            f"(one is {key!r})")
    entry[split[3]] = value
    if split[4]:
      entry["flavour"] = split[4]
    entry.setdefault("keys", []).append(key)
  if unknown:
    raise _fail(where, "LoRA keys in no known format or naming no module of the target model", unknown)
  out: dict[str, dict[str, LoRAWeight]] = {"unet": {}, "text_encoder": {}}
  for (component, target), entry in sorted(parts.items()):
    if "down" not in entry or "up" not in entry:
      raise _fail(where, f"LoRA keys without their {'up' if 'down' in entry else 'down'} matrix",
                  entry["keys"])
    down, up = np.asarray(entry["down"]), np.asarray(entry["up"])
    rank = down.shape[0]
    if (down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != rank
        or (up.ndim == 4 and up.shape[2:] != (1, 1))):
      raise CheckpointError(f"{where}: LoRA of {target!r} has down {down.shape} and up {up.shape}, which "
                            "do not form up @ down")
    if "alpha" in entry:
      scale = float(np.asarray(entry["alpha"], np.float64).reshape(())) / rank
    elif entry.get("flavour") == "peft":
      scale = _config_scale(configs.get(component, configs.get("")), target, rank)
    else:
      scale = 1.0
    out.setdefault(component, {})[target] = LoRAWeight(down=down, up=up, scale=scale)
  return out


# ----------------------------------------------------------------------------- merging


def merge_lora(state_dict: Mapping[str, Any], loras: Mapping[str, LoRAWeight],
               scale: float = 1.0) -> dict[str, Any]:
  """A new state dict with `<module>.weight += scale * lw.scale * up @ down` for every LoRA.

  The sum is formed in float32 and cast back to the weight's dtype; entries without a LoRA are the
  same objects as in `state_dict`. A linear LoRA on a 1x1 conv (or the reverse) merges by reshape.
  """
  missing = [m for m in loras if m + ".weight" not in state_dict]
  if missing:
    raise _fail("merge_lora", "LoRA targets without a `.weight` in the state dict", missing)
  out = dict(state_dict)
  for module, lw in loras.items():
    key = module + ".weight"
    w = np.asarray(state_dict[key])
    delta = lw.delta()
    if w.ndim < 2 or delta.shape != (w.shape[0], int(np.prod(w.shape[1:]))):
      raise CheckpointError(f"merge_lora: LoRA of {module!r} gives a {delta.shape} update for a weight of "
                            f"shape {w.shape}")
    merged = w.astype(np.float32) + np.float32(scale * lw.scale) * delta.reshape(w.shape)
    out[key] = merged.astype(w.dtype)
  return out


# ----------------------------------------------------------------------------- layout


def to_flax(lw: LoRAWeight) -> tuple[np.ndarray, np.ndarray]:
  """PyTorch layout -> vcjax's: (down (in, r), up (r, out)) float32, `lw.scale` folded into up. A 1x1-conv
  LoRA is a linear one; other convs stay 4-D (they cannot apply at run time; merge them)."""
  down, up = np.asarray(lw.down, np.float32), np.asarray(lw.up, np.float32)
  if down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4 and up.shape[2:] == (1, 1):
    down, up = down[:, :, 0, 0], up[:, :, 0, 0]
  if down.ndim != 2 or up.ndim != 2:
    return down, up
  return down.T, up.T * np.float32(lw.scale)


def to_torch(down, up, *, scale: float = 1.0, conv: bool = False) -> LoRAWeight:
  """vcjax layout -> PyTorch's: down (in, r) / up (r, out) -> LoRAWeight(down (r, in), up (out, r)), with
  `scale` multiplied into up (LoRAWeight.scale 1); conv: as a 1x1-conv LoRA (r, in, 1, 1) / (out, r, 1, 1)."""
  down_t = np.ascontiguousarray(np.asarray(down, np.float32).T)
  up_t = np.ascontiguousarray(np.asarray(up, np.float32).T * np.float32(scale))
  if conv:
    down_t, up_t = down_t[:, :, None, None], up_t[:, :, None, None]
  return LoRAWeight(down=down_t, up=up_t, scale=1.0)


# ----------------------------------------------------------------------------- run time (unmerged)


def load_lora(model: nnx.Module, loras: Mapping[str, LoRAWeight], *, scale: float = 1.0, replace: bool = False,
              dtype=None) -> list[str]:
  """Attach LoRAs read from a file to `model`, unmerged (vcjax.nn.lora.attach_loras). Returns the sorted vcjax
  paths.

  loras: {module name: LoRAWeight} as `read_lora(...)["unet"]` or `read_vcjax_lora(path)` give (diffusers or
    vcjax names; PyTorch layout; `.scale` = the file's alpha/rank, folded into lora_up). `scale` becomes
    every layer's run-time LoRAScale.
  replace: allow replacing a LoRA already on a layer (else that is an error).
  """
  adapters = {keymaps.vcjax_name(name): to_flax(lw) for name, lw in loras.items()}
  kwargs = {} if dtype is None else {"dtype": dtype}
  return nn_lora.attach_loras(model, adapters, scale=scale, replace=replace, **kwargs)


def load_lora_file(model: nnx.Module, path: str, *, scale: float = 1.0, replace: bool = False) -> list[str]:
  """Read a LoRA file of any flavour vcjax knows (its own `save_lora` format, diffusers/PEFT, kohya,
  AnimateDiff processor LoRAs) and attach its UNet part to `model` unmerged (see `load_lora`)."""
  if is_vcjax_lora(path):
    loras = read_vcjax_lora(path)
  else:
    names = module_names(keymaps.torch_shapes(model))
    loras = read_lora(path, names, config=getattr(model, "config", None))["unet"]
  if not loras:
    raise nn_lora.LoRAError(f"{path}: holds no LoRA for this model")
  return load_lora(model, loras, scale=scale, replace=replace)


def lora_weights(model: nnx.Module, *, fold_scale: bool = True) -> dict[str, LoRAWeight]:
  """The model's attached LoRAs as {diffusers module name: LoRAWeight} in PyTorch layout (1x1-conv shaped where
  the PyTorch model has a conv), ready for `merge_lora` or a file. fold_scale: each layer's current LoRAScale
  multiplied into `up` (else left out: the matrices as trained)."""
  found = nn_lora.lora_arrays(model)
  if not found:
    raise CheckpointError("the model carries no LoRA to export (attach one with vcjax.nn.lora.add_lora or "
                          "vcjax.weights.lora_files.load_lora)")
  config = getattr(model, "config", None)
  return {keymaps.diffusers_name(path): to_torch(down, up, scale=s if fold_scale else 1.0,
                                                 conv=keymaps.is_torch_conv_1x1(path, config))
          for path, (down, up, s) in found.items()}


# ----------------------------------------------------------------------------- writing


def lora_to_peft(model: nnx.Module, *, prefix: str = "unet", fold_scale: bool = True
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict, PEFT adapter config) of the model's LoRAs in diffusers' format:
  `<prefix>.<diffusers module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r); lora_alpha = r."""
  weights = lora_weights(model, fold_scale=fold_scale)
  head = f"{prefix}." if prefix else ""
  sd, ranks = {}, {}
  for name, lw in weights.items():
    sd[f"{head}{name}.lora_A.weight"] = lw.down
    sd[f"{head}{name}.lora_B.weight"] = lw.up
    ranks[name] = lw.rank
  r = Counter(ranks.values()).most_common(1)[0][0]
  pattern = {n: k for n, k in ranks.items() if k != r}
  config = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(weights), "lora_dropout": 0.0, "bias": "none", "use_dora": False,
            "use_rslora": False, "init_lora_weights": True}
  return sd, config


def save_lora_peft(model: nnx.Module, path: str, *, prefix: str = "unet", fold_scale: bool = True) -> str:
  """Write the model's LoRAs as diffusers' `save_lora_weights` does (a folder gets
  pytorch_lora_weights.safetensors; a *.safetensors path is used as is). The adapter config goes into the
  safetensors metadata (`lora_adapter_metadata`, keys prefixed with `prefix.`). Returns the file."""
  sd, config = lora_to_peft(model, prefix=prefix, fold_scale=fold_scale)
  meta = {f"{prefix}.{k}" if prefix else k: v for k, v in config.items()}
  file = sources.weights_file(path, PEFT_WEIGHT_NAME)
  sources.save_safetensors(sd, file, metadata={"format": "pt",
                                               "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)})
  return file


def lora_to_kohya(model: nnx.Module, *, prefix: str = "lora_unet_", fold_scale: bool = True) -> dict[str, np.ndarray]:
  """kohya-ss names: `lora_unet_<diffusers module, "." -> "_">.lora_down.weight` / `.lora_up.weight` /
  `.alpha` (= rank, so alpha / rank = 1)."""
  sd = {}
  for name, lw in lora_weights(model, fold_scale=fold_scale).items():
    key = prefix + name.replace(".", "_")
    sd[f"{key}.lora_down.weight"] = lw.down
    sd[f"{key}.lora_up.weight"] = lw.up
    sd[f"{key}.alpha"] = np.asarray(lw.rank, np.float32)
  return sd


def save_lora_kohya(model: nnx.Module, path: str, *, fold_scale: bool = True) -> str:
  sd = lora_to_kohya(model, fold_scale=fold_scale)
  ranks = sorted({int(v.shape[0]) for k, v in sd.items() if k.endswith(".lora_down.weight")})
  file = sources.weights_file(path, "lora.safetensors")
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
  file = sources.weights_file(path, "lora.safetensors")
  sources.save_safetensors(sd, file, metadata={"format": VCJAX_LORA_FORMAT,
                                               "rank": ",".join(map(str, ranks))})
  return file


def is_vcjax_lora(path: str) -> bool:
  """Whether `path` is a safetensors file written by `save_lora` (its metadata says format=vcjax-lora)."""
  return os.path.isfile(path) and _safetensors_metadata(os.fspath(path)).get("format") == VCJAX_LORA_FORMAT


def read_vcjax_lora(path: str) -> dict[str, LoRAWeight]:
  """A file written by `save_lora` -> {diffusers module name: LoRAWeight(down (r, in), up (out, r), 1.0)},
  the form of `read_lora(...)["unet"]`: pass it to `load_lora` or `merge_lora`."""
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
    out[keymaps.diffusers_name(module)] = to_torch(down, up)
  return out
