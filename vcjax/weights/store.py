"""vcjax's own on-disk format for converted models: a folder with `config.json` and one
`<component>.safetensors` per model whose keys are vcjax parameter paths (`down_blocks.0.resnets.0.conv1.kernel`)
in flax layout, so loading is a plain read with no renaming or transposing."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from vcjax.weights import sources
from vcjax.weights.errors import CheckpointError
from vcjax.weights.keymaps import _summary

CONFIG_FILE = "config.json"


def flat_params(module: nnx.Module) -> dict[str, np.ndarray]:
  return {".".join(str(p) for p in path): np.asarray(var.get_value())
          for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def set_params(module: nnx.Module, params: dict[str, Any], *, dtype=None, what: str = "model") -> nnx.Module:
  """Fill `module` (possibly abstract, from nnx.eval_shape) with `params` keyed by vcjax paths; strict."""
  flat = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
  names = {".".join(str(p) for p in path): path for path in flat}
  missing = sorted(set(names) - set(params))
  unexpected = sorted(set(params) - set(names))
  wrong = [f"{k} {tuple(np.shape(params[k]))} != {tuple(flat[names[k]].get_value().shape)}"
           for k in sorted(set(names) & set(params))
           if tuple(np.shape(params[k])) != tuple(flat[names[k]].get_value().shape)]
  problems = [_summary(t, ks) for t, ks in (("missing", missing), ("unexpected", unexpected),
                                            ("wrongly shaped", wrong)) if ks]
  if problems:
    raise CheckpointError(f"{what}: parameters do not fit: " + "; ".join(problems))
  # Cast on the host and transfer in one call: an eager device-side cast compiles a tiny XLA program per
  # shape, and one transfer per array adds up; either costs seconds per load of a small model.
  dtype = None if dtype is None else jax.numpy.dtype(dtype)  # "bfloat16" too (numpy alone lacks the name)
  host = [np.asarray(params[name]).astype(dtype or flat[path].get_value().dtype, copy=False)
          for name, path in names.items()]
  for path, value in zip(names.values(), jax.device_put(host)):
    flat[path].set_value(value)
  nnx.update(module, nnx.from_flat_state(flat))
  return module


def save_component(folder: str, name: str, module: nnx.Module) -> str:
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{name}.safetensors")
  sources.save_safetensors(flat_params(module), path)
  return path


def write_config(folder: str, config: dict[str, Any]) -> None:
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)


def read_config(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{folder}: not a converted vcjax model (no {CONFIG_FILE}); "
                          "create one with convert/animatediff.py")
  with open(path) as f:
    return json.load(f)


def read_component(folder: str, name: str) -> dict[str, np.ndarray]:
  path = os.path.join(folder, f"{name}.safetensors")
  if not os.path.isfile(path):
    raise CheckpointError(f"{folder}: the converted model has no {name} ({name}.safetensors missing)")
  return sources.read_state_dict(path)
