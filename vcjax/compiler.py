"""One compile path for vcjax: XLA compile options, and the XLA:CPU miscompile workaround.

Every compiled function in vcjax goes through `jit` below (the sampler step, text encoder, reference and
VAE encode/decode, the train step, evaluation). Two non-default XLA:CPU settings (other backends get none):
  xla_cpu_experimental_ynn_fusion_type = "" (no YNNPACK fusions)
      Correctness first: jaxlib 0.10.2's YNNPACK fusions miscompile short attention at batch 1 (projections
      -> heads -> broadcast-multiply-reduce logits -> softmax -> weighted sum: max abs error 1.7 to 15; see
      `miscompile_probe` and tests/test_compiler.py). It is also faster here: XLA's own dot/conv emitters
      run 3x3 convolutions at 168 vs 130 GFLOP/s (SD1.5 UNet forward 35.0 s -> 28.4 s, bench/RESULTS.md).
  xla_cpu_scheduler_type = MEMORY_OPTIMIZED
      The default "concurrency optimized" scheduler keeps buffers alive to run independent ops side by
      side: XLA's buffer plan 1198 MiB -> 433 MiB for the SD1.5 forward, time unchanged.
Each option is probed once per process with a tiny compile, so a jaxlib that does not know an option drops it
instead of failing.

Users also compile vcjax modules themselves (`jax.jit(unet)`). So that those programs are right too,
`import vcjax` calls `install_cpu_workaround()`: before JAX's backend starts it appends the no-YNNPACK flag to
XLA_FLAGS (only when this jaxlib knows the flag: XLA aborts on an unknown one); when the backend has already
started it runs `miscompile_probe` once and warns with the fix if this jaxlib is affected.
VCJAX_KEEP_XLA_FLAGS=1 in the environment leaves XLA_FLAGS alone.
"""

from __future__ import annotations

import functools
import mmap
import os
import sys
import warnings

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    YNN_FLAG: "",
}
FIX = (f"set XLA_FLAGS=--{YNN_FLAG}= before JAX starts (or import vcjax before running any JAX computation), "
       "or compile with vcjax.compiler.jit")


# --------------------------------------------------------------------------------------------------
# The process-wide workaround (for programs vcjax does not compile itself).


def _backend_started() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # a JAX without this private helper: assume the worst
    return True


