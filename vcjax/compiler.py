"""XLA compile options for vcjax's compiled programs (sampler step, VAE decode, training step).

On CPU two non-default settings of XLA:CPU pay off for these models (SD1.5 + AnimateDiff v2 UNet forward,
16 x 32x32 latents, fp32, 2-core AMD EPYC, jax 0.10.2; numbers in bench/RESULTS.md):
  xla_cpu_scheduler_type = MEMORY_OPTIMIZED
      The default "concurrency optimized" scheduler keeps buffers alive to run independent ops side by
      side: XLA's buffer plan 1198 MiB -> 433 MiB, forward time unchanged.
  xla_cpu_experimental_ynn_fusion_type = "" (no YNNPACK fusions)
      XLA's own dot/convolution emitters instead of YNNPACK fusions: 3x3 convolutions 130 -> 168 GFLOP/s,
      forward 35.0 s -> 28.4 s.
Other backends get no options. Each option is probed once per process with a tiny compile, so a jaxlib
that does not know an option (names are not stable across XLA releases) drops it instead of failing.
Set `config.enabled = False` (before the first compile) to use XLA's defaults.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

CPU_OPTIONS = {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "xla_cpu_experimental_ynn_fusion_type": "",
}


@dataclasses.dataclass
class CompilerConfig:
  enabled: bool = True


config = CompilerConfig()


@functools.cache
def _supported(backend: str, items: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
  kept = []
  for name, value in items:
    try:
      jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(compiler_options={name: value})
      kept.append((name, value))
    except Exception:  # noqa: BLE001 - an unknown option or value: XLA's default is used instead
      pass
  return tuple(kept)


def compiler_options() -> dict[str, str] | None:
  """The options vcjax compiles with on the default backend (None: XLA's defaults)."""
  backend = jax.default_backend()
  if not config.enabled or backend != "cpu":
    return None
  return dict(_supported(backend, tuple(CPU_OPTIONS.items()))) or None


class _LazyJit:
  """`jax.jit(fun, compiler_options=compiler_options(), **kwargs)`, built at the first call (so that
  importing vcjax neither starts a JAX backend nor fixes the options before the user configures JAX)."""

  def __init__(self, fun, kwargs):
    self._fun, self._kwargs, self._jitted = fun, kwargs, None
    functools.update_wrapper(self, fun)

  def _get(self):
    if self._jitted is None:
      self._jitted = jax.jit(self._fun, compiler_options=compiler_options(), **self._kwargs)
    return self._jitted

  def __call__(self, *args, **kwargs):
    return self._get()(*args, **kwargs)

  def __getattr__(self, name):  # lower, trace, eval_shape, _cache_size, ...
    return getattr(self._get(), name)


def jit(fun=None, **kwargs):
  """`jax.jit` with vcjax's compile options; usable as `@jit` or `@jit(static_argnames=...)`."""
  if fun is None:
    return functools.partial(jit, **kwargs)
  return _LazyJit(fun, kwargs)
