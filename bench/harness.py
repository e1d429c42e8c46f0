"""What every benchmark script shares: process memory readings, medians, and running a worker subprocess.

Imported as `import harness` by the scripts in bench/ (run as `python bench/<script>.py`, so bench/ is on
sys.path, for the scripts and for the workers they start the same way).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_bytes() -> int:
  """This process's resident memory now."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
  """This process's peak resident memory (Linux VmHWM) since it started or since `reset_peak()`."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := current RSS (Linux >= 4.0)


def release_free_memory() -> None:
  """Return freed heap memory to the OS (glibc malloc_trim), so that memory an earlier phase freed but the
  allocator kept does not hide what the measured runs need. Done the same way for every framework."""
  import ctypes
  import gc
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass


def median(xs):
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def timed_runs(fn, repeat: int) -> list[float]:
  """One warm-up call of `fn` (which must block until its result is ready), then `repeat` timed calls."""
  fn()
  times = []
  for _ in range(repeat):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def compile_unet_forward(graphdef, state, *inputs, options: bool = True):
  """The vcjax UNet forward `(state, x, t, ctx) -> eps`, compiled with vcjax.compiler's options (as the
  sampler is). Returns (compiled executable, compile seconds, XLA's temp + output buffer plan in bytes)."""
  from flax import nnx

  from vcjax import compiler

  @compiler.jit(options=options)
  def forward(state, x, t, ctx):
    return nnx.merge(graphdef, state)(x, t, ctx)

  t0 = time.perf_counter()
  compiled = forward.lower(state, *inputs).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return compiled, seconds, (mem.temp_size_in_bytes + mem.output_size_in_bytes) if mem is not None else None


def run_worker(script: str, argv: list[str], *, env: dict[str, str] | None = None, what: str = "worker") -> dict:
  """Runs `python script argv...` with the repository on PYTHONPATH and returns the JSON dict it printed on
  a line starting with "RESULT "; exits with the worker's output tail if it printed none."""
  env = dict(os.environ, **(env or {}))
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, os.path.abspath(script), *argv], env=env, capture_output=True,
                        text=True, cwd=ROOT)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
  raise SystemExit(f"{what} failed (exit {proc.returncode})")


def print_result(result: dict) -> None:
  """The worker side of `run_worker`."""
  print("RESULT " + json.dumps(result), flush=True)
