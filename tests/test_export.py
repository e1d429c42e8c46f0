"""vcjax -> PyTorch exports (vcjax.weights.export), checked by loading them with diffusers' own loaders.

* a trained (random) vcjax LoRA -> diffusers/PEFT and kohya files -> diffusers' LoRA loaders on the
  UNetMotionModel of the random pipeline: diffusers' output == vcjax's output with the LoRA unmerged;
* a GIRL-style trained UNet (spatial attn1 + motion-module params changed) -> diffusers-named state dict
  -> strict `load_state_dict` into UNetMotionModel, and a diffusers folder -> `from_pretrained`.
"""

import dataclasses
import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from flax import nnx

from tests.reference import rel_err, to_channels_last_video
from vcjax.loading import from_state_dict
from vcjax.nn import lora as L
from vcjax.weights import export, keymaps, lora_files
from vcjax.weights.lora_files import module_names, read_lora
from vcjax.weights.bundle import assemble
from vcjax.weights.sources import read_state_dict

FRAMES = 4


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x, t, ctx):
  return nnx.merge(graphdef, state)(x, t, ctx)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """Tiny models: PyTorch's intra-op threads only contend (first calls took 10-20 s on a busy 2-core box)."""
  old = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(old)


@pytest.fixture(scope="module")
def case(random_pipeline):
  pipe = assemble(random_pipeline["base"], random_pipeline["motion_diffusers"])  # diffusers norm semantics
  unet = from_state_dict("unet", pipe.unet_config, pipe.unet)
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((1, 4, FRAMES, 8, 8)).astype(np.float32)  # diffusers layout
  context = rng.standard_normal((1, 7, 32)).astype(np.float32)
  timesteps = np.array([321], np.int64)

  def torch_unet():
    return UNetMotionModel.from_unet2d(UNet2DConditionModel.from_pretrained(f"{random_pipeline['base']}/unet"),
                                       MotionAdapter.from_pretrained(random_pipeline["motion_diffusers"])).eval()

  def run_torch(model):
    with torch.no_grad():
      out = model(torch.from_numpy(latents), torch.from_numpy(timesteps),
                  torch.from_numpy(np.repeat(context, FRAMES, axis=0))).sample
    return to_channels_last_video(out.numpy())

  def run_vcjax(model):
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(to_channels_last_video(latents)),
                               jnp.asarray(timesteps), jnp.asarray(context)))

  return dict(unet=unet, torch_unet=torch_unet, run_torch=run_torch, run_vcjax=run_vcjax)


def pipeline_with(unet) -> AnimateDiffPipeline:
  """A diffusers AnimateDiffPipeline around `unet` (UNet only: its LoRA loader is what is tested)."""
  return AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, motion_adapter=None,
                             scheduler=DDIMScheduler())


def trained_lora(unet):
  """CustomCrafter's LoRAs plus a few more kinds of target (a 1x1-conv proj_in, to_out.0, ff.net.2), with
  random `up` as after training, at run-time scale 0.7 (exports fold it in)."""
  model = nnx.clone(unet)
  spatial = L.add_lora(model, rank=4, rngs=nnx.Rngs(1))
  extra = L.add_lora(model, rank=4, rngs=nnx.Rngs(2),
                     targets=r"attentions\.\d+\.(proj_in|transformer_blocks\.0\.(attn1\.to_out|ff\.proj_out))$")
  assert len(spatial) == 36 and len(extra) == 18
  rng = np.random.default_rng(3)
  for lin in L.lora_modules(model).values():
    lin.lora_up.set_value(jnp.asarray(0.3 * rng.standard_normal(lin.lora_up.get_value().shape), jnp.float32))
  L.set_lora_scale(model, 0.7)
  return model


