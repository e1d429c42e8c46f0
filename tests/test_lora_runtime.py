"""Unmerged LoRA at run time (vcjax.nn.lora) and the step-dependent LoRA scale (CustomCrafter, METHODS.md §4).

The reference for every unmerged LoRA is the same UNet with the LoRA merged into its weights
(W + s * down @ up), run through the identical compiled forward. To keep this file fast, every forward
goes through one jitted function keyed by the graphdef, so only three UNet graphs are compiled: the plain
UNet, the UNet with LoRAs on CustomCrafter's 36 targets, and the jitted sampling loop.
"""

import functools
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.reference import rel_err
from vcjax.methods.customcrafter.schedule import lora_scales, skipped_steps
from vcjax.models.blocks import SpatialTransformer, TransformerBlock
from vcjax.models.configs import tiny_unet
from vcjax.models.unet3d import UNet3D
from vcjax.nn import lora as L
from vcjax.nn.layers import Conv
from vcjax.weights import export, keymaps, lora_files, store
from vcjax.weights.lora_files import merge_lora, module_names, read_lora
from vcjax.weights.sources import save_safetensors

CFG = tiny_unet()
RANK = 4


def random_unet(seed: int) -> UNet3D:
  """UNet3D(tiny) with random weights of a sensible scale everywhere (norms and biases included).

  Built abstractly and filled from numpy: eager per-parameter init of the whole UNet costs more than
  compiling its forward on a 2-core machine."""
  model = nnx.eval_shape(lambda: UNet3D(CFG, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for path, var in flat:
    shape, name = var.get_value().shape, str(path[-1])
    if len(shape) == 1:
      value = (1.0 if name == "scale" else 0.0) + 0.1 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    var.set_value(jnp.asarray(value, jnp.float32))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x, t, ctx):
  return nnx.merge(graphdef, state)(x, t, ctx)


def forward(model, inputs) -> np.ndarray:
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, *inputs))


@pytest.fixture(scope="module")
def base():
  rng = np.random.default_rng(1)
  inputs = (jnp.asarray(rng.standard_normal((1, 3, 8, 8, 4)), jnp.float32), jnp.asarray([400]),
            jnp.asarray(rng.standard_normal((1, 5, 32)), jnp.float32))
  model = random_unet(0)
  return model, inputs, forward(model, inputs)


def with_random_lora(model, seed=1):
  """A copy of `model` with CustomCrafter's LoRAs whose `up` is random (as after training)."""
  m = nnx.clone(model)
  L.add_lora(m, rank=RANK, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for lin in L.lora_modules(m).values():
    lin.lora_up.set_value(jnp.asarray(0.3 * rng.standard_normal(lin.lora_up.get_value().shape), jnp.float32))
  return m


def spatial_qkv_targets(model) -> set[str]:
  blocks = [".".join(map(str, p)) for p, m in nnx.iter_modules(model)
            if isinstance(m, TransformerBlock) and "motion_modules" not in map(str, p)]
  assert len(blocks) == 6  # tiny: 2 down, 1 mid, 3 up spatial transformers, one block each
  return {f"{b}.attn{a}.to_{p}" for b in blocks for a in (1, 2) for p in "qkv"}


def test_add_lora_targets_spatial_qkv_only(base):
  model = nnx.clone(base[0])
  params_before = keymaps.module_param_shapes(model)
  paths = L.add_lora(model, rank=RANK, rngs=nnx.Rngs(1))
  assert set(paths) == spatial_qkv_targets(model) and len(paths) == 36
  lora_vars = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, L.LoRAParam))}
  assert lora_vars == {f"{p}.lora_{w}" for p in paths for w in ("down", "up")}
  assert len(nnx.to_flat_state(nnx.state(model, L.LoRAScale))) == 36
  assert not any("motion_modules" in p or "to_out" in p or ".ff." in p for p in lora_vars)
  # Base-weight I/O filters on nnx.Param and must not see the adapter.
  assert keymaps.module_param_shapes(model) == params_before
  assert not any("lora" in k for k in store.flat_params(model))
  downs = np.concatenate([np.ravel(m.lora_down.get_value()) for m in L.lora_modules(model).values()])
  ups = [np.asarray(m.lora_up.get_value()) for m in L.lora_modules(model).values()]
  print(f"LoRA init: down std {downs.std():.4f} (want 1/r = {1 / RANK}), {downs.size} values")
  assert abs(downs.std() * RANK - 1) < 0.1 and abs(downs.mean()) < 0.02
  assert all(not u.any() for u in ups)
  assert L.remove_lora(model) == paths and not L.lora_modules(model)


