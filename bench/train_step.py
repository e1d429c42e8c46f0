"""Full-parameter eps training step of small UNet3Ds: vcjax vs diffusers' UNetMotionModel, same weights.

    python bench/train_step.py                      # the 8.4M model of the issue, 4 x 16 frames x 16x16 latents
    python bench/train_step.py --shapes world       # the shipped world UNet (configs/world_t2v.py): 32/64/128
    python bench/train_step.py --shapes table       # alternative world shapes (model size, frames, size, batch)
    python bench/train_step.py --shapes c64-f16-l16-b4,c32-f8-l8-b8 --repeat 5

One process runs both frameworks, and their runs alternate (vcjax step, diffusers step, vcjax step, ...):
on a shared 2-core machine the load changes from minute to minute, so only interleaved medians give a
meaningful ratio. Per shape:
  model    diffusers `UNetMotionModel.from_unet2d(UNet2DConditionModel, MotionAdapter)` with random weights
           (`vcjax.testing.randomize_`), converted to vcjax with `vcjax.loading.from_state_dict` (diffusers
           norm semantics): both compute the same function (the forward's relative error is printed).
  step     eps objective: x_t = sqrt(abar) x0 + sqrt(1 - abar) noise at per-sample timesteps (SD's scaled-
           linear betas), MSE(unet(x_t, t, ctx), noise), gradient of every parameter, global-norm clip 1.0,
           AdamW (lr 1e-5, wd 1e-2), fp32. vcjax: `vcjax.train.state.make_train_step` + `make_optimizer`,
           compiled with `vcjax.compiler.jit` and the parameters / optimizer state donated, as `Trainer`
           does; diffusers: loss.backward(), clip_grad_norm_, torch.optim.AdamW.step().
  forward  the UNet alone, no gradient (vcjax: `harness.compile_unet_forward`; torch: `no_grad`).
  GFLOP/s  XLA's cost analysis of the compiled vcjax programs (the same arithmetic for both frameworks)
           divided by each framework's median time.
The final table is per shape: step and forward medians, vcjax / diffusers ratios, GFLOP/s and samples
(videos) per second, with the vcjax compile time.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import harness


@dataclasses.dataclass(frozen=True)
class Shape:
  """One model size and input shape, defined once for both frameworks."""
  channels: tuple[int, ...] = (64, 128, 128)
  frames: int = 16
  latent: int = 16  # latent height = width (pixels / 4 with the world's 4x VAE)
  batch: int = 4
  heads: int = 8  # spatial attention heads (diffusers' `attention_head_dim`, a head count in SD1.5)
  motion_heads: int = 8
  context_tokens: int = 16
  context_dim: int = 128
  layers_per_block: int = 1
  cross_attention: tuple[bool, ...] = (True, True, False)  # per level (down order)
  norm_groups: int = 32
  label: str = ""

  @property
  def name(self) -> str:
    return self.label or f"c{self.channels[0]}-f{self.frames}-l{self.latent}-b{self.batch}"

  @staticmethod
  def parse(name: str) -> "Shape":
    """`c64-f16-l16-b4`: first-level channels (levels c, 2c, 2c), frames, latent size, batch; or "world"."""
    if name == "world":
      return WORLD
    fields = {part[0]: int(part[1:]) for part in name.split("-")}
    c = fields.get("c", 64)
    return Shape(channels=(c, 2 * c, 2 * c), frames=fields.get("f", 16), latent=fields.get("l", 16),
                 batch=fields.get("b", 4), context_dim=2 * c)


DEFAULT = "c64-f16-l16-b4"  # 8.38M parameters
# configs/world_t2v.py's UNet: cross-attention on the two lower-resolution levels only, 4 heads, 16 groups,
# the world text encoder's 24 x 128 context.
WORLD = Shape(channels=(32, 64, 128), heads=4, motion_heads=4, context_tokens=24, context_dim=128,
              cross_attention=(False, True, True), norm_groups=16, label="world")
TABLE = ["c64-f16-l16-b4", "c64-f8-l16-b4", "c64-f16-l8-b4", "c64-f16-l16-b8", "c64-f8-l8-b8",
         "c32-f16-l16-b4", "c32-f8-l16-b8", "c32-f16-l8-b8"]


# ------------------------------------------------------------------------------------------------- models

def torch_model(shape: Shape):
  import torch
  from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

  from vcjax.testing import randomize_
  torch.manual_seed(0)
  levels = len(shape.channels)
  assert len(shape.cross_attention) == levels
  unet2d = UNet2DConditionModel(
      block_out_channels=shape.channels, layers_per_block=shape.layers_per_block,
      attention_head_dim=shape.heads, cross_attention_dim=shape.context_dim, norm_num_groups=shape.norm_groups,
      down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in shape.cross_attention),
      up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in shape.cross_attention[::-1]))
  adapter = MotionAdapter(block_out_channels=shape.channels, motion_layers_per_block=shape.layers_per_block,
                          motion_num_attention_heads=shape.motion_heads, motion_norm_num_groups=shape.norm_groups,
                          motion_max_seq_length=32, use_motion_mid_block=False)
  return randomize_(UNetMotionModel.from_unet2d(unet2d, adapter), 0).train()


def vcjax_model(model):
  from vcjax.loading import from_state_dict
  from vcjax.models.configs import UNet3DConfig, norm_semantics
  from vcjax.weights.bundle import unet_fields_from_diffusers
  dcfg = dict(model.config)
  cfg = UNet3DConfig(**unet_fields_from_diffusers(dcfg), motion_max_seq_length=dcfg["motion_max_seq_length"],
                     motion_mid_block=dcfg["use_motion_mid_block"], **norm_semantics("diffusers", "v3"))
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return from_state_dict("unet", cfg, sd)


def batch_arrays(shape: Shape, seed: int = 0):
  """x0 `(B, F, h, w, 4)`, noise, timesteps `(B,)`, context `(B, T, D)`, sqrt(abar) table (numpy)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  b, f, h = shape.batch, shape.frames, shape.latent
  x0 = rng.standard_normal((b, f, h, h, 4)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = rng.integers(0, 1000, size=(b,)).astype(np.int32)
  ctx = rng.standard_normal((b, shape.context_tokens, shape.context_dim)).astype(np.float32)
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2  # SD's scaled_linear
  abar = np.cumprod(1.0 - betas).astype(np.float32)
  return dict(x0=x0, noise=noise, t=t, ctx=ctx, abar=abar)


# -------------------------------------------------------------------------------------------------- steps

def vcjax_programs(unet, data):
  """(step(), forward(), info): callables that run one donated train step / one forward and block."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from vcjax import compiler
  from vcjax.train import state as st

  def loss_fn(model, batch, key):
    del key
    a = batch["abar"][batch["t"]][:, None, None, None, None]
    x_t = jnp.sqrt(a) * batch["x0"] + jnp.sqrt(1.0 - a) * batch["noise"]
    eps = model(x_t, batch["t"], batch["ctx"])
    return jnp.mean(jnp.square(eps - batch["noise"])), {}

  graphdef, trainable, frozen = st.split_model(unet, nnx.Param)
  tx = st.make_optimizer(st.OptimizerConfig())
  jitted = compiler.jit(st.make_train_step(graphdef, loss_fn, tx), donate_argnums=(0, 1))
  batch = {k: jnp.asarray(v) for k, v in data.items()}
  key = jax.random.key(0)
  opt_state = compiler.jit(tx.init)(trainable)
  t0 = time.perf_counter()
  compiled = jitted.lower(trainable, opt_state, frozen, batch, key).compile()
  info = dict(compile_s=time.perf_counter() - t0, step_flops=_flops(compiled),
              params=st.count_params(trainable))
  box = [trainable, opt_state]

  def step():
    box[0], box[1], metrics = compiled(box[0], box[1], frozen, batch, key)
    return float(metrics["loss"])

  gdef, state = nnx.split(unet)
  state = jax.tree.map(jnp.copy, state)  # the step donates (deletes) the arrays it was given
  a = data["abar"][data["t"]][:, None, None, None, None]
  x_t = jnp.asarray(a ** 0.5 * data["x0"] + (1 - a) ** 0.5 * data["noise"])
  t, ctx = jnp.asarray(data["t"]), jnp.asarray(data["ctx"])
  fwd, info["forward_compile_s"], _ = harness.compile_unet_forward(gdef, state, x_t, t, ctx)
  info["forward_flops"] = _flops(fwd)
  info["forward_out"] = lambda: jax.device_get(fwd(state, x_t, t, ctx))
  return step, lambda: jax.block_until_ready(fwd(state, x_t, t, ctx)), info


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def torch_programs(model, data, frames: int):
  import torch
  tensors = {k: torch.from_numpy(v) for k, v in data.items()}
  x0 = tensors["x0"].permute(0, 4, 1, 2, 3).contiguous()  # (B, C, F, H, W)
  noise = tensors["noise"].permute(0, 4, 1, 2, 3).contiguous()
  t = tensors["t"].long()
  ctx = tensors["ctx"].repeat_interleave(frames, 0)  # diffusers takes the prompt once per frame
  a = tensors["abar"][t][:, None, None, None, None]
  x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-8)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x_t, t, ctx).sample, noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()

  def forward():
    with torch.no_grad():
      return model(x_t, t, ctx).sample

  def forward_out():
    return forward().permute(0, 2, 3, 4, 1).numpy()

  return step, forward, forward_out


# ------------------------------------------------------------------------------------------------ driver

def interleaved(fns: dict, repeat: int) -> dict[str, list[float]]:
  """One warm-up call of each, then `repeat` rounds calling each once in turn."""
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  for _ in range(repeat):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def measure(shape: Shape, repeat: int, forward_repeat: int, *, torch_too: bool = True) -> dict:
  import numpy as np
  import torch
  model = torch_model(shape)
  unet = vcjax_model(model)
  data = batch_arrays(shape)
  v_step, v_fwd, info = vcjax_programs(unet, data)
  del unet
  t_step, t_fwd, t_out = torch_programs(model, data, shape.frames)
  out = dict(shape=shape.name, params=info["params"], compile_s=info["compile_s"],
             step_flops=info["step_flops"], forward_flops=info["forward_flops"], torch_threads=torch.get_num_threads())
  if torch_too:  # before any step: both models still hold the converted weights
    got, ref = info["forward_out"](), t_out()
    out["forward_rel_err"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
  fwd = interleaved(dict(vcjax=v_fwd, **({"diffusers": t_fwd} if torch_too else {})), forward_repeat)
  step = interleaved(dict(vcjax=v_step, **({"diffusers": t_step} if torch_too else {})), repeat)
  for name in fwd:
    out[f"{name}_forward_s"] = harness.median(fwd[name])
    out[f"{name}_step_s"] = harness.median(step[name])
    out[f"{name}_step_times"] = [round(x, 3) for x in step[name]]
  return out


def report_one(r: dict) -> None:
  print(f"[{r['shape']}] params {r['params'] / 1e6:.2f}M  step {r['step_flops'] / 1e9:.1f} GFLOP  forward "
        f"{r['forward_flops'] / 1e9:.1f} GFLOP  vcjax compile {r['compile_s']:.1f} s"
        + (f"  forward rel err vs diffusers {r['forward_rel_err']:.1e}" if "forward_rel_err" in r else ""))
  for name in ("vcjax", "diffusers"):
    if f"{name}_step_s" in r:
      print(f"  {name:9s} step {r[f'{name}_step_s']:7.3f} s ({r['step_flops'] / r[f'{name}_step_s'] / 1e9:5.1f} "
            f"GFLOP/s)  forward {r[f'{name}_forward_s']:6.3f} s ({r['forward_flops'] / r[f'{name}_forward_s'] / 1e9:5.1f}"
            f" GFLOP/s)  steps {r[f'{name}_step_times']}")
  if "diffusers_step_s" in r:
    print(f"  ratio vcjax/diffusers: step {r['vcjax_step_s'] / r['diffusers_step_s']:.3f}  forward "
          f"{r['vcjax_forward_s'] / r['diffusers_forward_s']:.3f}", flush=True)


def report_table(results: list[dict], batch_of) -> None:
  print("\n| shape | params | step GFLOP | vcjax step s | diffusers step s | ratio | vcjax fwd s | diffusers fwd s "
        "| fwd ratio | vcjax GFLOP/s | videos/s (vcjax) | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    v, d = r["vcjax_step_s"], r.get("diffusers_step_s")
    vf, df = r["vcjax_forward_s"], r.get("diffusers_forward_s")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    print(f"| {r['shape']} | {r['params'] / 1e6:.2f}M | {r['step_flops'] / 1e9:.0f} | {v:.3f} | {fmt(d)} | "
          f"{fmt(d and v / d)} | {vf:.3f} | {fmt(df)} | {fmt(df and vf / df)} | {r['step_flops'] / v / 1e9:.1f} | "
          f"{batch_of(r) / v:.2f} | {r['compile_s']:.0f} |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default=DEFAULT, help=f"comma-separated shape names, or 'table' ({','.join(TABLE)})")
  p.add_argument("--repeat", type=int, default=5, help="timed train steps per framework (interleaved)")
  p.add_argument("--forward-repeat", type=int, default=5)
  p.add_argument("--vcjax-only", action="store_true", help="skip diffusers (profiling runs)")
  args = p.parse_args(argv)
  names = TABLE if args.shapes == "table" else args.shapes.split(",")
  results = []
  for name in names:
    r = measure(Shape.parse(name), args.repeat, args.forward_repeat, torch_too=not args.vcjax_only)
    report_one(r)
    results.append(r)
  report_table(results, lambda r: Shape.parse(r["shape"]).batch)
  return 0


if __name__ == "__main__":
  sys.exit(main())
