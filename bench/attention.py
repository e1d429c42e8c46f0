"""Micro-benchmark of the attention implementations on this machine's default backend.

    python bench/attention.py [--frames 16] [--latent 32] [--repeat 5] [--grad]

Shapes are SD1.5's spatial self-attention at each UNet level, cross-attention against 77 tokens, and the
motion module's temporal attention, for `frames` frames of `latent` x `latent` latents. Prints, per shape and
implementation, the median wall time and process CPU time (forward, or forward+backward with --grad), and
XLA's temp buffer size; `--torch` adds torch's scaled_dot_product_attention on the same shapes.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vcjax.nn import attention as A


def jax_nn_xla(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def measure(fn, repeat: int) -> tuple[float, float]:
  """Median wall and process-CPU seconds of `repeat` calls after one warm-up call."""
  fn()
  walls, cpus = [], []
  for _ in range(repeat):
    w, c = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - w)
    cpus.append(time.process_time() - c)
  return float(np.median(walls)), float(np.median(cpus))


def shapes(frames: int, latent: int):
  out = []
  for level, (heads, dim) in enumerate([(8, 40), (8, 80), (8, 160)]):
    side = latent >> level
    out.append((f"self L{level} {side * side}x{side * side} d{dim}", (frames, side * side, heads, dim),
                (frames, side * side, heads, dim)))
  out.append((f"cross L0 {latent * latent}x77 d40", (frames, latent * latent, 8, 40), (frames, 77, 8, 40)))
  out.append((f"temporal {frames}x{frames} d40", (latent * latent, frames, 8, 40), (latent * latent, frames, 8, 40)))
  return out


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--latent", type=int, default=32)
  p.add_argument("--repeat", type=int, default=5)
  p.add_argument("--grad", action="store_true")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--torch", action="store_true")
  args = p.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  impls = {"vcjax xla": lambda q, k, v: A.dot_product_attention(q, k, v, implementation="xla"),
           "jax.nn xla": jax_nn_xla,
           "vcjax chunked": lambda q, k, v: A.dot_product_attention(q, k, v, implementation="chunked")}
  print(f"backend {jax.default_backend()}, {args.dtype}, {'fwd+bwd' if args.grad else 'fwd'}")
  for label, qs, ks in shapes(args.frames, args.latent):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal(qs), dtype)
    k = jnp.asarray(rng.standard_normal(ks), dtype)
    v = jnp.asarray(rng.standard_normal(ks), dtype)
    for name, fn in impls.items():
      f = (lambda fn: (lambda q, k, v: jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(),
                                                argnums=(0, 1, 2))(q, k, v)))(fn) if args.grad else fn
      compiled = jax.jit(f).lower(q, k, v).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes
      wall, cpu = measure(lambda: jax.block_until_ready(compiled(q, k, v)), args.repeat)
      print(f"{label:32s} {name:20s} {wall * 1e3:9.1f} ms  cpu {cpu * 1e3:9.1f} ms   temp {temp / 2**20:8.1f} MiB",
            flush=True)
    if args.torch:
      import torch
      tq, tk, tv = (torch.from_numpy(np.asarray(x, np.float32)).transpose(1, 2) for x in (q, k, v))
      if args.grad:
        for x in (tq, tk, tv):
          x.requires_grad_(True)
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).sum().backward()
      else:
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
      wall, cpu = measure(fn, args.repeat)
      print(f"{label:32s} {'torch sdpa':20s} {wall * 1e3:9.1f} ms  cpu {cpu * 1e3:9.1f} ms", flush=True)


if __name__ == "__main__":
  main()