def test_lora_exports_load_in_diffusers(case, tmp_path):
  model = trained_lora(case["unet"])
  got = case["run_vcjax"](model)
  assert rel_err(got, case["run_vcjax"](case["unet"])) > 1e-2  # the LoRA really changes the output

  peft_file = lora_files.save_lora_peft(model, str(tmp_path / "peft"))
  assert peft_file.endswith("peft/pytorch_lora_weights.safetensors")
  sd = read_state_dict(peft_file)
  name = "unet.down_blocks.0.attentions.0.proj_in"
  assert sd[name + ".lora_A.weight"].shape == (4, 32, 1, 1)  # SD1.5 proj_in is a 1x1 conv in PyTorch
  assert sd["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight"].shape == (64, 4)
  assert len(sd) == 2 * 54

  ref = case["torch_unet"]()
  pipeline_with(ref).load_lora_weights(str(tmp_path / "peft"), adapter_name="peft")
  err_peft = rel_err(case["run_torch"](ref), got)
  del ref
  # the model-level loader diffusers also offers
  ref = case["torch_unet"]()
  ref.load_lora_adapter(peft_file, prefix="unet", adapter_name="peft")
  err_adapter = rel_err(case["run_torch"](ref), got)
  del ref

  kohya_file = lora_files.save_lora_kohya(model, str(tmp_path / "kohya.safetensors"))
  ksd = read_state_dict(kohya_file)
  stem = "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k"
  assert float(ksd[stem + ".alpha"]) == 4.0 and ksd[stem + ".lora_down.weight"].shape == (4, 32)
  ref = case["torch_unet"]()
  pipeline_with(ref).load_lora_weights(kohya_file, adapter_name="kohya")
  err_kohya = rel_err(case["run_torch"](ref), got)
  print(f"vcjax LoRA (54 targets, scale 0.7) vs diffusers: PEFT load_lora_weights {err_peft:.2e}, "
        f"load_lora_adapter {err_adapter:.2e}, kohya {err_kohya:.2e}")
  assert max(err_peft, err_adapter, err_kohya) <= 1e-5

  # vcjax's own reader sees the same LoRA (scale 1, the run-time 0.7 folded into up)
  want = lora_files.lora_weights(model)
  for f in (peft_file, kohya_file):
    loras = read_lora(f, module_names(keymaps.torch_shapes(model)))["unet"]
    assert set(loras) == set(want) and {lw.scale for lw in loras.values()} == {1.0}
    for m, lw in loras.items():
      np.testing.assert_allclose(lw.delta(), want[m].delta(), rtol=1e-6, atol=1e-7)


def girl_update(unet, seed=0):
  """What GIRL training changes: spatial attn1 q/k/v/out and every motion-module parameter."""
  model = nnx.clone(unet)
  rng = np.random.default_rng(seed)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  changed = []
  for path, var in flat:
    p = ".".join(map(str, path))
    if ".motion_modules." in p or (".attentions." in p and ".attn1." in p):
      v = np.asarray(var.get_value())
      var.set_value(jnp.asarray(v + 0.05 * (np.abs(v).mean() + 0.01) * rng.standard_normal(v.shape), jnp.float32))
      changed.append(p)
  nnx.update(model, nnx.from_flat_state(flat))
  return model, changed