@functools.cache
def jaxlib_knows_flag(name: str = YNN_FLAG) -> bool:
  """Whether this jaxlib's XLA registers the flag `name` (its shared libraries hold the flag's name).

  Checked without starting JAX: an unknown flag in XLA_FLAGS makes XLA abort the process."""
  import importlib.util
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return False
  needle = name.encode()
  for folder in spec.submodule_search_locations:
    libs = []
    for root, _, files in os.walk(folder):
      libs += [os.path.join(root, f) for f in files if ".so" in f or f.endswith((".pyd", ".dylib"))]
    for lib in sorted(libs, key=os.path.getsize, reverse=True):  # XLA lives in the largest one
      try:
        with open(lib, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
          if m.find(needle) >= 0:
            return True
      except (OSError, ValueError):
        continue
  return False


def install_cpu_workaround() -> str:
  """Make every XLA:CPU program of this process safe from the YNNPACK miscompile, if it still can be.

  Returns what it did: "flag" (appended to XLA_FLAGS), "present" (XLA_FLAGS already sets the flag),
  "kept" (VCJAX_KEEP_XLA_FLAGS), "unknown" (this jaxlib has no such flag: nothing to turn off),
  "probed" (backend already running and right), "warned" (backend running and affected: a warning).
  """
  if os.environ.get("VCJAX_KEEP_XLA_FLAGS"):
    return "kept"
  flags = os.environ.get("XLA_FLAGS", "")
  if f"--{YNN_FLAG}" in flags:
    return "present"
  if not _backend_started():
    if not jaxlib_knows_flag():
      return "unknown"
    os.environ["XLA_FLAGS"] = f"{flags} --{YNN_FLAG}=".strip()
    return "flag"
  import jax
  if jax.default_backend() != "cpu":
    return "probed"
  error = miscompile_probe(jax.jit)
  if error > 1e-3:
    warnings.warn(f"this jaxlib's XLA:CPU miscompiles short attention at batch 1 (probe max abs error "
                  f"{error:.3g}); JAX started before vcjax was imported, so programs you compile with jax.jit "
                  f"may be wrong (vcjax's own are not): {FIX}", RuntimeWarning, stacklevel=3)
    return "warned"
  return "probed"


def _probe_attention(x, wq, wk, wv):
  """The miscompiled form: x `(1, T, N*D)` -> q/k/v heads `(1, T, N, D)` -> logits by broadcast-multiply-
  reduce `(1, T, T, N)` -> causal mask -> softmax -> weighted sum of v -> `(1, T, N*D)`."""
  import jax.numpy as jnp
  b, t, c = x.shape
  n = 4
  heads = lambda w: (x @ w).reshape(b, t, n, c // n)
  q, k, v = heads(wq), heads(wk), heads(wv)
  logits = jnp.sum(q[:, :, None] * k[:, None], -1) * (c // n) ** -0.5
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, :, :, None], logits, -1e9)
  p = jnp.exp(logits - logits.max(2, keepdims=True))
  p = p / p.sum(2, keepdims=True)
  return jnp.sum(p[..., None] * v[:, None], 2).reshape(b, t, c)


def miscompile_probe(jit, tokens: int = 16, head_size: int = 16, batch: int = 1) -> float:
  """Max abs error of `jit(_probe_attention)` against float64 numpy, on fixed random inputs."""
  import numpy as np
  rng = np.random.default_rng(0)
  c = 4 * head_size
  x = rng.standard_normal((batch, tokens, c)).astype(np.float32)
  ws = [(rng.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32) for _ in range(3)]
  got = np.asarray(jit(_probe_attention)(x, *ws), np.float64)
  x64, (q, k, v) = x.astype(np.float64), [(x.astype(np.float64) @ w).reshape(batch, tokens, 4, head_size)
                                         for w in ws]
  del x64
  logits = np.einsum("btnd,bsnd->btsn", q, k) / np.sqrt(head_size)
  logits = np.where(np.tril(np.ones((tokens, tokens), bool))[None, :, :, None], logits, -np.inf)
  p = np.exp(logits - logits.max(2, keepdims=True))
  p /= p.sum(2, keepdims=True)
  want = np.einsum("btsn,bsnd->btnd", p, v).reshape(batch, tokens, c)
  return float(np.abs(got - want).max())


# --------------------------------------------------------------------------------------------------
# Per-function compile options.


@functools.cache
def _supported(backend: str, items: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
  import jax
  import numpy as np
  kept = []
  for name, value in items:
    try:
      jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(compiler_options={name: value})
      kept.append((name, value))
    except Exception:  # noqa: BLE001 - an unknown option or value: XLA's default is used instead
      pass
  return tuple(kept)


def compiler_options(enabled: bool = True) -> dict[str, str] | None:
  """The options vcjax compiles with on the default backend (None: XLA's defaults).

  enabled=False gives XLA's defaults — except that on CPU the YNNPACK miscompile is never re-enabled."""
  import jax
  backend = jax.default_backend()
  if backend != "cpu":
    return None
  items = CPU_OPTIONS if enabled else {YNN_FLAG: CPU_OPTIONS[YNN_FLAG]}
  return dict(_supported(backend, tuple(items.items()))) or None


class _LazyJit:
  """`jax.jit(fun, compiler_options=compiler_options(), **kwargs)`, built at the first call (so that
  importing vcjax neither starts a JAX backend nor fixes the options before the user configures JAX)."""

  def __init__(self, fun, kwargs, options: bool):
    self._fun, self._kwargs, self._options, self._jitted = fun, kwargs, options, None
    functools.update_wrapper(self, fun)

  def _get(self):
    if self._jitted is None:
      import jax
      self._jitted = jax.jit(self._fun, compiler_options=compiler_options(self._options), **self._kwargs)
    return self._jitted

  def __call__(self, *args, **kwargs):
    return self._get()(*args, **kwargs)

  def __getattr__(self, name):  # lower, trace, eval_shape, _cache_size, ...
    return getattr(self._get(), name)


def jit(fun=None, *, options: bool = True, **kwargs):
  """`jax.jit` with vcjax's compile options; usable as `@jit` or `@jit(static_argnames=...)`.

  options=False: XLA's defaults, less the YNNPACK fusions on CPU (never safe on jaxlib 0.10.2)."""
  if fun is None:
    return functools.partial(jit, options=options, **kwargs)
  return _LazyJit(fun, kwargs, options)


# --------------------------------------------------------------------------------------------------
# JAX's persistent compilation cache, for repeat runs of the CLIs.

DEFAULT_CACHE = os.path.join("~", ".cache", "vcjax", "jax")


def use_compilation_cache(folder: str | None = DEFAULT_CACHE, *, min_compile_seconds: float = 0.2) -> str | None:
  """Turn on JAX's persistent compilation cache in `folder` (created; "~" expanded); "" or None: off.

  A second run of the same command with the same shapes loads its executables instead of compiling them
  (the key covers the program, the compile options and XLA_FLAGS, so a changed model or flag recompiles).
  Programs that compile faster than `min_compile_seconds` are not worth a file. -> the folder used, or None."""
  if not folder:
    return None
  import jax
  folder = os.path.abspath(os.path.expanduser(folder))
  os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder
