"""Read weight files into flat `{name: np.ndarray}` dicts: safetensors, torch pickles, diffusers folders.

Nothing here imports torch: .ckpt / .pt / .pth / .bin go through the restricted unpickler in
`pickle_safe`, and safetensors are parsed directly (8-byte little-endian header length, a JSON
header `{name: {dtype, shape, data_offsets}}`, then the raw little-endian data), which also covers
dtypes numpy lacks (bf16, fp8) via ml_dtypes. Every failure is a one-line CheckpointError naming
the file.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import ml_dtypes
import numpy as np

from vcjax.weights.errors import CheckpointError
from vcjax.weights.pickle_safe import load_torch_pickle

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "C64": np.complex64,
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
  _ST_DTYPES["F8_E8M0"] = ml_dtypes.float8_e8m0fnu
_ST_DTYPES = {k: np.dtype(v) for k, v in _ST_DTYPES.items()}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}

# Wrappers training code puts around a state dict, in the order they are looked for.
_WRAPPER_KEYS = ("state_dict", "module", "model")

# diffusers (`diffusion_pytorch_model`) and transformers (`model`, `pytorch_model`) weight names.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def _one_line(text) -> str:
  return " ".join(str(text).split())


# ----------------------------------------------------------------------------- safetensors


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  def bad(why):
    return CheckpointError(f"{path}: corrupt safetensors file ({why})")

  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise bad("shorter than the 8-byte header length")
      header_len = int.from_bytes(head, "little")
      if header_len > size - 8:
        raise bad(f"header of {header_len} bytes does not fit in a {size}-byte file; truncated?")
      try:
        header = json.loads(f.read(header_len))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON: {_one_line(e)}") from None
      if not isinstance(header, dict):
        raise bad("header is not a JSON object")
      header.pop("__metadata__", None)
      base = 8 + header_len
      entries = []
      for name, info in header.items():
        try:
          dtype = _ST_DTYPES[info["dtype"]]
          shape = tuple(int(d) for d in info["shape"])
          begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
          raise bad(f"bad header entry for {name!r}") from None
        if min(shape, default=0) < 0 or begin < 0 or end - begin != int(np.prod(shape)) * dtype.itemsize:
          raise bad(f"offsets of {name!r} do not match its shape {shape} and dtype {info['dtype']}")
        if base + end > size:
          raise bad(f"tensor {name!r} ends at byte {base + end} of a {size}-byte file; truncated?")
        entries.append((begin, name, dtype, shape, end - begin))
      out = {}
      for begin, name, dtype, shape, nbytes in sorted(entries, key=lambda e: e[0]):
        buf = bytearray(nbytes)
        f.seek(base + begin)
        if f.readinto(buf) != nbytes:
          raise bad(f"tensor {name!r} is truncated")
        out[name] = np.frombuffer(buf, dtype).reshape(shape)
      return out
  except CheckpointError:
    raise
  except FileNotFoundError:
    raise CheckpointError(f"{path}: no such file") from None
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read ({_one_line(e)})") from e


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
  """Write numpy (or jax) arrays as a .safetensors file; bf16 / fp8 included. Atomic (temp + rename)."""
  path = os.fspath(path)
  arrays = {}
  for name, value in state_dict.items():
    arr = np.asarray(value)
    arr = np.ascontiguousarray(arr).reshape(arr.shape)  # ascontiguousarray alone makes a 0-d array 1-d
    if arr.dtype not in _ST_CODES:
      raise CheckpointError(f"{path}: cannot store {name!r} of dtype {arr.dtype} in safetensors")
    arrays[str(name)] = arr
  header: dict[str, object] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  # Widest dtypes first, so every tensor starts aligned to its item size (what readers that map
  # the file expect; the header is padded to a multiple of 8).
  order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
  for name in order:
    arr = arrays[name]
    header[name] = {"dtype": _ST_CODES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name in order:
      f.write(arrays[name].tobytes())
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- single files


def weights_file(path: str | os.PathLike, default_name: str) -> str:
  """Where to write weights: `path` itself if it names a *.safetensors file (its folder created), else
  `path/default_name` (the folder created)."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return path
  os.makedirs(path, exist_ok=True)
  return os.path.join(path, default_name)


def _is_safetensors(path: str) -> bool:
  if path.endswith(".safetensors"):
    return True
  with open(path, "rb") as f:
    head = f.read(9)
  # torch files start with a zip signature or a pickle PROTO opcode; safetensors with a JSON header.
  return len(head) == 9 and head[8:9] == b"{" and not head.startswith((b"PK", b"\x80"))


def _unwrap(obj):
  while isinstance(obj, Mapping):
    inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj = inner
  return obj