def test_zero_up_init_leaves_output_unchanged(base):
  model, inputs, want = base
  fresh = nnx.clone(model)
  L.add_lora(fresh, rank=RANK, rngs=nnx.Rngs(3))
  err = rel_err(forward(fresh, inputs), want)
  print(f"fresh LoRA (up = 0) vs base: rel err {err:.2e}")
  assert err <= 1e-6


def test_unmerged_lora_equals_merged_weights(base):
  model, inputs, want_base = base
  s = 0.7
  lora = with_random_lora(model)
  L.set_lora_scale(lora, s)
  got = forward(lora, inputs)
  merged = nnx.clone(model)
  linears = L.linear_modules(merged)
  for path, (down, up, scale) in L.lora_arrays(lora).items():
    assert scale == pytest.approx(s)
    k = linears[path].kernel
    k.set_value(jnp.asarray(np.asarray(k.get_value(), np.float64) + s * (down.astype(np.float64) @ up), jnp.float32))
  want = forward(merged, inputs)
  err = rel_err(got, want)
  print(f"unmerged LoRA (scale {s}) vs merged weights: rel err {err:.2e}; "
        f"LoRA changes the output by {rel_err(got, want_base):.2e}")
  assert err <= 1e-5
  assert rel_err(got, want_base) > 1e-2  # the LoRA really does something
  # scale 0: the base model (nearly bit-exact)
  err0 = rel_err(forward(L.set_lora_scale(lora, 0.0), inputs), want_base)
  print(f"scale 0 vs base: rel err {err0:.2e}")
  assert err0 <= 1e-6
  # with_lora_scale on a split state, and fuse_lora (merge at the current scale, then detach)
  graphdef, state = nnx.split(lora)
  got_state = np.asarray(_forward(graphdef, L.with_lora_scale(state, s), *inputs))
  assert rel_err(got_state, got) <= 1e-7
  L.set_lora_scale(lora, s)
  L.fuse_lora(lora)
  assert not L.lora_modules(lora)
  assert rel_err(forward(lora, inputs), want) <= 1e-5


def test_schedule_in_jitted_loop_matches_python_set_scales(base):
  model, inputs, _ = base
  num_steps, first, last = 8, 3, 7  # steps 3..6 straddle the switch after K = 5 steps
  scales = lora_scales("paper", num_steps)
  np.testing.assert_array_equal(scales, np.float32([0.4] * 5 + [0.8] * 3))
  np.testing.assert_array_equal(lora_scales("piecewise:5@0.4,0.8", num_steps), scales)
  assert not skipped_steps("paper", num_steps).any()
  timesteps = jnp.asarray(np.linspace(900, 100, num_steps).round(), jnp.int32)
  x0, _, ctx = inputs
  lora = with_random_lora(model, seed=2)
  graphdef, state = nnx.split(lora)

  @jax.jit
  def sample(state, x, scales):
    def body(i, x):  # i is traced: the scale comes from the table inside the compiled loop
      unet = nnx.merge(graphdef, L.with_lora_scale(state, scales[i]))
      return x - 0.2 * unet(x, timesteps[i][None], ctx)
    return jax.lax.fori_loop(first, last, body, x)

  got = np.asarray(sample(state, x0, jnp.asarray(scales)))
  x = x0
  for i in range(first, last):  # reference: the scale set from Python before each step
    L.set_lora_scale(lora, float(scales[i]))
    x = x - 0.2 * forward(lora, (x, timesteps[i][None], ctx))
  err = rel_err(got, x)
  constant = np.asarray(sample(state, x0, jnp.full((num_steps,), 0.8, jnp.float32)))
  print(f"jitted loop with traced scales[i] vs Python-set scales: rel err {err:.2e}; "
        f"vs constant 0.8: {rel_err(constant, x):.2e}")
  assert err <= 1e-5
  assert rel_err(constant, x) > 1e-3  # the schedule really matters


