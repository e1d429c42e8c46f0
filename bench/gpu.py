"""GPU benchmark (H100 / H200): AnimateDiff sampling and a LoRA training step, vcjax vs diffusers, bf16.

    python bench/gpu.py                      # 1 video x 16 frames x 512x512, 25 DDIM steps, CFG 7.5
    python bench/gpu.py --steps 5 --frames 8 # quicker

UNTESTED: written on a CPU-only machine; needs jax with CUDA (jax[cuda12]) and a CUDA build of torch with
diffusers and peft. SD1.5 + AnimateDiff v2 UNet with random weights (same construction and the same weights
for both frameworks, as in bench/unet.py; the weights go through WORK/unet.safetensors in fp32 and are cast to
bf16 by each framework). Each framework runs in its own subprocess.

Measured, per framework:
  sampling    wall time of the denoising loop (25 steps, CFG batch 2 x 16 frames of 64x64 latents), after a
              warm-up run of the same loop (which, for vcjax, compiles the step). Text encoder and VAE decode
              are not included. diffusers: UNetMotionModel with its default processor (torch SDPA: flash /
              memory-efficient kernels) and DDIMScheduler; vcjax: vcjax.diffusion.sampling.sample_loop with
              the automatic attention choice (cuDNN flash attention for the spatial layers in bf16).
  peak mem    torch.cuda.max_memory_allocated / jax memory_stats()["peak_bytes_in_use"] (weights included;
              jax's counter cannot be reset, so it covers everything since the process started).
  lora step   forward + backward of an MSE loss w.r.t. rank-4 LoRA weights on the spatial q/k/v, batch
              1 x 16 frames x 64x64, timed over --train-repeat steps after a warm-up step.
  MFU         FLOPs of one training step / step time / peak bf16 dense FLOP/s of the GPU (H100 / H200 SXM:
              989 TFLOP/s; --peak-tflops to override). FLOPs: XLA's cost analysis of the compiled step for
              vcjax, torch.utils.flop_counter for diffusers (each counts its own executed matmuls/convs).
Last line: `ratio_time=X ratio_mem=Y` (vcjax / diffusers, sampling loop).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import harness

SPATIAL_QKV = r".*attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.to_[qkv]"
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
# --preset tiny is a CPU smoke test of this script (the same code paths on a toy model), not a benchmark.
PRESETS = {"sd15": dict(size="sd15", context_dim=768), "tiny": dict(size="tiny", context_dim=32)}


def peak_tflops(device_name: str, override: float | None) -> float | None:
  if override:
    return override
  for key, value in PEAK_TFLOPS.items():
    if key in device_name.upper():
      return value
  return None


def torch_worker(args) -> dict:
  import safetensors.torch
  import torch
  from diffusers import DDIMScheduler, UNetMotionModel
  from torch.utils.flop_counter import FlopCounterMode

  from vcjax.testing import build_models
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  cuda = dev.type == "cuda"
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  max_mem = torch.cuda.max_memory_allocated if cuda else (lambda: 0)
  reset_mem = torch.cuda.reset_peak_memory_stats if cuda else (lambda: None)
  dim = PRESETS[args.preset]["context_dim"]
  weights = os.path.join(args.work_dir, "unet.safetensors")
  unet2d, vae, text, adapter = build_models(PRESETS[args.preset]["size"], "v2")
  del vae, text
  model = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
  del unet2d, adapter
  if not os.path.exists(weights):
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    with open(os.path.join(args.work_dir, "config.json"), "w") as f:
      json.dump(dict(model.config), f, default=list)
  model = model.to(dev, torch.bfloat16)
  h = args.size // 8
  gen = torch.Generator().manual_seed(0)
  latents0 = torch.randn(1, 4, args.frames, h, h, generator=gen).to(dev)
  cond = torch.randn(1, 77, dim, generator=gen).to(dev, torch.bfloat16)
  uncond = torch.randn(1, 77, dim, generator=gen).to(dev, torch.bfloat16)
  ctx = torch.cat([uncond, cond]).repeat_interleave(args.frames, 0)  # per frame, as the pipeline does
  sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="linspace")
  out = {"framework": "diffusers", "device": torch.cuda.get_device_name(0) if cuda else "cpu"}

  def sample(steps):
    sched.set_timesteps(steps)
    x = latents0.clone()
    with torch.no_grad():
      for t in sched.timesteps:
        eps = model(torch.cat([x, x]).to(torch.bfloat16), t, ctx).sample.float()
        eps_u, eps_c = eps.chunk(2)
        x = sched.step(eps_u + args.guidance * (eps_c - eps_u), t, x).prev_sample
    sync()
    return x

  sample(args.steps)  # warm-up (cuDNN autotuning, allocator)
  reset_mem()
  times = []
  for _ in range(args.repeat):
    t0 = time.perf_counter()
    sample(args.steps)
    times.append(time.perf_counter() - t0)
  out.update(sample_s=min(times), sample_times=times, sample_peak=max_mem())

  from peft import LoraConfig, inject_adapter_in_model
  model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=SPATIAL_QKV), model)
  for n, p in model.named_parameters():
    p.requires_grad_("lora_" in n)
  x = latents0.to(torch.bfloat16)
  target = torch.randn_like(x)
  t = torch.tensor([500], device=dev)

  def step():
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x, t, ctx[args.frames:]).sample.float(), target.float())
    loss.backward()
    sync()

  step()
  with FlopCounterMode(display=False) as counter:
    step()
  out["train_flops"] = int(counter.get_total_flops())
  reset_mem()
  times = []
  for _ in range(args.train_repeat):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  out.update(train_s=sorted(times)[len(times) // 2], train_peak=max_mem())
  return out


def vcjax_worker(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import safetensors.numpy
  from flax import nnx

  from vcjax.diffusion.sampling import sample_loop
  from vcjax.diffusion.schedulers import make_scheduler
  from vcjax.loading import from_state_dict
  from vcjax.models.configs import UNet3DConfig, norm_semantics
  from vcjax.weights.bundle import unet_fields_from_diffusers
  with open(os.path.join(args.work_dir, "config.json")) as f:
    dcfg = json.load(f)
  cfg = UNet3DConfig(**unet_fields_from_diffusers(dcfg), motion_max_seq_length=dcfg["motion_max_seq_length"],
                     motion_mid_block=dcfg["use_motion_mid_block"], dtype="bfloat16", param_dtype="bfloat16",
                     attention=args.attention, **norm_semantics("diffusers", "v2"))
  unet = from_state_dict("unet", cfg, safetensors.numpy.load_file(os.path.join(args.work_dir, "unet.safetensors")),
                         dtype=jnp.bfloat16)
  device = jax.devices()[0]
  out = {"framework": "vcjax", "device": device.device_kind}
  h = args.size // 8
  rng = np.random.default_rng(0)
  latents0 = jnp.asarray(rng.standard_normal((1, args.frames, h, h, 4)), jnp.float32)
  dim = PRESETS[args.preset]["context_dim"]
  cond = jnp.asarray(rng.standard_normal((1, 77, dim)), jnp.bfloat16)
  uncond = jnp.asarray(rng.standard_normal((1, 77, dim)), jnp.bfloat16)
  graphdef, params = nnx.split(unet)
  sched = make_scheduler("ddim", None, args.steps)

  def sample():
    x = sample_loop(graphdef, params, jnp.array(latents0), scheduler=sched, cond=cond, uncond=uncond,
                    guidance_scale=args.guidance)
    return jax.block_until_ready(x)

  t0 = time.perf_counter()
  sample()  # compiles the step
  out["warmup_s"] = time.perf_counter() - t0
  times = []
  for _ in range(args.repeat):
    t0 = time.perf_counter()
    sample()
    times.append(time.perf_counter() - t0)
  out.update(sample_s=min(times), sample_times=times,
             sample_peak=int((device.memory_stats() or {}).get("peak_bytes_in_use", 0)))

  from vcjax.nn import lora as vlora
  vlora.add_lora(unet, rank=4, rngs=0, init="peft", dtype=jnp.bfloat16)
  gdef, trainable, frozen = nnx.split(unet, vlora.LoRAParam, ...)
  x = latents0.astype(jnp.bfloat16)
  target = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  ctx = cond

  @jax.jit
  def step(trainable, frozen, x, ctx, target):
    def loss_fn(trainable):
      pred = nnx.merge(gdef, trainable, frozen)(x, jnp.array([500]), ctx)
      return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))
    return jax.value_and_grad(loss_fn)(trainable)

  t0 = time.perf_counter()
  compiled = step.lower(trainable, frozen, x, ctx, target).compile()
  out["train_compile_s"] = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out["train_flops"] = int(cost.get("flops", 0))
  jax.block_until_ready(compiled(trainable, frozen, x, ctx, target))
  times = []
  for _ in range(args.train_repeat):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(trainable, frozen, x, ctx, target))
    times.append(time.perf_counter() - t0)
  out.update(train_s=sorted(times)[len(times) // 2],
             train_peak=int((device.memory_stats() or {}).get("peak_bytes_in_use", 0)))
  return out


def run_worker(name: str, args) -> dict:
  argv = ["--worker", name, "--work-dir", args.work_dir, "--preset", args.preset, "--frames", str(args.frames),
          "--size", str(args.size), "--steps", str(args.steps), "--repeat", str(args.repeat),
          "--train-repeat", str(args.train_repeat), "--guidance", str(args.guidance),
          "--attention", args.attention]
  return harness.run_worker(__file__, argv, what=f"{name} worker")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="sd15")
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--size", type=int, default=512, help="pixels (latents are size/8)")
  p.add_argument("--steps", type=int, default=25)
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--repeat", type=int, default=2)
  p.add_argument("--train-repeat", type=int, default=5)
  p.add_argument("--peak-tflops", type=float, default=None)
  p.add_argument("--attention", default="auto",
                 help='vcjax attention kernel (UNet3DConfig.attention): "auto", "cudnn", "chunked,chunk_bytes=N"')
  p.add_argument("--workers", default="torch,vcjax")
  p.add_argument("--work-dir", default=None)
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.worker:
    harness.print_result((torch_worker if args.worker == "torch" else vcjax_worker)(args))
    return 0
  tmp = None
  if args.work_dir is None:
    tmp = tempfile.TemporaryDirectory(prefix="vcjax-gpu-bench-")
    args.work_dir = tmp.name
  results = {name: run_worker(name, args) for name in args.workers.split(",")}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(args=vars(args), results=results), f, indent=1)
  print(f"1 x {args.frames} frames x {args.size}x{args.size}, {args.steps} DDIM steps, CFG {args.guidance}, bf16")
  for r in results.values():
    peak = peak_tflops(r["device"], args.peak_tflops)
    mfu = r["train_flops"] / r["train_s"] / (peak * 1e12) if peak and r.get("train_flops") else float("nan")
    print(f"[{r['framework']}] {r['device']}")
    if "warmup_s" in r:
      print(f"  first run (compile)  {r['warmup_s']:8.2f} s")
    print(f"  sampling             {r['sample_s']:8.2f} s  ({r['sample_s'] / args.steps * 1e3:.0f} ms/step)  "
          f"peak {r['sample_peak'] / 2**30:.1f} GiB")
    print(f"  lora step            {r['train_s'] * 1e3:8.1f} ms  peak {r['train_peak'] / 2**30:.1f} GiB  "
          f"{r['train_flops'] / 1e12:.3g} TFLOP/step  MFU {mfu:.1%}")
  if {"torch", "vcjax"} <= results.keys():
    v, d = results["vcjax"], results["torch"]
    print(f"lora step: ratio_time={v['train_s'] / d['train_s']:.3f}")
    ratio_mem = v["sample_peak"] / d["sample_peak"] if d["sample_peak"] else float("nan")
    print(f"ratio_time={v['sample_s'] / d['sample_s']:.3f} ratio_mem={ratio_mem:.3f}")
  if tmp is not None:
    tmp.cleanup()
  return 0


if __name__ == "__main__":
  sys.exit(main())
