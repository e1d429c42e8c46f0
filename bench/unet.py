"""UNet3D forward and one LoRA training step: vcjax vs diffusers' UNetMotionModel, same random weights.

    python bench/unet.py --preset tiny            # seconds
    python bench/unet.py --preset sd15            # SD1.5 + AnimateDiff v2 (~1.3B params); minutes on CPU

Both frameworks run in their own subprocess (so that one's memory does not count against the other):
  torch  builds the random model (vcjax.testing.build_models + UNetMotionModel.from_unet2d),
         saves its state dict to WORK/unet.safetensors, then times it (diffusers' default attention
         processor: torch scaled_dot_product_attention).
  vcjax  loads that file with vcjax.loading.from_state_dict and times `jax.jit(UNet3D)`.
Inputs: 1 video x FRAMES frames of LATENT x LATENT latents (default 16 x 32 x 32, i.e. 256x256 pixels, for
sd15; 16 x 16 x 16 for tiny), 77 context tokens, fp32. The sd15 LoRA step runs on 8 x 16 x 16 (see
--train-frames / --train-latent): at 16 x 32 x 32 neither framework fits a training step in 23 GB of RAM.

Measured, per framework:
  compile   vcjax: `jit(...).lower(...).compile()` wall time (forward; training step separately).
  forward   median wall time of --repeat runs after one warm-up run.
  peak mem  peak resident memory above the process's RSS once the model and inputs are loaded (and, for
            vcjax, compiled), after glibc's malloc_trim has returned freed heap to the OS: Linux's VmHWM is
            reset through /proc/self/clear_refs ("5") just before the runs and read after them (warm-up
            run included). The LoRA step's peak is measured the same way, against the same baseline.
            vcjax also prints XLA's own buffer plan (`compiled.memory_analysis()`: temp + output).
  lora step forward + backward of an MSE loss w.r.t. rank-4 LoRA weights on the spatial attentions' to_q /
            to_k / to_v (attn1 and attn2; CustomCrafter's targets), no optimizer update. torch: peft
            `inject_adapter_in_model`; vcjax: `vcjax.nn.lora.add_lora` + `jax.grad` over the LoRAParam state
            (or, without vcjax.nn.lora, the gradient w.r.t. those layers' base kernels as a stand-in).
The last line is `ratio_time=X ratio_mem=Y` (vcjax / diffusers, forward time and forward peak memory).

vcjax compiles with `vcjax.compiler`'s options (on CPU: memory-optimized scheduler, no YNNPACK fusions), as
its sampler and trainer do; --xla-defaults compiles with XLA's defaults instead.
Options for experiments: --xla-flags (added to XLA_FLAGS of the vcjax worker), --attention (vcjax's attention
kernel, UNet3DConfig.attention), --workers, --work-dir (reuse the saved weights), --no-train.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

import harness

SPATIAL_QKV = r".*attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.to_[qkv]"
PRESETS = {"tiny": dict(size="tiny", context_dim=32), "sd15": dict(size="sd15", context_dim=768)}


# --------------------------------------------------------------------------------------------- measuring

def measured_runs(fn, repeat: int) -> tuple[list[float], int]:
  """One warm-up call then `repeat` timed calls; returns (times, peak RSS bytes during all of them)."""
  harness.release_free_memory()
  harness.reset_peak()
  times = harness.timed_runs(fn, repeat)
  return times, harness.peak_bytes()


def inputs(args, context_dim: int, *, train: bool = False):
  """latents `(1, 4, F, h, w)` (diffusers layout), timesteps, context `(1, 77, D)`, regression target."""
  import numpy as np
  rng = np.random.default_rng(0)
  f, h = (args.train_frames, args.train_latent) if train else (args.frames, args.latent)
  latents = rng.standard_normal((1, 4, f, h, h)).astype(np.float32)
  context = rng.standard_normal((1, 77, context_dim)).astype(np.float32)
  target = rng.standard_normal(latents.shape).astype(np.float32)
  return latents, np.array([500], np.int64), context, target


# ------------------------------------------------------------------------------------------------- torch

def torch_worker(args) -> dict:
  import numpy as np
  import safetensors.torch
  import torch
  from diffusers import UNetMotionModel

  from vcjax.testing import build_models
  preset = PRESETS[args.preset]
  weights = os.path.join(args.work_dir, "unet.safetensors")
  unet2d, vae, text, adapter = build_models(preset["size"], "v2")
  del vae, text
  model = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
  del unet2d, adapter
  if not os.path.exists(weights):
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    with open(os.path.join(args.work_dir, "config.json"), "w") as f:
      json.dump(dict(model.config), f, default=list)
  latents, t, context, target = (torch.from_numpy(x) for x in inputs(args, preset["context_dim"]))
  context = context.repeat_interleave(args.frames, 0)  # diffusers takes the prompt once per frame
  out = {"framework": "diffusers", "threads": torch.get_num_threads(),
         "params": sum(p.numel() for p in model.parameters())}
  harness.release_free_memory()
  base = harness.rss_bytes()

  def forward():
    with torch.no_grad():
      return model(latents, t, context).sample

  times, peak = measured_runs(forward, args.repeat)
  out.update(forward_s=harness.median(times), forward_times=times, forward_peak=peak - base)
  np.save(os.path.join(args.work_dir, "torch_out.npy"), forward().numpy())
  if not args.no_train:
    from peft import LoraConfig, inject_adapter_in_model
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=SPATIAL_QKV), model)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for n, p in model.named_parameters():
      p.requires_grad_("lora_" in n)
    tl, tt, tc, ttarget = (torch.from_numpy(x) for x in inputs(args, preset["context_dim"], train=True))
    tc = tc.repeat_interleave(args.train_frames, 0)

    def step():
      model.zero_grad(set_to_none=True)
      loss = torch.nn.functional.mse_loss(model(tl, tt, tc).sample, ttarget)
      loss.backward()
      return loss.item()

    times, peak = measured_runs(step, args.train_repeat)
    out.update(train_s=harness.median(times), train_times=times, train_peak=peak - base, lora_tensors=len(lora),
               lora_params=sum(p.numel() for p in lora), lora_kind="peft")
  return out


# ------------------------------------------------------------------------------------------------- vcjax

def vcjax_worker(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import safetensors.numpy
  from flax import nnx

  from vcjax import compiler
  from vcjax.loading import from_state_dict
  from vcjax.models.configs import UNet3DConfig, norm_semantics
  from vcjax.weights.bundle import unet_fields_from_diffusers
  options = not args.xla_defaults  # False: XLA's defaults (less the YNNPACK miscompile, see vcjax.compiler)
  preset = PRESETS[args.preset]
  with open(os.path.join(args.work_dir, "config.json")) as f:
    dcfg = json.load(f)
  cfg = UNet3DConfig(**unet_fields_from_diffusers(dcfg), motion_max_seq_length=dcfg["motion_max_seq_length"],
                     motion_mid_block=dcfg["use_motion_mid_block"], attention=args.attention or "auto",
                     **norm_semantics("diffusers", "v2"))
  sd = safetensors.numpy.load_file(os.path.join(args.work_dir, "unet.safetensors"))
  unet = from_state_dict("unet", cfg, sd)
  del sd
  latents, t, context, _ = inputs(args, preset["context_dim"])
  x = jnp.asarray(latents.transpose(0, 2, 3, 4, 1))  # (B, F, H, W, C)
  tj, ctx = jnp.asarray(t), jnp.asarray(context)
  tlat, _, _, ttarget = inputs(args, preset["context_dim"], train=True)
  tx, tgt = (jnp.asarray(a.transpose(0, 2, 3, 4, 1)) for a in (tlat, ttarget))
  graphdef, state = nnx.split(unet)
  out = {"framework": "vcjax", "xla_flags": os.environ.get("XLA_FLAGS", ""), "attention": args.attention,
         "compiler_options": compiler.compiler_options(options),
         "devices": str(jax.devices()),
         "params": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state))}

  fwd, out["compile_s"], out["xla_forward_temp"] = harness.compile_unet_forward(graphdef, state, x, tj, ctx, options=options)

  train = None
  if not args.no_train:
    try:
      from vcjax.nn import lora as vlora
    except ImportError:
      vlora = None
    if vlora is not None:
      paths = vlora.add_lora(unet, rank=4, rngs=0, init="peft")
      gdef, trainable, frozen = nnx.split(unet, vlora.LoRAParam, ...)
      out.update(lora_kind="vcjax.nn.lora", lora_tensors=2 * len(paths))
    else:  # stand-in: gradient w.r.t. the base kernels of the same layers
      pattern = re.compile(SPATIAL_QKV.replace(r"\.", "/") + "/kernel$")
      is_target = lambda path, _: bool(pattern.match("/".join(str(p) for p in path)))
      gdef, trainable, frozen = nnx.split(unet, nnx.All(nnx.Param, is_target), ...)
      out.update(lora_kind="stand-in: grad w.r.t. base q/k/v kernels",
                 lora_tensors=len(jax.tree.leaves(trainable)))
    out["lora_params"] = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(trainable))

    @compiler.jit(options=options)
    def step(trainable, frozen, x, t, ctx, tgt):
      def loss_fn(trainable):
        pred = nnx.merge(gdef, trainable, frozen)(x, t, ctx)
        return jnp.mean(jnp.square(pred - tgt))
      return jax.value_and_grad(loss_fn)(trainable)

    t0 = time.perf_counter()
    train = step.lower(trainable, frozen, tx, tj, ctx, tgt).compile()
    out["train_compile_s"] = time.perf_counter() - t0
    mem = train.memory_analysis()
    out["xla_train_temp"] = int(mem.temp_size_in_bytes + mem.output_size_in_bytes)

  harness.release_free_memory()
  base = harness.rss_bytes()
  times, peak = measured_runs(lambda: jax.block_until_ready(fwd(state, x, tj, ctx)), args.repeat)
  out.update(forward_s=harness.median(times), forward_times=times, forward_peak=peak - base)
  got = np.asarray(fwd(state, x, tj, ctx)).transpose(0, 4, 1, 2, 3)
  ref_path = os.path.join(args.work_dir, "torch_out.npy")
  if os.path.exists(ref_path):
    ref = np.load(ref_path).reshape(got.shape)
    out["rel_err_vs_diffusers"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
  if train is not None:
    times, peak = measured_runs(lambda: jax.block_until_ready(train(trainable, frozen, tx, tj, ctx, tgt)),
                             args.train_repeat)
    out.update(train_s=harness.median(times), train_times=times, train_peak=peak - base)
  return out


# ------------------------------------------------------------------------------------------------ driver

def run_worker(name: str, args, extra_env: dict[str, str]) -> dict:
  argv = ["--worker", name, "--preset", args.preset, "--frames", str(args.frames), "--latent", str(args.latent),
          "--repeat", str(args.repeat), "--train-repeat", str(args.train_repeat), "--train-frames",
          str(args.train_frames), "--train-latent", str(args.train_latent), "--work-dir", args.work_dir]
  if args.no_train:
    argv.append("--no-train")
  if args.attention:
    argv += ["--attention", args.attention]
  if args.xla_defaults:
    argv.append("--xla-defaults")
  return harness.run_worker(__file__, argv, env=extra_env, what=f"{name} worker")


def mib(x) -> str:
  return f"{x / 2**20:8.0f} MiB"


def report(results: dict[str, dict], args) -> None:
  print(f"preset {args.preset}: 1 x {args.frames} frames x {args.latent}x{args.latent} latents, fp32")
  for r in results.values():
    lines = [f"[{r['framework']}] params {r['params'] / 1e6:.1f}M"]
    if r["framework"] == "vcjax":
      lines.append(f"  compiler options    {r['compiler_options']}")
    if "compile_s" in r:
      lines.append(f"  compile (forward)   {r['compile_s']:8.2f} s")
    lines.append(f"  forward (median)    {r['forward_s']:8.3f} s   runs {[round(x, 3) for x in r['forward_times']]}")
    lines.append(f"  forward peak mem    {mib(r['forward_peak'])}" +
                 (f"   (XLA plan: {mib(r['xla_forward_temp']).strip()})" if "xla_forward_temp" in r else ""))
    if "train_s" in r:
      if "train_compile_s" in r:
        lines.append(f"  compile (lora step) {r['train_compile_s']:8.2f} s")
      lines.append(f"  lora step (median)  {r['train_s']:8.3f} s   (input 1 x {args.train_frames} x "
                   f"{args.train_latent}x{args.train_latent}; {r['lora_kind']}, {r['lora_tensors']} "
                   f"tensors, {r['lora_params'] / 1e6:.2f}M params)")
      lines.append(f"  lora step peak mem  {mib(r['train_peak'])}" +
                   (f"   (XLA plan: {mib(r['xla_train_temp']).strip()})" if "xla_train_temp" in r else ""))
    if "rel_err_vs_diffusers" in r:
      lines.append(f"  output rel err vs diffusers {r['rel_err_vs_diffusers']:.2e}")
    print("\n".join(lines))
  if {"torch", "vcjax"} <= results.keys():
    v, d = results["vcjax"], results["torch"]
    if "train_s" in v and "train_s" in d:
      print(f"lora step: ratio_time={v['train_s'] / d['train_s']:.3f} "
            f"ratio_mem={v['train_peak'] / d['train_peak']:.3f}")
    print(f"ratio_time={v['forward_s'] / d['forward_s']:.3f} ratio_mem={v['forward_peak'] / d['forward_peak']:.3f}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--latent", type=int, default=None, help="latent size (default 32 for sd15, 16 for tiny)")
  p.add_argument("--repeat", type=int, default=None, help="timed forward runs (default 5 tiny, 3 sd15)")
  p.add_argument("--train-repeat", type=int, default=None, help="timed LoRA steps (default 3 tiny, 1 sd15)")
  p.add_argument("--train-frames", type=int, default=None,
                 help="frames of the LoRA step's input (default: --frames for tiny, 8 for sd15)")
  p.add_argument("--train-latent", type=int, default=None,
                 help="latent size of the LoRA step's input (default: --latent for tiny, 16 for sd15)")
  p.add_argument("--no-train", action="store_true")
  p.add_argument("--xla-flags", default="", help="added to XLA_FLAGS for the vcjax worker")
  p.add_argument("--attention", default=None,
                 help='vcjax attention kernel (UNet3DConfig.attention): "chunked", "chunked,chunk_bytes=N"')
  p.add_argument("--xla-defaults", action="store_true",
                 help="compile with XLA's default options instead of vcjax.compiler's")
  p.add_argument("--workers", default="torch,vcjax")
  p.add_argument("--work-dir", default=None, help="where the weights are saved (default: a temp dir)")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--json", default=None, help="also write the results to this file")
  args = p.parse_args(argv)
  args.repeat = args.repeat or (5 if args.preset == "tiny" else 3)
  args.latent = args.latent or (16 if args.preset == "tiny" else 32)  # tiny: seconds, not minutes
  args.train_repeat = args.train_repeat or (3 if args.preset == "tiny" else 1)
  # SD1.5 at 16 x 32x32 does not fit a training step in 23 GB of RAM (XLA plans ~41 GB of buffers, and
  # torch was killed for memory): the sd15 LoRA step runs on a smaller input.
  args.train_frames = args.train_frames or (args.frames if args.preset == "tiny" else 8)
  args.train_latent = args.train_latent or (args.latent if args.preset == "tiny" else 16)
  if args.worker:
    harness.print_result((torch_worker if args.worker == "torch" else vcjax_worker)(args))
    return 0
  tmp = None
  if args.work_dir is None:
    tmp = tempfile.TemporaryDirectory(prefix="vcjax-bench-")
    args.work_dir = tmp.name
  os.makedirs(args.work_dir, exist_ok=True)
  results = {}
  for name in args.workers.split(","):
    extra = {}
    if name == "vcjax" and args.xla_flags:
      extra["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    results[name] = run_worker(name, args, extra)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(args=vars(args), results=results), f, indent=1)
  report(results, args)
  if tmp is not None:
    tmp.cleanup()
  return 0


if __name__ == "__main__":
  sys.exit(main())
