"""LoRA adapters on vcjax `Linear` layers, kept UNMERGED so that their scale can change at run time.

CustomCrafter (METHODS.md §4) trains a rank-4 LoRA on the spatial attention projections and samples with a
LoRA scale that depends on the denoising step ("dynamic weighted sampling"). Merging the LoRA into the
weights would freeze the scale, so the adapter lives next to the base weight:

    y = x @ kernel + bias + lora_scale * (x @ lora_down) @ lora_up

with no alpha/rank factor inside (a file's alpha is folded into `lora_up` when it is loaded).

Variable types: `LoRAParam` for lora_down `(in, r)` / lora_up `(r, out)` and `LoRAScale` for the per-layer
float32 scalar. Neither is an `nnx.Param`: base-weight loading/saving (vcjax.weights.keymaps, .store)
filters on nnx.Param and never sees them, and a trainer selects the adapter with `nnx.All(LoRAParam)` /
`LoRAParam` filters.

Compiled sampling loops: `with_lora_scale(state, scale)` returns the split state with every LoRAScale
replaced by `scale` (a traced value is fine), e.g.

    graphdef, state = nnx.split(unet)
    def step(i, x):
      eps = nnx.merge(graphdef, with_lora_scale(state, scales[i]))(x, t[i], ctx)
      ...

Everything here is in vcjax's terms: module paths (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`)
and flax layout (down `(in, r)`, up `(r, out)`). LoRA files, diffusers names (`to_out.0`, `ff.net.0.proj`) and
PyTorch layout are vcjax.weights.lora_files' (read_lora / load_lora / load_lora_file / save_lora*, merge_lora),
which attaches through `attach_loras`; this module imports nothing from vcjax.weights.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax.nn.layers import Linear


class LoRAParam(nnx.Variable):
  """A LoRA matrix: lora_down `(in, r)` or lora_up `(r, out)`. Trainable, but not an nnx.Param."""


class LoRAScale(nnx.Variable):
  """The run-time multiplier of one layer's LoRA (float32 scalar); not trained."""


# to_q/to_k/to_v of attn1 and attn2 in every SPATIAL transformer block (down, mid, up); not to_out, not the
# feed-forward, not the motion modules' temporal attention. (CustomCrafter's targets: methods/customcrafter.)
SPATIAL_QKV = r"(^|\.)attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.to_[qkv]$"

# What a LoRA that cannot apply at run time should do instead.
MERGE_HINT = "merge conv LoRAs into the weights with vcjax.weights.lora_files.merge_lora"


class LoRAError(ValueError):
  """A LoRA does not fit the model (unknown module, not a Linear, wrong shape)."""


def linear_modules(model: nnx.Module) -> dict[str, Linear]:
  """Every Linear of `model`, keyed by its dotted vcjax module path."""
  return {".".join(str(p) for p in path): m for path, m in nnx.iter_modules(model) if isinstance(m, Linear)}


def has_lora(linear: Linear) -> bool:
  return getattr(linear, "lora_down", None) is not None


def lora_modules(model: nnx.Module) -> dict[str, Linear]:
  """The Linears of `model` that carry a LoRA, keyed by vcjax module path."""
  return {p: m for p, m in linear_modules(model).items() if has_lora(m)}


def attach_lora(linear: Linear, down, up, scale: float = 1.0, *, dtype=jnp.float32) -> None:
  """Give `linear` the adapter down `(in, r)`, up `(r, out)` (replacing any it had), with run-time `scale`."""
  fan_in, fan_out = linear.kernel.get_value().shape
  down, up = jnp.asarray(down, dtype), jnp.asarray(up, dtype)
  if down.ndim != 2 or up.ndim != 2 or down.shape != (fan_in, down.shape[1]) or up.shape != (down.shape[1], fan_out):
    raise LoRAError(f"LoRA down {tuple(down.shape)} / up {tuple(up.shape)} do not fit a Linear {fan_in} -> {fan_out} "
                    f"(need ({fan_in}, r) and (r, {fan_out}))")
  linear.lora_down = LoRAParam(down)
  linear.lora_up = LoRAParam(up)
  linear.lora_scale = LoRAScale(jnp.asarray(scale, jnp.float32))


def remove_lora(model: nnx.Module) -> list[str]:
  """Detach every LoRA (the base weights are untouched). Returns the paths that had one."""
  found = lora_modules(model)
  for m in found.values():
    m.lora_down = m.lora_up = m.lora_scale = None
  return sorted(found)


def _select(model: nnx.Module, targets: str | Iterable[str]) -> dict[str, Linear]:
  linears = linear_modules(model)
  if isinstance(targets, str):
    rx = re.compile(targets)
    return {p: m for p, m in linears.items() if rx.search(p)}
  wanted = list(targets)
  missing = [t for t in wanted if t not in linears]
  if missing:
    raise LoRAError(f"{len(missing)} LoRA targets are not Linear layers of the model: {', '.join(missing[:6])}")
  return {t: linears[t] for t in wanted}


