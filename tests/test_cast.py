"""vcjax.weights.cast: a converted folder stored in float16 loads to the float16-rounded parameters and
samples like the float32 folder up to that rounding."""

import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from vcjax.weights.cast import cast_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_float16_folder_loads_the_rounded_parameters(converted, tmp_path):
  from vcjax.train.models import load_component
  from vcjax.weights.keymaps import module_param_shapes
  dst = str(tmp_path / "half")
  written = cast_folder(converted, dst, "float16")
  assert set(written) == {f for f in os.listdir(converted) if f.endswith(".safetensors")}
  for name in written:
    full = safetensors.numpy.load_file(os.path.join(converted, name))
    half = safetensors.numpy.load_file(os.path.join(dst, name))
    assert full.keys() == half.keys()
    for k, v in full.items():
      want = v.astype(np.float16) if np.issubdtype(v.dtype, np.floating) else v
      assert half[k].dtype == want.dtype and np.array_equal(half[k], want), k
    assert os.path.getsize(os.path.join(dst, name)) < 0.6 * os.path.getsize(os.path.join(converted, name))
  assert os.path.isdir(os.path.join(dst, "tokenizer"))
  import jax
  from flax import nnx
  vae = load_component(dst, "vae")  # float32 parameters holding the float16 values
  assert {d for _, d in module_param_shapes(vae).values()} == {np.dtype("float32")}
  full = jax.tree.leaves(nnx.state(load_component(converted, "vae"), nnx.Param))
  half = jax.tree.leaves(nnx.state(vae, nnx.Param))
  assert len(full) == len(half) > 10
  for a, b in zip(full, half):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(np.float16).astype(np.float32))
  with pytest.raises(ValueError, match="must differ"):
    cast_folder(converted, converted)


def test_cli_errors_in_one_line(tmp_path):
  p = subprocess.run([sys.executable, "-m", "vcjax.weights.cast", str(tmp_path), str(tmp_path / "o")],
                     capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert p.returncode == 1 and p.stderr.strip().startswith("error: ") and "no config.json" in p.stderr
