"""Token-embedding files (learned text tokens such as CustomCrafter's "<new1>") -> `{token: (D,) float32}`.

Formats read, torch-free (pickles through the restricted unpickler of `vcjax.weights.pickle_safe`):

  * vcjax's own `token_embedding.safetensors` (what train.py writes to `WORKDIR/final/`): `{token: (D,)}`,
    one entry per learned token;
  * diffusers' textual inversion (`learned_embeds.safetensors` / `learned_embeds.bin`): `{token: (D,)}` or
    `{token: (n, D)}` -- vcjax's files are diffusers-loadable as they are (`pipe.load_textual_inversion`);
  * A1111 embeddings (`.pt` / `.bin`: `{"string_to_param": {"*": (n, D)}, "name": ..., ...}`; `.safetensors`
    or `.pt` with `{"emb_params": (n, D)}`), named by their `name` entry, else by the file name;
  * a bare tensor `(D,)` / `(n, D)` pickled on its own (then `token` must be given).

A multi-vector embedding `(n, D)` becomes the tokens `name`, `name_1`, ..., `name_{n-1}`, as diffusers'
`load_textual_inversion` names them (prompts then spell `name` as all n tokens: see
`vcjax.models.new_tokens.expand_prompt`).
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from vcjax.weights import sources
from vcjax.weights.errors import CheckpointError
from vcjax.weights.pickle_safe import load_torch_pickle

TOKEN_EMBEDDING_NAME = "token_embedding.safetensors"  # what train.py writes beside the LoRA in WORKDIR/final/
_A1111_KEYS = ("string_to_param", "emb_params")


def token_file_beside(lora_path: str | os.PathLike) -> str | None:
  """The `token_embedding.safetensors` in the LoRA file's folder (or in the folder given), None if absent."""
  path = os.fspath(lora_path)
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  found = os.path.join(folder, TOKEN_EMBEDDING_NAME)
  return found if os.path.isfile(found) else None


def _vectors(path: str, name: str, value) -> np.ndarray:
  arr = np.asarray(value)
  if arr.ndim == 1:
    arr = arr[None]
  if arr.ndim != 2 or arr.shape[0] == 0 or arr.dtype.kind not in "fV":
    raise CheckpointError(f"{path}: embedding of {name!r} has shape {arr.shape} and dtype {arr.dtype}; "
                          "expected floats (D,) or (n, D)")
  return arr.astype(np.float32)


def _expand(path: str, entries: list[tuple[str, object]]) -> dict[str, np.ndarray]:
  """[(name, (D,) or (n, D))] -> {name: row, name_1: row, ...} (diffusers' multi-vector naming)."""
  out: dict[str, np.ndarray] = {}
  for name, value in entries:
    rows = _vectors(path, name, value)
    for i, row in enumerate(rows):
      token = name if i == 0 else f"{name}_{i}"
      if token in out:
        raise CheckpointError(f"{path}: token {token!r} appears twice")
      out[token] = row
  return out


def _a1111(path: str, obj: Mapping) -> tuple[str | None, object]:
  """(the embedding's own name or None, its vectors) of an A1111 embedding dict."""
  if "string_to_param" in obj:
    params = obj["string_to_param"]
    if not isinstance(params, Mapping) or not params:
      raise CheckpointError(f"{path}: A1111 embedding whose string_to_param is not a dict of tensors")
    value = params["*"] if "*" in params else next(iter(params.values()))
  else:
    value = obj["emb_params"]
  name = obj.get("name")
  return (name if isinstance(name, str) and name else None), value


def read_token_embeddings(path: str | os.PathLike, token: str | None = None) -> dict[str, np.ndarray]:
  """Read a token-embedding file (formats: module doc) -> `{token: (D,) float32}`, in file order.

  token: the name to give the file's embedding (a single-entry file; a multi-vector one becomes
  token, token_1, ...); None keeps the file's own name (A1111 files without one: the file name's stem).
  Raises CheckpointError (one line, naming the file) for anything else.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such token-embedding file")
  stem = os.path.splitext(os.path.basename(path))[0]
  try:
    is_st = sources._is_safetensors(path)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read ({e})") from e
  obj = sources.read_state_dict(path) if is_st else load_torch_pickle(path)
  if isinstance(obj, np.ndarray):
    if token is None:
      raise CheckpointError(f"{path}: holds a bare tensor; pass the token it stands for")
    entries = [(token, obj)]
  elif isinstance(obj, Mapping) and any(k in obj for k in _A1111_KEYS):
    own, value = _a1111(path, obj)
    entries = [(token or own or stem, value)]
  elif isinstance(obj, Mapping) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
    entries = [(str(k), v) for k, v in obj.items()]
    if token is not None:
      if len(entries) != 1:
        raise CheckpointError(f"{path}: holds {len(entries)} tokens ({', '.join(k for k, _ in entries[:6])}); "
                              "a token name can only replace a single one")
      entries = [(token, entries[0][1])]
  else:
    shown = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"{path}: not a token-embedding file (expected {{token: tensor}}, A1111's "
                          f"string_to_param / emb_params; found {shown or 'nothing'})")
  return _expand(path, entries)
