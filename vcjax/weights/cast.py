"""Store a converted folder's parameters in another dtype (float16 for shipping: half the bytes).

    python -m vcjax.weights.cast SRC DST --dtype float16

Every `<component>.safetensors` of SRC is rewritten in DST with its floating-point arrays cast (integer
arrays kept); config.json, the tokenizer and the scheduler config are copied unchanged, so the components
still load (and compute) in their configured dtype: a float16 file read into float32 parameters is exact.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np
import safetensors.numpy

DTYPES = {"float16": np.float16, "float32": np.float32}


def cast_folder(src: str, dst: str, dtype: str = "float16") -> dict[str, int]:
  """-> {file: bytes written} for the rewritten safetensors files."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  if not os.path.isfile(os.path.join(src, "config.json")):
    raise ValueError(f"{src}: not a converted vcjax model (no config.json)")
  if os.path.abspath(src) == os.path.abspath(dst):
    raise ValueError("SRC and DST must differ")
  os.makedirs(dst, exist_ok=True)
  written = {}
  for name in sorted(os.listdir(src)):
    path, out = os.path.join(src, name), os.path.join(dst, name)
    if name.endswith(".safetensors"):
      arrays = safetensors.numpy.load_file(path)
      for key, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating):
          finite = np.isfinite(value)
          cast = value.astype(DTYPES[dtype])
          if not np.array_equal(np.isfinite(cast), finite):
            raise ValueError(f"{name} {key}: values overflow {dtype}")
          arrays[key] = cast
      safetensors.numpy.save_file(arrays, out)
      written[name] = os.path.getsize(out)
    elif os.path.isdir(path):
      shutil.copytree(path, out, dirs_exist_ok=True)
    else:
      shutil.copy2(path, out)
  return written


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("src")
  p.add_argument("dst")
  p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
  args = p.parse_args(argv)
  try:
    written = cast_folder(args.src, args.dst, args.dtype)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for name, size in written.items():
    print(f"{os.path.join(args.dst, name)}: {size / 2**20:.2f} MiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