def _array_leaves(tree: Mapping, prefix: str, out: dict[str, np.ndarray]) -> None:
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, np.ndarray):
      out[name] = value
    elif isinstance(value, Mapping):  # e.g. {"image_proj": {...}, "ip_adapter": {...}}
      _array_leaves(value, name + ".", out)


def _is_float(dtype: np.dtype) -> bool:
  return dtype.kind == "f" or dtype in (np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn),
                                        np.dtype(ml_dtypes.float8_e5m2))


def _as_dtype(dtype) -> np.dtype:
  if isinstance(dtype, str) and hasattr(ml_dtypes, dtype):
    return np.dtype(getattr(ml_dtypes, dtype))
  return np.dtype(dtype)


def read_state_dict(path: str | os.PathLike, dtype=None) -> dict[str, np.ndarray]:
  """Flat `{name: array}` from a .safetensors or a torch pickle (.ckpt/.pt/.pth/.bin).

  A pickle's nested `state_dict` / `module` / `model` wrapper is unwrapped, nested dicts of tensors
  are flattened with "." and non-array entries (epoch counters, configs) are dropped. With `dtype`,
  floating arrays are cast to it; integer / bool buffers (position_ids, step counters) are kept.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  if os.path.isdir(path):
    raise CheckpointError(f"{path}: is a folder; read diffusers folders with read_diffusers_component")
  try:
    safetensors = _is_safetensors(path)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read ({_one_line(e)})") from e
  if safetensors:
    state = _read_safetensors(path)
  else:
    obj = _unwrap(load_torch_pickle(path))
    if not isinstance(obj, Mapping):
      raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    state = {}
    _array_leaves(obj, "", state)
    if not state:
      keys = ", ".join(map(str, list(obj)[:8]))
      raise CheckpointError(f"{path}: holds no tensors (top-level keys: {keys or 'none'})")
  if dtype is not None:
    target = _as_dtype(dtype)
    state = {k: v.astype(target) if _is_float(v.dtype) and v.dtype != target else v
             for k, v in state.items()}
  return state


def split_by_prefix(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """Entries whose key starts with `prefix`, prefix removed (LDM single files: `model.diffusion_model.`,
  `first_stage_model.`, `cond_stage_model.transformer.`)."""
  return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- diffusers folders


def is_diffusers_folder(path: str | os.PathLike) -> bool:
  """A diffusers pipeline folder: has model_index.json or unet/config.json."""
  path = os.fspath(path)
  return os.path.isfile(os.path.join(path, "model_index.json")) or os.path.isfile(
      os.path.join(path, "unet", "config.json"))


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: no such file") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({_one_line(e)})") from None
  if not isinstance(data, dict):
    raise CheckpointError(f"{path}: not a JSON object")
  return data


def _weight_candidates() -> list[str]:
  """File names diffusers / transformers save weights under, most preferred first: safetensors before
  pickles, full precision before the fp16 variant, a single file before a sharded index."""
  names = []
  for ext in ("safetensors", "bin"):
    for variant in ("", ".fp16"):
      for stem in _WEIGHT_STEMS:
        names.append(f"{stem}{variant}.{ext}")
        names.append(f"{stem}.{ext}.index{variant}.json")
  return names


def _read_sharded(index_path: str, dtype) -> dict[str, np.ndarray]:
  weight_map = _read_json(index_path).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise CheckpointError(f"{index_path}: sharded index without a weight_map")
  folder = os.path.dirname(index_path)
  state = {}
  for shard in sorted(set(map(str, weight_map.values()))):
    state.update(read_state_dict(os.path.join(folder, shard), dtype))
  missing = [k for k in weight_map if k not in state]
  if missing:
    raise CheckpointError(f"{index_path}: {len(missing)} tensors listed in the index are missing from "
                          f"the shards (first: {missing[0]!r})")
  return state


def read_diffusers_component(folder: str | os.PathLike, component: str,
                             dtype=None) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json contents, flat state dict) of `folder/component` (e.g. "unet", "vae", "text_encoder").

  Weights: diffusion_pytorch_model / model / pytorch_model as .safetensors or .bin, the .fp16
  variants, or a sharded `*.index.json`; safetensors preferred, full precision preferred.
  """
  folder = os.fspath(folder)
  root = os.path.join(folder, component)
  if not os.path.isdir(root):
    found = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))) \
        if os.path.isdir(folder) else []
    raise CheckpointError(f"{root}: no such component folder (found: {', '.join(found) or 'none'})")
  config = _read_json(os.path.join(root, "config.json"))
  for name in _weight_candidates():
    path = os.path.join(root, name)
    if os.path.isfile(path):
      state = _read_sharded(path, dtype) if name.endswith(".json") else read_state_dict(path, dtype)
      return config, state
  raise CheckpointError(f"{root}: no weights found (looked for diffusion_pytorch_model / model / "
                        "pytorch_model .safetensors or .bin, their .fp16 variants and sharded indexes)")
