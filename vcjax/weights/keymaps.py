"""Put a flat, diffusers-named PyTorch state dict into a vcjax (NNX) module, and back.

vcjax modules use diffusers' attribute names, so the mapping from a diffusers key to a vcjax parameter
is mechanical:
  * module path: a few renames where a diffusers name is not a valid attribute (`to_out.0` -> `to_out`,
    `ff.net.0.proj` -> `ff.proj_in`, `ff.net.2` -> `ff.proj_out`): `MODULE_RENAMES`, the one table
    (LoRA names go through it too: `vcjax_name` / `diffusers_name`);
  * parameter: `weight` -> `kernel` (linear/conv), `scale` (norms) or `embedding` (embeddings),
    `bias` -> `bias`;
  * layout: conv OIHW -> HWIO, linear (out, in) -> (in, out); 1x1 convs and linears convert into each
    other (LDM checkpoints store some linears as 1x1 convs).
Other checkpoint flavours (LDM single files, original AnimateDiff motion modules) are first renamed
into diffusers names by the modules that read them.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax.weights.errors import CheckpointError

# (diffusers module name, vcjax module name) where a diffusers name is not a valid attribute name.
MODULE_RENAMES = (("to_out.0", "to_out"), ("ff.net.0.proj", "ff.proj_in"), ("ff.net.2", "ff.proj_out"))
_TO_VCJAX = tuple((re.compile(r"\." + re.escape(d) + r"(?=\.|$)"), "." + v) for d, v in MODULE_RENAMES)
_TO_DIFFUSERS = tuple((re.compile(r"\." + re.escape(v) + r"(?=\.|$)"), "." + d) for d, v in MODULE_RENAMES)

_WEIGHT_NAMES = ("kernel", "scale", "embedding")
# SpatialTransformer proj_in/proj_out: 1x1 convs in PyTorch unless use_linear_projection.
_SPATIAL_PROJ = re.compile(r"(^|\.)attentions\.\d+\.proj_(in|out)$")


def vcjax_name(name: str) -> str:
  """diffusers module name -> vcjax module path (vcjax paths pass through unchanged)."""
  n = "." + name
  for pattern, repl in _TO_VCJAX:
    n = pattern.sub(repl, n)
  return n[1:]


def diffusers_name(path: str) -> str:
  """vcjax module path -> diffusers module name (`to_out` -> `to_out.0`, `ff.proj_in` -> `ff.net.0.proj`)."""
  n = "." + path
  for pattern, repl in _TO_DIFFUSERS:
    n = pattern.sub(repl, n)
  return n[1:]


def is_torch_conv_1x1(module_path: str, config: Any) -> bool:
  """Whether the PyTorch model has a 1x1 conv where vcjax has the Linear `module_path` (a SpatialTransformer's
  proj_in/proj_out when the UNet config's `use_linear_projection` is False, as in SD1.5)."""
  return (config is not None and not getattr(config, "use_linear_projection", True)
          and bool(_SPATIAL_PROJ.search(module_path)))


def module_param_shapes(module: nnx.Module) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
  """'a.0.b.kernel' -> (shape, dtype) for every nnx.Param of `module`."""
  state = nnx.state(module, nnx.Param)
  out = {}
  for path, var in nnx.to_flat_state(state):
    value = var.get_value()
    out[".".join(str(p) for p in path)] = (tuple(value.shape), value.dtype)
  return out


def to_flax_layout(array: np.ndarray, target_shape: tuple[int, ...], *, name: str = "") -> np.ndarray:
  """Transpose a PyTorch weight into the flax layout of `target_shape` (or fail on a mismatch).

  name: the target parameter's name; an `embedding` table is (num, dim) in both frameworks, so it is
  never transposed (a square table would otherwise load silently transposed).
  """
  a = np.asarray(array)
  if name == "embedding":
    pass
  elif a.ndim == 4 and len(target_shape) == 4:
    a = a.transpose(2, 3, 1, 0)
  elif a.ndim == 4 and len(target_shape) == 2 and a.shape[2:] == (1, 1):
    a = a[:, :, 0, 0].T
  elif a.ndim == 2 and len(target_shape) == 4 and target_shape[:2] == (1, 1):
    a = a.T[None, None]
  elif a.ndim == 2 and len(target_shape) == 2:
    a = a.T
  if tuple(a.shape) != tuple(target_shape):
    raise ValueError(f"shape {tuple(array.shape)} does not fit {tuple(target_shape)}")
  return a


def to_torch_layout(array: np.ndarray, torch_shape: tuple[int, ...], *, name: str = "") -> np.ndarray:
  """Inverse of `to_flax_layout`: a vcjax array back into the PyTorch layout `torch_shape`."""
  a = np.asarray(array)
  if name == "embedding":
    pass
  elif a.ndim == 4 and len(torch_shape) == 4:
    a = a.transpose(3, 2, 0, 1)
  elif a.ndim == 2 and len(torch_shape) == 4:
    a = a.T[:, :, None, None]
  elif a.ndim == 4 and len(torch_shape) == 2:
    a = a[0, 0].T
  elif a.ndim == 2 and len(torch_shape) == 2:
    a = a.T
  return a.reshape(torch_shape)


def _summary(title: str, keys: list[str], limit: int = 8) -> str:
  shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
  return f"{len(keys)} {title}: {shown}"


def diffusers_key_to_path(key: str, targets: Mapping[str, object]) -> str:
  """The vcjax parameter path a diffusers key maps to ('' if its param name has no target)."""
  module_path, _, name = key.rpartition(".")
  module_path = vcjax_name(module_path)
  if name == "weight":
    for candidate in _WEIGHT_NAMES:
      if f"{module_path}.{candidate}" in targets:
        return f"{module_path}.{candidate}"
    return f"{module_path}.kernel"
  return f"{module_path}.{name}"


def load_state_dict(module: nnx.Module, state_dict: Mapping[str, np.ndarray], *, strict: bool = True,
                    ignore: Iterable[str] = (), dtype=None, what: str = "model") -> nnx.Module:
  """Copy a diffusers-named state dict into `module` (in place; also returned).

  strict: every module parameter must be given and every key used; otherwise only the keys that match
  are loaded (VideoMaker applies a full UNet over a base that way) and unknown keys are ignored.
  ignore: regexes of source keys that are buffers vcjax recomputes (e.g. positional encodings).
  dtype: cast every loaded array to this dtype (default: the module parameter's dtype).
  Raises CheckpointError listing the first few missing / unexpected / mis-shaped keys with counts.
  """
  targets = module_param_shapes(module)
  ignore_res = [re.compile(p) for p in ignore]
  values, unexpected, mismatched, mismatched_paths = {}, [], [], set()
  for key, array in state_dict.items():
    if any(r.search(key) for r in ignore_res):
      continue
    path = diffusers_key_to_path(key, targets)
    if path not in targets:
      unexpected.append(key)
      continue
    shape, param_dtype = targets[path]
    try:  # a view in flax layout; copied (and cast) only when assigned, one tensor at a time
      values[path] = (to_flax_layout(array, shape, name=path.rpartition(".")[2]), dtype or param_dtype)
    except ValueError as e:
      mismatched.append(f"{key} {e}")
      mismatched_paths.add(path)
  missing = sorted(set(targets) - set(values) - mismatched_paths)
  problems = []
  if mismatched:
    problems.append(_summary("wrongly shaped", mismatched))
  if strict and missing:
    problems.append(_summary("missing", missing))
  if strict and unexpected:
    problems.append(_summary("unexpected", sorted(unexpected)))
  if problems:
    raise CheckpointError(f"{what} weights do not fit: " + "; ".join(problems))
  if not values:
    raise CheckpointError(f"{what} weights: no key of the checkpoint matches the model")
  state = nnx.state(module, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  for path, var in flat.items():
    name = ".".join(str(p) for p in path)
    if name in values:
      array, target_dtype = values.pop(name)
      var.set_value(jnp.asarray(np.asarray(array, dtype=target_dtype)))
  nnx.update(module, nnx.from_flat_state(flat))
  return module


def torch_shapes(model: nnx.Module, config=None) -> dict[str, tuple[int, ...]]:
  """{diffusers key: PyTorch shape} of every nnx.Param of a vcjax model (kernels HWIO -> OIHW, linear
  (in, out) -> (out, in), SpatialTransformer proj_in/out -> (out, in, 1, 1) unless use_linear_projection).
  Buffers (the motion modules' pe) are not params; see `vcjax.weights.export.motion_pe_buffers`."""
  config = config if config is not None else getattr(model, "config", None)
  out = {}
  for path, (shape, _) in module_param_shapes(model).items():
    module, _, name = path.rpartition(".")
    key = diffusers_name(module) + (".bias" if name == "bias" else ".weight")
    if name == "kernel" and len(shape) == 4:
      out[key] = (shape[3], shape[2], shape[0], shape[1])
    elif name == "kernel" and len(shape) == 2:
      out[key] = (shape[1], shape[0], 1, 1) if is_torch_conv_1x1(module, config) else (shape[1], shape[0])
    else:
      out[key] = tuple(shape)
  return out


def export_state_dict(module: nnx.Module, torch_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """vcjax params -> diffusers-named numpy arrays in PyTorch layout, for the keys of `torch_shapes`."""
  targets = module_param_shapes(module)
  params = {".".join(str(p) for p in path): np.asarray(var.get_value())
            for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  out = {}
  for key, shape in torch_shapes.items():
    path = diffusers_key_to_path(key, targets)
    if path in params:
      out[key] = to_torch_layout(params[path], shape, name=path.rpartition(".")[2])
  return out