def add_lora(model: nnx.Module, *, rank: int = 4, targets: str | Iterable[str] = SPATIAL_QKV,
             rngs: nnx.Rngs | int, init: str = "customcrafter", scale: float = 1.0,
             dtype=jnp.float32) -> list[str]:
  """Attach fresh LoRAs of `rank` to the Linears whose vcjax path matches `targets` (a regex searched in
  the dotted path, or an explicit list of vcjax module paths). Returns the sorted paths.

  init "customcrafter": down ~ N(0, std 1/rank), up = 0 (METHODS.md §4), so the model's output is
  unchanged until training moves `up`. init "peft": down ~ U(+-1/sqrt(in)) (PEFT's kaiming-uniform with
  a=sqrt(5)), up = 0.
  """
  if rank < 1:
    raise LoRAError(f"LoRA rank must be >= 1, got {rank}")
  if init not in ("customcrafter", "peft"):
    raise LoRAError(f"unknown LoRA init {init!r}; expected 'customcrafter' or 'peft'")
  rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
  chosen = _select(model, targets)
  if not chosen:
    raise LoRAError(f"no Linear layer of the model matches the LoRA targets {targets!r}")
  for path in sorted(chosen):
    m = chosen[path]
    fan_in, fan_out = m.kernel.get_value().shape
    key = rngs.params()
    if init == "customcrafter":
      down = jax.random.normal(key, (fan_in, rank), jnp.float32) / rank
    else:
      bound = 1.0 / np.sqrt(fan_in)
      down = jax.random.uniform(key, (fan_in, rank), jnp.float32, -bound, bound)
    attach_lora(m, down, jnp.zeros((rank, fan_out), jnp.float32), scale, dtype=dtype)
  return sorted(chosen)


def attach_loras(model: nnx.Module, adapters: Mapping[str, tuple[object, object]], *, scale: float = 1.0,
                 replace: bool = False, dtype=jnp.float32) -> list[str]:
  """Attach several adapters {vcjax path: (down (in, r), up (r, out))} at run-time `scale`; everything is
  checked before anything is attached. Returns the sorted paths.

  replace: allow replacing a LoRA already on a layer (else that is an error: two LoRAs do not stack at
    run time; merge one of them instead).
  """
  linears = linear_modules(model)
  modules = {".".join(str(x) for x in p): m for p, m in nnx.iter_modules(model)}
  plan, problems = [], []
  for path, (down, up) in sorted(adapters.items()):
    target = linears.get(path)
    if target is None:
      kind = type(modules[path]).__name__ if path in modules else None
      problems.append(f"{path} (a {kind}: only Linear layers take a LoRA at run time; {MERGE_HINT})" if kind
                      else f"{path} (no such module)")
      continue
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    if down.ndim != 2 or up.ndim != 2:
      problems.append(f"{path} (down {down.shape}, up {up.shape}: only Linear (or 1x1 conv) LoRAs apply at run "
                      f"time; {MERGE_HINT})")
      continue
    fan_in, fan_out = target.kernel.get_value().shape
    if down.shape[0] != fan_in or up.shape[1] != fan_out or up.shape[0] != down.shape[1]:
      problems.append(f"{path} (down {down.shape}, up {up.shape} for a Linear {fan_in} -> {fan_out})")
      continue
    if has_lora(target) and not replace:
      problems.append(f"{path} (already has a LoRA; pass replace=True or merge one of them)")
      continue
    plan.append((path, target, down, up))
  if problems:
    shown = "; ".join(problems[:6]) + ("; ..." if len(problems) > 6 else "")
    raise LoRAError(f"{len(problems)} LoRA targets do not fit the model: {shown}")
  for _, target, down, up in plan:
    attach_lora(target, down, up, scale, dtype=dtype)
  return sorted(p for p, *_ in plan)


def _scale_vars(tree) -> list[LoRAScale]:
  return [v for v in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
          if isinstance(v, LoRAScale)]


def set_lora_scale(model_or_state, scale):
  """Set every LoRAScale of a module, or of a state from `nnx.split`, to `scale` (in place; returned)."""
  value = jnp.asarray(scale, jnp.float32)
  if isinstance(model_or_state, nnx.Module):
    for m in lora_modules(model_or_state).values():
      m.lora_scale.set_value(value)
  else:
    for v in _scale_vars(model_or_state):
      v.set_value(value)
  return model_or_state


def with_lora_scale(state, scale):
  """A copy of `state` (from `nnx.split`) whose every LoRAScale is `scale` (float32; may be traced).

  Pure, for use inside jit / lax loops: `nnx.merge(graphdef, with_lora_scale(state, scales[i]))`.
  """
  value = jnp.asarray(scale, jnp.float32)
  return jax.tree.map(lambda v: v.replace(value) if isinstance(v, LoRAScale) else v, state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def lora_arrays(model: nnx.Module) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
  """{vcjax path: (down (in, r), up (r, out), scale)} of every attached LoRA, as numpy."""
  return {p: (np.asarray(m.lora_down.get_value()), np.asarray(m.lora_up.get_value()),
              float(np.asarray(m.lora_scale.get_value())))
          for p, m in sorted(lora_modules(model).items())}


def fuse_lora(model: nnx.Module, *, remove: bool = True) -> list[str]:
  """Merge every LoRA into its base kernel at its current scale (kernel += scale * down @ up, in float32),
  then detach it unless `remove` is False (then its scale is set to 0 so the output does not change)."""
  fused = lora_modules(model)
  for m in fused.values():
    kernel = m.kernel.get_value()
    delta = m.lora_scale.get_value() * (m.lora_down.get_value().astype(jnp.float32)
                                        @ m.lora_up.get_value().astype(jnp.float32))
    m.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
    if remove:
      m.lora_down = m.lora_up = m.lora_scale = None
    else:
      m.lora_scale.set_value(jnp.zeros((), jnp.float32))
  return sorted(fused)
