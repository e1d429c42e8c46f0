"""Where the UNet's time goes: its dominant ops alone, XLA:CPU vs torch, in GFLOP/s.

    python bench/ops.py            # ~2 minutes on 2 cores

The SD1.5 + AnimateDiff UNet at 16 x 32x32 latents spends ~96% of its FLOPs (3.97 TFLOP per forward) in
3x3 convolutions (42%) and dense matmuls (the attention/feed-forward projections, the attention itself;
58%). Each op below runs alone at one of the model's shapes (frames folded into the batch), fp32, as
median of 5 after a warm-up, in three configurations, each in its own process:
  torch          torch.nn.functional.conv2d (oneDNN) / torch.matmul, torch's default threads
  xla default    jax.jit with XLA's default compile options
  xla vcjax      jax.jit with vcjax.compiler's options (the ones the sampler and trainer use)
The achievable forward time follows from these throughputs and the model's FLOP mix; see RESULTS.md.
"""

from __future__ import annotations

import sys

import harness

# (name, frames x H x W, Cin, Cout): the UNet's 3x3 convolutions, NHWC with frames as the batch.
CONVS = [("conv L0 320->320", (16, 32, 32), 320, 320), ("conv L0 640->320", (16, 32, 32), 640, 320),
         ("conv L1 640->640", (16, 16, 16), 640, 640), ("conv L2 1280->1280", (16, 8, 8), 1280, 1280)]
# (name, M, K, N): the projections at the first level (16 frames x 1024 tokens).
DOTS = [("dot q/k/v/out 320x320", 16384, 320, 320), ("dot GEGLU in 320x2560", 16384, 320, 2560),
        ("dot FF out 1280x320", 16384, 1280, 320), ("dot L1 640x640", 4096, 640, 640)]


def conv_flops(shape, cin, cout):
  f, h, w = shape
  return 2 * f * h * w * cin * cout * 9


def median_time(fn, repeat=5):
  return harness.median(harness.timed_runs(fn, repeat))


def torch_worker() -> dict:
  import torch
  torch.set_grad_enabled(False)
  g = torch.Generator().manual_seed(0)
  out = {}
  for name, shape, cin, cout in CONVS:
    x, k = torch.randn(shape[0], cin, *shape[1:], generator=g), torch.randn(cout, cin, 3, 3, generator=g)
    out[name] = median_time(lambda: torch.nn.functional.conv2d(x, k, padding=1))
  for name, m, k_, n in DOTS:
    a, b = torch.randn(m, k_, generator=g), torch.randn(k_, n, generator=g)
    out[name] = median_time(lambda: a @ b)
  return out


def jax_worker(use_vcjax_options: bool) -> dict:
  import jax
  import numpy as np

  from vcjax import compiler
  options = compiler.compiler_options() if use_vcjax_options else None
  rng = np.random.default_rng(0)
  conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC")),
                 compiler_options=options)
  dot = jax.jit(lambda a, b: a @ b, compiler_options=options)
  out = {}
  for name, shape, cin, cout in CONVS:
    x = jax.device_put(rng.standard_normal((*shape, cin), np.float32))
    k = jax.device_put(rng.standard_normal((3, 3, cin, cout), np.float32))
    out[name] = median_time(lambda: conv(x, k).block_until_ready())
  for name, m, k_, n in DOTS:
    a, b = (jax.device_put(rng.standard_normal(s, np.float32)) for s in ((m, k_), (k_, n)))
    out[name] = median_time(lambda: dot(a, b).block_until_ready())
  return out


def main() -> int:
  if len(sys.argv) > 2 and sys.argv[1] == "--worker":
    which = sys.argv[2]
    harness.print_result(torch_worker() if which == "torch" else jax_worker(which == "vcjax"))
    return 0
  results = {which: harness.run_worker(__file__, ["--worker", which], what=f"{which} worker")
             for which in ("torch", "default", "vcjax")}
  flops = {name: conv_flops(shape, cin, cout) for name, shape, cin, cout in CONVS}
  flops.update({name: 2 * m * k * n for name, m, k, n in DOTS})
  print(f"{'op (fp32)':26s} {'GFLOP':>7s} | {'torch':>14s} | {'xla default':>14s} | {'xla vcjax':>14s} | vcjax/torch")
  for name, fl in flops.items():
    cells = [f"{results[w][name] * 1e3:6.1f} ms {fl / results[w][name] / 1e9:4.0f}GF/s"
             for w in ("torch", "default", "vcjax")]
    print(f"{name:26s} {fl / 1e9:7.1f} | " + " | ".join(cells) +
          f" | {results['vcjax'][name] / results['torch'][name]:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
