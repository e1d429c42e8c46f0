"""Peak memory of one UNet3D evaluation (a CFG pair) with and without FreeNoise, at 16 / 64 / 128 frames.

    python bench/free_noise_memory.py                      # tiny UNet, 64x64 pixels (8x8 latents), ~2 min on CPU
    python bench/free_noise_memory.py --frames 16 64 128 256 --latent 8 --context-length 16 --stride 4

For each frame count it compiles (does not run) the UNet call through `vcjax.compiler.jit` and prints XLA's
buffer plan (`compiled.memory_analysis()`: temp + output bytes, the peak the executable allocates beyond
its arguments), for
  * the whole UNet with FreeNoise (context_length / stride windows in every motion module: scope "motion",
    diffusers'),
  * the whole UNet run on each window (FreeNoise scope "unet", vcjax/diffusion/context_windows.py),
  * the whole UNet with full temporal attention over every frame (a model whose positional encoding covers
    the video: what sampling without FreeNoise would need),
  * one motion module alone (the first down block's), both ways: the part FreeNoise changes.
Random weights: memory does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plan_bytes(fn, *args) -> int:
  mem = fn.lower(*args).compile().memory_analysis()
  return int(mem.temp_size_in_bytes + mem.output_size_in_bytes)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--frames", type=int, nargs="+", default=[16, 64, 128])
  p.add_argument("--latent", type=int, default=8, help="latent height = width")
  p.add_argument("--context-length", type=int, default=16)
  p.add_argument("--stride", type=int, default=4)
  p.add_argument("--attention", default="auto",
                 help='the attention kernel ("auto": chunked on CPU for > 64 frames; "xla": plain logits)')
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from vcjax import compiler
  from vcjax.models.configs import tiny_unet
  from vcjax.diffusion.context_windows import windowed_eps
  from vcjax.models.free_noise import FreeNoiseConfig, set_free_noise
  from vcjax.models.unet3d import UNet3D

  @compiler.jit(static_argnums=(0,))
  def unet_call(graphdef, state, x, t, ctx):
    return nnx.merge(graphdef, state)(x, t, ctx)

  @compiler.jit(static_argnums=(0,))
  def windowed_unet_call(graphdef, state, x, t, ctx):
    unet = nnx.merge(graphdef, state)
    return windowed_eps(lambda xs, c: unet(xs, t, c), x, ctx, free)

  @compiler.jit(static_argnums=(0,))
  def motion_call(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)

  longest = max(args.frames)
  free = FreeNoiseConfig(args.context_length, args.stride)
  print(f"tiny UNet3D, CFG batch 2, {args.latent}x{args.latent} latents, FreeNoise context_length "
        f"{args.context_length} stride {args.stride}, attention {args.attention}; XLA buffer plan (temp + "
        f"output), MiB")
  print(f"{'frames':>6} | {'UNet FreeNoise':>14} | {'UNet per window':>15} | {'UNet full attn':>14} | "
        f"{'motion FreeNoise':>16} | {'motion full attn':>16}")
  for f in args.frames:
    out = []
    for use_free in (True, False):
      cfg = tiny_unet(motion_max_seq_length=max(longest, 32), attention=args.attention)
      unet = nnx.eval_shape(lambda: UNet3D(cfg, rngs=nnx.Rngs(0)))  # shapes only: nothing runs
      if use_free:
        set_free_noise(unet, free)
      graphdef, state = nnx.split(unet)
      x = jax.ShapeDtypeStruct((2, f, args.latent, args.latent, 4), jnp.float32)
      t = jax.ShapeDtypeStruct((2,), jnp.int32)
      ctx = jax.ShapeDtypeStruct((2, 77, cfg.cross_attention_dim), jnp.float32)
      whole = plan_bytes(unet_call, graphdef, state, x, t, ctx)
      mm = unet.down_blocks[0].motion_modules[0]
      mdef, mstate = nnx.split(mm)
      c = cfg.block_out_channels[0]
      motion = plan_bytes(motion_call, mdef, mstate, jax.ShapeDtypeStruct((2, f, args.latent, args.latent, c),
                                                                          jnp.float32))
      if not use_free:
        windowed = plan_bytes(windowed_unet_call, graphdef, state, x, t, ctx)
      out.append((whole, motion))
    mib = lambda b: b / 2 ** 20
    (uf, mf), (ua, ma) = out
    print(f"{f:>6} | {mib(uf):>14.2f} | {mib(windowed):>15.2f} | {mib(ua):>14.2f} | {mib(mf):>16.2f} | "
          f"{mib(ma):>16.2f}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
