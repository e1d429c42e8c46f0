"""Full-size parity (issue A): SD1.5 UNet + AnimateDiff v2 motion module, vcjax vs diffusers, fp32 on CPU.

    python bench/parity_full.py                       # 16 frames at 256x256; several minutes, ~10 GB RAM
    python bench/parity_full.py --model tiny --frames 4 --size 64    # smoke test of the script itself

Not a CI test: it builds the real-size models (random weights) and goes through the real file formats.
Stages, each in its own subprocess so that one stage's memory is freed before the next one starts and
so that each peak RSS is that stage's own:
  write    vcjax.testing.write_pipeline(WORK/src, size, "v2"): a diffusers folder
           (unet/ vae/ text_encoder/ tokenizer/), an LDM single file, the motion module as an original
           AnimateDiff .ckpt and as a diffusers MotionAdapter.
  convert  convert/animatediff.py main(): --base src/base (diffusers folder) --motion-module
           src/mm_original.ckpt --norm-semantics diffusers -> WORK/converted (--model tiny converts
           src/motion_adapter instead: the original format has no head count, and 8 is assumed).
  torch    the reference: UNetMotionModel.from_unet2d(UNet2DConditionModel from src/base/unet,
           MotionAdapter from src/motion_adapter) in fp32 under torch.no_grad; the prompt embedding is
           repeated per frame (diffusers' UNetMotionModel takes the context once per frame). --repeat
           runs, median wall time. Optionally (--extras) the VAE decode of 2 frames and CLIP on 2 prompts.
  vcjax    vcjax.load_unet(WORK/converted) under jax.jit (params passed as arguments, not baked in):
           compile time, then the median of --repeat runs; relative L2 error ||vcjax - torch|| / ||torch||.
Inputs: latents (1, FRAMES, SIZE/8, SIZE/8, 4), a random context (1, 77, D), timestep 500.

Peak RSS per stage is the process's VmHWM (/proc/self/status); "forward peak" is VmHWM during the timed
runs after resetting it to the current RSS (/proc/self/clear_refs), i.e. model + activations.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import harness

TARGET = 1e-4
PROMPTS = ("a corgi running on the beach, golden hour", "an astronaut riding a horse on mars, 4k")


# --------------------------------------------------------------------------------------------- measuring

def rss_gib() -> float:
  return harness.rss_bytes() / 2**30


def peak_gib() -> float:
  return harness.peak_bytes() / 2**30


def rel_err(a, b) -> float:
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def inputs(args, context_dim: int):
  """(latents (1, F, h, w, 4) channels-last, timesteps (1,), context (1, 77, D)), fp32 numpy."""
  import numpy as np
  rng = np.random.default_rng(0)
  h = args.size // 8
  latents = rng.standard_normal((1, args.frames, h, h, 4)).astype(np.float32)
  context = rng.standard_normal((1, 77, context_dim)).astype(np.float32)
  return latents, np.array([500], np.int64), context


def vae_latents(args):
  import numpy as np
  return np.random.default_rng(1).standard_normal((2, args.size // 8, args.size // 8, 4)).astype(np.float32)


def paths(work: str) -> dict[str, str]:
  src = os.path.join(work, "src")
  return dict(src=src, base=os.path.join(src, "base"), ckpt=os.path.join(src, "mm_original.ckpt"),
              adapter=os.path.join(src, "motion_adapter"), converted=os.path.join(work, "converted"),
              ref=os.path.join(work, "reference.npz"))


# ------------------------------------------------------------------------------------------------ stages

def stage_write(args) -> dict:
  from vcjax.testing import write_pipeline
  p = paths(args.workdir)
  t = time.perf_counter()
  write_pipeline(p["src"], size=args.model, version="v2", seed=0)
  sizes = {name: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p["src"]) for f in fs
                     if os.path.join(d, f).startswith(os.path.join(p["src"], name)))
           for name in ("base", "base_ldm.safetensors", "mm_original.ckpt", "motion_adapter")}
  return dict(write_s=time.perf_counter() - t, file_gib={k: v / 2**30 for k, v in sizes.items()})


def stage_convert(args) -> dict:
  from convert.animatediff import main
  p = paths(args.workdir)
  motion = p["ckpt"] if args.motion_source == "original" else p["adapter"]
  argv = ["--base", p["base"], "--motion-module", motion, "--norm-semantics", "diffusers",
          "--out", p["converted"]]
  t = time.perf_counter()
  rc = main(argv)
  if rc != 0:
    raise SystemExit(f"convert/animatediff.py exited with {rc}")
  return dict(convert_s=time.perf_counter() - t, convert_argv=" ".join(argv))


def stage_torch(args) -> dict:
  import gc

  import numpy as np
  import torch
  from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
  p = paths(args.workdir)
  out = dict(torch_threads=torch.get_num_threads(), torch_version=torch.__version__)
  unet2d = UNet2DConditionModel.from_pretrained(os.path.join(p["base"], "unet"))
  adapter = MotionAdapter.from_pretrained(p["adapter"])
  model = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
  del unet2d, adapter  # from_unet2d copies the weights; keep one copy
  gc.collect()
  out["params"] = sum(x.numel() for x in model.parameters())
  latents, t, context = inputs(args, model.config.cross_attention_dim)
  x = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 4, 1, 2, 3)))  # (B, C, F, H, W)
  ctx = torch.from_numpy(context).repeat_interleave(args.frames, 0)  # once per frame, b-major
  out["loaded_rss_gib"] = rss_gib()
  harness.reset_peak()
  times, result = [], None
  for _ in range(args.repeat):
    t0 = time.perf_counter()
    with torch.no_grad():
      y = model(x, torch.from_numpy(t), ctx).sample
    times.append(time.perf_counter() - t0)
    result = y.numpy().transpose(0, 2, 3, 4, 1) if result is None else result
  out.update(forward_s=harness.median(times), forward_times=times, forward_peak_gib=peak_gib())
  ref = {"unet": result}
  del model, x, ctx, y
  gc.collect()

  if args.extras:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer
    vae = AutoencoderKL.from_pretrained(os.path.join(p["base"], "vae")).eval()
    z = torch.from_numpy(np.ascontiguousarray(vae_latents(args).transpose(0, 3, 1, 2)))
    t0 = time.perf_counter()
    with torch.no_grad():
      ref["vae"] = vae.decode(z).sample.numpy().transpose(0, 2, 3, 1)
    out["vae_decode_s"] = time.perf_counter() - t0
    del vae
    tok = CLIPTokenizer.from_pretrained(os.path.join(p["base"], "tokenizer"), local_files_only=True)
    ids = tok(list(PROMPTS), padding="max_length", max_length=77, truncation=True, return_tensors="np")
    ref["ids"] = np.asarray(ids["input_ids"], np.int32)
    text = CLIPTextModel.from_pretrained(os.path.join(p["base"], "text_encoder")).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
      o = text(torch.from_numpy(ref["ids"]).long())
    out["clip_s"] = time.perf_counter() - t0
    ref["clip"], ref["clip_pooled"] = o.last_hidden_state.numpy(), o.pooler_output.numpy()
  np.savez(p["ref"], **ref)
  return out


def stage_vcjax(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import vcjax
  p = paths(args.workdir)
  out = dict(jax_version=jax.__version__, devices=str(jax.devices()))
  t0 = time.perf_counter()
  unet = vcjax.load_unet(p["converted"])
  out["load_s"] = time.perf_counter() - t0
  graphdef, state = nnx.split(unet)
  del unet
  out["params"] = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state))
  latents, t, context = inputs(args, unet_context_dim(p["converted"]))
  x, tj, ctx = jnp.asarray(latents), jnp.asarray(t), jnp.asarray(context)

  fwd, out["compile_s"], plan = harness.compile_unet_forward(graphdef, state, x, tj, ctx)
  if plan is not None:
    out["xla_temp_gib"] = plan / 2**30
  out["loaded_rss_gib"] = rss_gib()
  harness.reset_peak()
  times, got = [], None
  for _ in range(args.repeat):
    t0 = time.perf_counter()
    y = jax.block_until_ready(fwd(state, x, tj, ctx))
    times.append(time.perf_counter() - t0)
    got = np.asarray(y) if got is None else got
  out.update(forward_s=harness.median(times), forward_times=times, forward_peak_gib=peak_gib())
  ref = np.load(p["ref"])
  out["unet_rel_err"] = rel_err(got, ref["unet"])
  out["unet_max_abs_err"] = float(np.abs(got - ref["unet"]).max())
  out["unet_ref_rms"] = float(np.sqrt(np.mean(np.square(ref["unet"], dtype=np.float64))))
  out["unet_finite"] = bool(np.isfinite(got).all())
  del state, fwd, y
  import gc
  gc.collect()

  if args.extras:
    vae = vcjax.load_vae(p["converted"])
    t0 = time.perf_counter()
    img = np.asarray(nnx.jit(lambda m, z: m.decode(z))(vae, jnp.asarray(vae_latents(args))))
    out["vae_decode_s(incl. compile)"] = time.perf_counter() - t0
    out["vae_rel_err"] = rel_err(img, ref["vae"])
    del vae
    from vcjax.models.tokenizer import tokenize
    ids = tokenize(vcjax.load_tokenizer(p["converted"]), list(PROMPTS), 77)
    out["clip_ids_equal"] = bool(np.array_equal(ids, ref["ids"]))
    text = vcjax.load_text_encoder(p["converted"])
    t0 = time.perf_counter()
    hidden, pooled = nnx.jit(lambda m, i: m.encode(i))(text, jnp.asarray(ids))
    out["clip_s(incl. compile)"] = time.perf_counter() - t0
    out["clip_rel_err"] = rel_err(hidden, ref["clip"])
    out["clip_pooled_rel_err"] = rel_err(pooled, ref["clip_pooled"])
  return out


def unet_context_dim(folder: str) -> int:
  from vcjax.weights import store
  return int(store.read_config(folder)["unet"]["cross_attention_dim"])


STAGES = {"write": stage_write, "convert": stage_convert, "torch": stage_torch, "vcjax": stage_vcjax}


# ------------------------------------------------------------------------------------------------ driver

def run_stage(name: str, args) -> dict:
  argv = ["--stage", name, "--workdir", args.workdir, "--model", args.model, "--frames", str(args.frames),
          "--size", str(args.size), "--repeat", str(args.repeat), "--motion-source", args.motion_source]
  t0 = time.perf_counter()
  result = harness.run_worker(__file__, argv + ([] if args.extras else ["--no-extras"]), what=f"stage {name}")
  result["stage_wall_s"] = time.perf_counter() - t0
  return result


def report(r: dict, args) -> bool:
  h = args.size // 8
  print(f"model {args.model} + AnimateDiff v2 motion module, random weights, fp32; "
        f"latents (1, {args.frames}, {h}, {h}, 4) = {args.frames} frames at {args.size}x{args.size}, "
        f"context (1, 77, D), timestep 500")
  if "write" in r:
    w = r["write"]
    print(f"write    {w['write_s']:8.1f} s   peak RSS {w['peak_rss_gib']:5.2f} GiB   files "
          + ", ".join(f"{k} {g:.2f} GiB" for k, g in w["file_gib"].items()))
  if "convert" in r:
    c = r["convert"]
    print(f"convert  {c['convert_s']:8.1f} s   peak RSS {c['peak_rss_gib']:5.2f} GiB   "
          f"(convert/animatediff.py {c['convert_argv']})")
  if not {"torch", "vcjax"} <= r.keys():  # the comparison needs both stages (--stages ran fewer)
    print("stage wall times: " + ", ".join(f"{k} {x['stage_wall_s']:.0f} s" for k, x in r.items()))
    return True
  t, v = r["torch"], r["vcjax"]
  print(f"[diffusers UNetMotionModel] torch {t['torch_version']}, {t['torch_threads']} threads, "
        f"params {t['params'] / 1e6:.1f}M")
  print(f"  forward (median)   {t['forward_s']:8.2f} s   runs {[round(s, 2) for s in t['forward_times']]}")
  print(f"  peak RSS           {t['peak_rss_gib']:8.2f} GiB (model loaded {t['loaded_rss_gib']:.2f} GiB, "
        f"during forwards {t['forward_peak_gib']:.2f} GiB)")
  print(f"[vcjax UNet3D] jax {v['jax_version']} {v['devices']}, params {v['params'] / 1e6:.1f}M")
  print(f"  load_unet          {v['load_s']:8.2f} s")
  print(f"  compile (jit)      {v['compile_s']:8.2f} s")
  print(f"  forward (median)   {v['forward_s']:8.2f} s   runs {[round(s, 2) for s in v['forward_times']]}")
  print(f"  peak RSS           {v['peak_rss_gib']:8.2f} GiB (model loaded + compiled {v['loaded_rss_gib']:.2f} "
        f"GiB, during forwards {v['forward_peak_gib']:.2f} GiB"
        + (f", XLA temp+output plan {v['xla_temp_gib']:.2f} GiB)" if "xla_temp_gib" in v else ")"))
  ok = v["unet_finite"] and v["unet_rel_err"] <= TARGET
  print(f"UNet output rel L2 err {v['unet_rel_err']:.3e}   max abs err {v['unet_max_abs_err']:.3e}   "
        f"(ref rms {v['unet_ref_rms']:.3f})   target <= {TARGET:.0e}: {'PASS' if ok else 'FAIL'}")
  print(f"time ratio vcjax/torch (forward) {v['forward_s'] / t['forward_s']:.3f}")
  if args.extras:
    vae_ok = v["vae_rel_err"] <= TARGET
    clip_ok = v["clip_rel_err"] <= TARGET and v["clip_pooled_rel_err"] <= TARGET and v["clip_ids_equal"]
    print(f"VAE decode 2 x {args.size}x{args.size}: rel L2 err {v['vae_rel_err']:.3e} "
          f"(torch {t['vae_decode_s']:.2f} s, vcjax {v['vae_decode_s(incl. compile)']:.2f} s incl. compile)"
          f"   {'PASS' if vae_ok else 'FAIL'}")
    print(f"CLIP text 2 prompts: last hidden rel L2 err {v['clip_rel_err']:.3e}, pooled "
          f"{v['clip_pooled_rel_err']:.3e}, token ids equal {v['clip_ids_equal']} "
          f"(torch {t['clip_s']:.2f} s, vcjax {v['clip_s(incl. compile)']:.2f} s incl. compile)"
          f"   {'PASS' if clip_ok else 'FAIL'}")
    ok = ok and vae_ok and clip_ok
  print("stage wall times: " + ", ".join(f"{k} {x['stage_wall_s']:.0f} s" for k, x in r.items()))
  return ok


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default=None, help="default: a temp dir under /tmp, removed unless --keep")
  p.add_argument("--keep", action="store_true", help="keep the work dir (files, converted model)")
  p.add_argument("--frames", type=int, default=16, help="video frames (<= 32 for the v2 motion module)")
  p.add_argument("--size", type=int, default=256, help="pixel height = width; latents are size / 8")
  p.add_argument("--model", choices=("sd15", "tiny"), default="sd15", help="tiny: smoke test of this script")
  p.add_argument("--motion-source", choices=("original", "diffusers"), default=None,
                 help="motion module file converted: the original .ckpt (default for sd15) or the diffusers "
                      "MotionAdapter (default for tiny: an original checkpoint carries no head count and "
                      "the converter assumes AnimateDiff's 8 heads, while the tiny model has 2)")
  p.add_argument("--repeat", type=int, default=3, help="timed forward runs per framework")
  p.add_argument("--no-extras", dest="extras", action="store_false", help="skip VAE decode and CLIP parity")
  p.add_argument("--stages", default="write,convert,torch,vcjax",
                 help="run only these (re-use a --workdir from an earlier run for the others)")
  p.add_argument("--json", default=None, help="also write all measurements to this file")
  p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.stage:
    result = STAGES[args.stage](args)
    result["peak_rss_gib"] = peak_gib()
    harness.print_result(result)
    return 0
  if args.motion_source is None:
    args.motion_source = "original" if args.model == "sd15" else "diffusers"
  if args.size % 8 or args.frames < 1:
    p.error("--size must be a multiple of 8 and --frames >= 1")
  tmp = args.workdir is None
  if tmp:
    args.workdir = tempfile.mkdtemp(prefix="vcjax-parity-full-", dir="/tmp")
  os.makedirs(args.workdir, exist_ok=True)
  cache = os.path.join(args.workdir, "results.json")
  results = {}
  if os.path.exists(cache):
    with open(cache) as f:
      results = json.load(f)
  try:
    for name in args.stages.split(","):
      print(f"[{time.strftime('%H:%M:%S')}] stage {name} ...", flush=True)
      results[name] = run_stage(name, args)
      print(f"[{time.strftime('%H:%M:%S')}] stage {name} done in {results[name]['stage_wall_s']:.0f} s, "
            f"peak RSS {results[name]['peak_rss_gib']:.2f} GiB", flush=True)
      with open(cache, "w") as f:
        json.dump(results, f)
    ok = report(results, args)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(dict(args=vars(args), results=results), f, indent=1)
  finally:
    if tmp and not args.keep:
      shutil.rmtree(args.workdir, ignore_errors=True)
    elif args.keep or not tmp:
      print(f"work dir kept: {args.workdir}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