def test_schedule_specs():
  f32 = lambda *v: np.asarray(v, np.float32)
  np.testing.assert_array_equal(lora_scales("paper:2:0.1:0.9", 4), f32(0.1, 0.1, 0.9, 0.9))
  np.testing.assert_array_equal(lora_scales({"kind": "paper", "k": 1}, 3), f32(0.4, 0.8, 0.8))
  np.testing.assert_array_equal(lora_scales("constant:0.8", 3), f32(0.8, 0.8, 0.8))
  np.testing.assert_array_equal(lora_scales(0.5, 2), f32(0.5, 0.5))
  np.testing.assert_allclose(lora_scales("linear:0.2:1.0", 5), f32(0.2, 0.4, 0.6, 0.8, 1.0), rtol=1e-6)
  np.testing.assert_array_equal(lora_scales("piecewise:1@0.1,3@0.5,1", 5), f32(0.1, 0.5, 0.5, 1, 1))
  np.testing.assert_array_equal(lora_scales({"kind": "piecewise", "boundaries": [2], "values": [0, 1]}, 3),
                                f32(0, 0, 1))
  # the authors' code: K-1 steps low, step K-1 skipped, the rest high (50 steps: 4 / 1 skipped / 45)
  authors = lora_scales("authors", 50)
  assert (authors[:4] == np.float32(0.4)).all() and (authors[4:] == np.float32(0.8)).all()
  assert np.flatnonzero(skipped_steps("authors", 50)).tolist() == [4]
  from vcjax.methods.customcrafter.schedule import ScheduleError, describe
  assert describe("authors", 50) == "4 steps at 0.4, 1 step skipped, 45 steps at 0.8"
  assert describe("paper", 50) == "5 steps at 0.4, 45 steps at 0.8"
  for bad, words in (("paper:x", "K must be a number"), ("linear:1", "linear:START:END"), ("bogus", "unknown kind"),
                     ("piecewise:5@0.4", "last piece"), ("piecewise:4@0.1,2@0.2,1", "increase"),
                     ({"kind": "linear", "start": 0}, "needs ['end']"), ("constant:inf", "finite")):
    with pytest.raises(ScheduleError, match=re.escape(words)) as e:
      lora_scales(bad, 8)
    assert "\n" not in str(e.value)


def lora_file(tmp_path, flavour: str, targets, seed=5):
  """A hand-written PEFT (alpha 8, r 4: scale 2) or kohya (alpha 2: scale 0.5) file; targets: {vcjax
  path: (in, out)}."""
  rng = np.random.default_rng(seed)
  sd = {}
  for path in sorted(targets):
    fan_in, fan_out = targets[path]
    down = rng.standard_normal((RANK, fan_in)).astype(np.float32) / np.sqrt(fan_in)
    up = 0.3 * rng.standard_normal((fan_out, RANK)).astype(np.float32)
    name = keymaps.diffusers_name(path)
    if flavour == "peft":
      sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"] = down, up
    else:
      stem = "lora_unet_" + name.replace(".", "_")
      sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down, up
      sd[f"{stem}.alpha"] = np.asarray(2.0, np.float16)
  meta = None
  if flavour == "peft":
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": 8})}
  file = tmp_path / f"{flavour}.safetensors"
  save_safetensors(sd, file, metadata=meta)
  return file


