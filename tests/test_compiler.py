"""vcjax.compiler: the CPU compile options are probed, applied, and change what XLA builds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vcjax import compiler
from vcjax.models.configs import tiny_unet
from vcjax.models.unet3d import UNet3D


def dot_gelu(x, w):
  return jax.nn.gelu(x @ w) * 2.0


def test_unknown_option_is_dropped_not_fatal(monkeypatch):
  monkeypatch.setattr(compiler, "CPU_OPTIONS", {**compiler.CPU_OPTIONS, "xla_cpu_no_such_option": "1"})
  options = compiler.compiler_options()
  assert "xla_cpu_no_such_option" not in options
  assert options["xla_cpu_scheduler_type"] == "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"  # this jaxlib knows it


def test_disabled_means_xla_defaults(monkeypatch):
  monkeypatch.setattr(compiler.config, "enabled", False)
  assert compiler.compiler_options() is None


def test_jit_applies_the_options_and_computes_the_same():
  x, w = (jnp.asarray(np.random.default_rng(i).standard_normal(s), jnp.float32) for i, s in
          enumerate([(64, 96), (96, 80)]))
  ours, plain = compiler.jit(dot_gelu), jax.jit(dot_gelu)
  np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-5, atol=1e-5)
  assert ours.__name__ == "dot_gelu"
  plain_hlo = plain.lower(x, w).compile().as_text()
  if "ynn_fusion" not in plain_hlo:
    pytest.skip("this jaxlib builds no YNNPACK fusions")
  assert "ynn_fusion" not in ours.lower(x, w).compile().as_text()


def test_memory_optimized_schedule_lowers_the_unet_buffer_plan():
  """Tiny UNet3D forward, 16 frames: XLA's buffer plan with vcjax's options is less than half the default's
  (22.3 -> 9.7 MiB when written; 1198 -> 433 MiB at SD1.5 size)."""
  cfg = tiny_unet()
  graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet3D(cfg, rngs=nnx.Rngs(0))))
  forward = lambda state, x, t, ctx: nnx.merge(graphdef, state)(x, t, ctx)
  args = (state, jax.ShapeDtypeStruct((1, 16, 16, 16, 4), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32),
          jax.ShapeDtypeStruct((1, 77, cfg.cross_attention_dim), jnp.float32))
  temp = lambda jit: jit(forward).lower(*args).compile().memory_analysis().temp_size_in_bytes
  default, ours = temp(jax.jit), temp(compiler.jit)
  print(f"tiny UNet forward buffer plan: XLA default {default / 2**20:.1f} MiB, vcjax {ours / 2**20:.1f} MiB")
  assert ours < 0.6 * default