def test_girl_unet_export_loads_strictly_in_diffusers(case, tmp_path):
  model, changed = girl_update(case["unet"])
  got = case["run_vcjax"](model)
  ref = case["torch_unet"]()
  before = {k: v.numpy().copy() for k, v in ref.state_dict().items()}
  sd = export.unet_state_dict(model)
  assert set(sd) == set(before)
  result = ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  # exactly the trained tensors differ (the pe buffers are recomputed: equal to float rounding)
  diff = [k for k in export.state_dict_diff(sd, before) if not k.endswith(".pe")]
  want_keys = {keymaps.diffusers_name(p.rpartition(".")[0]) + (".bias" if p.endswith(".bias") else ".weight")
               for p in changed}
  assert set(diff) == want_keys and len(want_keys) == len(changed)
  assert max(float(np.abs(sd[k] - before[k]).max()) for k in sd if k.endswith(".pe")) < 2e-6
  err = rel_err(case["run_torch"](ref), got)
  moved = rel_err(case["run_torch"](case["torch_unet"]()), got)
  print(f"GIRL-trained UNet ({len(changed)} params changed) exported, strict load in UNetMotionModel: "
        f"rel err {err:.2e} (the update moved the output by {moved:.2e})")
  assert err <= 1e-5 and moved > 1e-3

  # a whole diffusers folder: config.json + weights, for UNetMotionModel.from_pretrained
  export.save_unet(model, str(tmp_path / "unet"))
  info = json.load(open(tmp_path / "unet" / export.EXPORT_INFO_NAME))
  assert info["norm_semantics"] == "diffusers" and info["diffusers_computes_the_same"] is True
  folder = UNetMotionModel.from_pretrained(str(tmp_path / "unet")).eval()
  err_folder = rel_err(case["run_torch"](folder), got)
  print(f"UNetMotionModel.from_pretrained(exported folder): rel err {err_folder:.2e}")
  assert err_folder <= 1e-5

  # merge_lora=True folds an attached LoRA into the exported weights
  lora = trained_lora(model)
  merged = UNetMotionModel.from_pretrained(str(tmp_path / "unet")).eval()
  merged.load_state_dict({k: torch.from_numpy(v)
                          for k, v in export.unet_state_dict(lora, merge_lora=True).items()}, strict=True)
  err_merged = rel_err(case["run_torch"](merged), case["run_vcjax"](lora))
  print(f"export with the LoRA merged vs vcjax unmerged: rel err {err_merged:.2e}")
  assert err_merged <= 1e-5


def test_original_semantics_export_warns_records_and_differs(case, tmp_path):
  """A GIRL-trained UNet run with `original` norm semantics (motion-module GroupNorm per frame): the export
  warns, writes the semantics into vcjax_export.json (and the weights' metadata), and diffusers, which
  pools that norm across frames, really computes something else; the `diffusers`-semantics twin of the
  same weights round-trips."""
  trained, _ = girl_update(case["unet"], seed=1)
  cfg = dataclasses.replace(trained.config, motion_norm_across_frames=False)  # v2 original: resnets per frame
  original = from_state_dict("unet", cfg, export.unet_state_dict(trained))
  assert export.norm_semantics_of(original.config)[0] == "original"
  with pytest.warns(UserWarning, match="computes differently in diffusers"):
    export.save_unet(original, str(tmp_path / "orig"))
  info = json.load(open(tmp_path / "orig" / export.EXPORT_INFO_NAME))
  assert info["norm_semantics"] == "original" and info["diffusers_computes_the_same"] is False
  assert info["norm_flags"]["motion_norm_across_frames"] is False and "note" in info
  from vcjax.weights.lora_files import _safetensors_metadata
  meta = json.loads(_safetensors_metadata(str(tmp_path / "orig" / export.UNET_WEIGHT_NAME))["vcjax_export"])
  assert meta == info
  torch_out = case["run_torch"](UNetMotionModel.from_pretrained(str(tmp_path / "orig")).eval())
  err_original = rel_err(torch_out, case["run_vcjax"](original))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # diffusers semantics: no warning
    export.save_unet(trained, str(tmp_path / "diff"))
  err_diffusers = rel_err(case["run_torch"](UNetMotionModel.from_pretrained(str(tmp_path / "diff")).eval()),
                          case["run_vcjax"](trained))
  print(f"exported UNet in diffusers vs vcjax: original semantics rel err {err_original:.3e} (differs), "
        f"diffusers semantics {err_diffusers:.2e}")
  assert err_original > 1e-3 and err_diffusers <= 1e-5


def test_loaded_weights_override_zero_proj_out(case, random_pipeline):
  """A freshly built motion module has proj_out = 0 (AnimateDiff's init); loading a checkpoint replaces it."""
  unet = case["unet"]
  sd = read_state_dict(f"{random_pipeline['motion_diffusers']}/diffusion_pytorch_model.safetensors")
  k = unet.down_blocks[0].motion_modules[0].proj_out.kernel.get_value()
  want = sd["down_blocks.0.motion_modules.0.proj_out.weight"]
  assert float(np.abs(want).max()) > 0
  np.testing.assert_array_equal(np.asarray(k), np.asarray(want).T)