@pytest.mark.parametrize("flavour", ["peft", "kohya"])
@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_lora_file_unmerged_equals_merged_checkpoint(base, tmp_path, flavour):
  model, inputs, _ = base
  shapes = {p: m.kernel.get_value().shape for p, m in L.linear_modules(model).items()}
  targets = {p: shapes[p] for p in spatial_qkv_targets(model)}
  path = lora_file(tmp_path, flavour, targets)
  base_sd = export.unet_state_dict(model, buffers=False)
  loras = read_lora(path, module_names(base_sd), config=CFG)["unet"]
  assert {lw.scale for lw in loras.values()} == {2.0 if flavour == "peft" else 0.5}
  s = 0.6
  unmerged = nnx.clone(model)
  assert lora_files.load_lora(unmerged, loras, scale=s) == sorted(targets)
  merged = keymaps.load_state_dict(nnx.clone(model), merge_lora(base_sd, loras, s))
  err = rel_err(forward(unmerged, inputs), forward(merged, inputs))
  print(f"{flavour} file: read_lora -> load_lora (unmerged, scale {s}) vs merge_lora -> load: rel err {err:.2e}")
  assert err <= 1e-5
  # load_lora_file reads the same file to the same adapter, and vcjax's own format round-trips.
  again = nnx.clone(model)
  lora_files.load_lora_file(again, str(path), scale=s)
  own = nnx.clone(model)
  lora_files.load_lora_file(own, lora_files.save_lora(unmerged, str(tmp_path / "vcjax_lora.safetensors")), scale=s)
  for other in (again, own):
    for p, (d, u, sc) in L.lora_arrays(unmerged).items():
      d2, u2, sc2 = L.lora_arrays(other)[p]
      np.testing.assert_allclose(d2, d, rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(u2, u, rtol=1e-6, atol=1e-7)
      assert sc2 == pytest.approx(sc)


class Wrap(nnx.Module):
  """One SD1.5-style spatial transformer (proj_in/out are 1x1 convs in PyTorch) and one 3x3 conv."""

  def __init__(self, rngs):
    self.config = types.SimpleNamespace(use_linear_projection=False)
    self.attentions = nnx.List([SpatialTransformer(32, 2, 32, groups=32, eps=1e-6, rngs=rngs)])
    self.conv = Conv(32, 32, 3, rngs=rngs)

  def __call__(self, x, ctx):
    return self.conv(self.attentions[0](x, ctx))


@nnx.jit
def call(module, x, ctx):
  return module(x, ctx)


def test_diffusers_names_conv_refusal_and_lora_only_grads():
  rng = np.random.default_rng(7)
  wrap = Wrap(nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((1, 2, 4, 4, 32)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((1, 3, 32)), jnp.float32)
  base_sd = keymaps.export_state_dict(wrap, keymaps.torch_shapes(wrap))
  assert base_sd["attentions.0.proj_in.weight"].shape == (32, 32, 1, 1)
  blk = "attentions.0.transformer_blocks.0"
  targets = {f"{blk}.attn1.to_out.0": (32, 32), f"{blk}.ff.net.0.proj": (32, 256), f"{blk}.ff.net.2": (128, 32),
             "attentions.0.proj_in": (32, 32), f"{blk}.attn2.to_v": (32, 32)}
  sd = {}
  for name, (fan_in, fan_out) in targets.items():
    down = rng.standard_normal((RANK, fan_in)).astype(np.float32) / np.sqrt(fan_in)
    up = 0.3 * rng.standard_normal((fan_out, RANK)).astype(np.float32)
    if name.endswith("proj_in"):  # a 1x1-conv LoRA, as SD1.5 trainers write for proj_in
      down, up = down[:, :, None, None], up[:, :, None, None]
    sd[name + ".lora_A.weight"], sd[name + ".lora_B.weight"] = down, up
  loras = read_lora(sd, module_names(base_sd))["unet"]
  unmerged = nnx.clone(wrap)
  paths = lora_files.load_lora(unmerged, loras, scale=0.9)
  assert paths == sorted([f"{blk}.attn1.to_out", f"{blk}.ff.proj_in", f"{blk}.ff.proj_out",
                          "attentions.0.proj_in", f"{blk}.attn2.to_v"])
  merged = keymaps.load_state_dict(nnx.clone(wrap), merge_lora(base_sd, loras, 0.9))
  got = call(unmerged, x, ctx)
  err = rel_err(got, call(merged, x, ctx))
  print(f"to_out.0 / ff.net.* / 1x1-conv proj_in LoRAs: unmerged vs merged rel err {err:.2e}")
  assert err <= 1e-5 and rel_err(got, call(wrap, x, ctx)) > 1e-2

  conv_lora = {"conv": type(loras[f"{blk}.attn2.to_v"])(down=np.ones((RANK, 32, 3, 3)), up=np.ones((32, RANK, 1, 1)))}
  with pytest.raises(L.LoRAError, match="merge"):
    lora_files.load_lora(nnx.clone(wrap), conv_lora)
  with pytest.raises(L.LoRAError, match="no such module"):
    lora_files.load_lora(nnx.clone(wrap), {"attentions.0.nothing.to_q": loras[f"{blk}.attn2.to_v"]})
  with pytest.raises(L.LoRAError, match="already has a LoRA"):
    lora_files.load_lora(unmerged, {f"{blk}.attn2.to_v": loras[f"{blk}.attn2.to_v"]})
  with pytest.raises(L.LoRAError, match="do not fit"):
    lora_files.load_lora(nnx.clone(wrap), {f"{blk}.ff.net.2": loras[f"{blk}.attn2.to_v"]})

  # Training: gradients w.r.t. LoRAParam only; with up = 0 only `up` gets a gradient at first.
  train = nnx.clone(wrap)
  L.add_lora(train, rank=RANK, rngs=nnx.Rngs(2))
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, ctx) ** 2), argnums=nnx.DiffState(0, L.LoRAParam)))(train)
  flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
  assert set(flat) == {f"{p}.lora_{w}" for p in L.lora_modules(train) for w in ("down", "up")}
  assert all(np.abs(g).max() > 0 for k, g in flat.items() if k.endswith("up"))
  assert all(not g.any() for k, g in flat.items() if k.endswith("down"))
