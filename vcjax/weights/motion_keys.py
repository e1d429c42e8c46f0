"""AnimateDiff motion modules: original checkpoint names -> diffusers names, and version detection.

Original (guoyww/AnimateDiff) keys:
  down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight
  ...norms.0.weight, ...ff.net.0.proj.weight, ...ff_norm.weight, ...pos_encoder.pe
diffusers (MotionAdapter / UNetMotionModel) keys drop `.temporal_transformer` and rename
norms.0/1 -> norm1/2, ff_norm -> norm3, attention_blocks.0/1 -> attn1/2; pe lives in pos_embed.pe.
vcjax computes the positional encoding, so `pe` buffers are only read to learn the encoding length.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from vcjax.weights.errors import CheckpointError

_ORIGINAL_RENAMES = (
    (r"\.temporal_transformer\.", "."),
    (r"\.attention_blocks\.0\.", ".attn1."),
    (r"\.attention_blocks\.1\.", ".attn2."),
    (r"\.norms\.0\.", ".norm1."),
    (r"\.norms\.1\.", ".norm2."),
    (r"\.ff_norm\.", ".norm3."),
    (r"\.pos_encoder\.pe$", ".pos_embed.pe"),
)
PE_KEY = re.compile(r"pos_(?:encoder|embed)\.pe$")


def is_original_motion_module(sd: Mapping[str, Any]) -> bool:
  return any(".temporal_transformer." in k for k in sd)


def original_motion_to_diffusers(sd: Mapping[str, Any]) -> dict[str, Any]:
  """Rename an original motion-module state dict (also motion LoRA targets) to diffusers names."""
  out = {}
  for key, value in sd.items():
    k = "." + key
    for pattern, repl in _ORIGINAL_RENAMES:
      k = re.sub(pattern, repl, k)
    out[k[1:]] = value
  return out


def motion_info(sd: Mapping[str, Any]) -> dict[str, Any]:
  """What the weights tell about a motion module (diffusers names): pe length, mid block, depth."""
  motion_keys = [k for k in sd if ".motion_modules." in k or k.startswith("mid_block.motion_modules.")]
  if not motion_keys:
    raise CheckpointError("no motion-module weights found (no key contains 'motion_modules')")
  pe_lengths = {int(np.shape(sd[k])[-2]) for k in motion_keys if PE_KEY.search(k)}
  depth = 1 + max(int(m.group(1)) for k in motion_keys
                  if (m := re.search(r"transformer_blocks\.(\d+)\.", k)))
  return dict(max_seq_length=max(pe_lengths) if pe_lengths else None,
              mid_block=any(k.startswith("mid_block.motion_modules.") for k in motion_keys),
              layers=depth)


def detect_version(info: Mapping[str, Any]) -> str:
  """v2 has a mid-block motion module; v1 a 24-frame encoding; v3 neither."""
  if info["mid_block"]:
    return "v2"
  if info.get("max_seq_length") == 24:
    return "v1"
  return "v3"
