"""convert/animatediff.py: every checkpoint format gives the same parameters; loaded models match PyTorch."""

import os

import jax.numpy as jnp
import numpy as np
import torch

from convert.animatediff import main as convert_main
from tests.reference import call_compiled, rel_err, run_both, to_channels_last_video
from vcjax.loading import load_text_encoder, load_unet, load_vae, read_info
from vcjax.weights import store


def convert(tmp_path, name, *args):
  out = str(tmp_path / name)
  assert convert_main([*args, "--out", out]) == 0
  return out


def params(folder, component="unet"):
  return store.read_component(folder, component)


def assert_same_params(a, b, cast=None):
  pa, pb = params(a), params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    want = pb[k] if cast is None else pb[k].astype(cast).astype(np.float32)
    np.testing.assert_array_equal(pa[k], want, err_msg=k)


def test_every_format_gives_the_same_parameters(random_pipeline, tmp_path):
  rp = random_pipeline
  # Original checkpoints do not record the head count; the tiny model has 2 (AnimateDiff's are 8).
  ref = convert(tmp_path, "folder+original", "--base", rp["base"], "--motion-module", rp["motion_original"],
                "--motion-heads", "2")
  adapter = convert(tmp_path, "folder+adapter", "--base", rp["base"], "--motion-module", rp["motion_diffusers"])
  # A single file carries no config; this one is not SD1.5-shaped, so name a folder that describes it.
  single = convert(tmp_path, "ldm+original", "--base", rp["ldm"], "--motion-module", rp["motion_original"],
                   "--base-config", rp["base"])
  for other in (adapter, single):
    for component in ("unet", "vae", "text_encoder"):
      pa, pb = params(ref, component), params(other, component)
      assert pa.keys() == pb.keys()
      for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=f"{component} {k}")
  # Defaults: version from the keys; norm semantics from the motion module's origin.
  scheduler_file = os.path.join(rp["base"], "scheduler", "scheduler_config.json")
  assert read_info(ref)["info"] == dict(base="diffusers", motion_source="original", semantics="original",
                                        version="v2", scheduler_source=scheduler_file)
  assert read_info(adapter)["info"]["semantics"] == "diffusers"
  assert read_info(single)["info"]["base"] == "ldm"
  assert read_info(ref)["unet"]["motion_mid_block"] is True
  assert read_info(ref)["unet"]["motion_max_seq_length"] == 32
  assert read_info(ref)["unet"]["motion_num_heads"] == read_info(adapter)["unet"]["motion_num_heads"] == 2


def test_fp16_sources_convert_to_the_rounded_parameters(random_pipeline, tmp_path):
  rp = random_pipeline
  state = torch.load(rp["motion_original"], weights_only=True)
  half = {k: v.half() for k, v in state["state_dict"].items()}
  torch.save(half, tmp_path / "mm_fp16.ckpt")
  import safetensors.torch
  ldm = safetensors.torch.load_file(rp["ldm"])
  safetensors.torch.save_file({k: v.half() for k, v in ldm.items()}, tmp_path / "ldm_fp16.safetensors")
  ref = convert(tmp_path, "fp32", "--base", rp["ldm"], "--motion-module", rp["motion_original"],
                "--base-config", rp["base"])
  got = convert(tmp_path, "fp16", "--base", str(tmp_path / "ldm_fp16.safetensors"), "--motion-module",
                str(tmp_path / "mm_fp16.ckpt"), "--base-config", rp["base"])
  assert_same_params(got, ref, cast=np.float16)
  # And a bf16 target dtype stores bf16 weights.
  bf16 = convert(tmp_path, "bf16", "--base", rp["base"], "--motion-module", rp["motion_original"],
                 "--dtype", "bfloat16")
  assert params(bf16)["conv_in.kernel"].dtype == jnp.bfloat16
  assert load_unet(bf16).conv_in.kernel[...].dtype == jnp.bfloat16


def test_version_and_semantics_overrides(random_pipeline, tmp_path):
  out = convert(tmp_path, "o", "--base", random_pipeline["base"], "--motion-module",
                random_pipeline["motion_original"], "--norm-semantics", "diffusers")
  cfg = read_info(out)["unet"]
  assert cfg["motion_norm_across_frames"] is True and cfg["resnet_norm_across_frames"] is False


def test_loaded_models_match_pytorch(random_pipeline, converted):
  from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
  from transformers import CLIPTextModel
  rp = random_pipeline
  ref = UNetMotionModel.from_unet2d(UNet2DConditionModel.from_pretrained(os.path.join(rp["base"], "unet")),
                                    MotionAdapter.from_pretrained(rp["motion_diffusers"])).eval()
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((1, 4, 3, 16, 16)).astype(np.float32)
  context = rng.standard_normal((1, 77, 32)).astype(np.float32)
  assert rel_err(*run_both(ref, load_unet(converted), latents, np.array([500]), context)) <= 1e-5

  vae_ref = AutoencoderKL.from_pretrained(os.path.join(rp["base"], "vae")).eval()
  image = rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    mean_want = vae_ref.encode(torch.from_numpy(image)).latent_dist.mean.numpy()
  mean, _ = load_vae(converted).encode(jnp.asarray(image.transpose(0, 2, 3, 1)))
  assert rel_err(mean, mean_want.transpose(0, 2, 3, 1)) <= 1e-5

  text_ref = CLIPTextModel.from_pretrained(os.path.join(rp["base"], "text_encoder")).eval()
  ids = rng.integers(0, 512, (2, 77))
  with torch.no_grad():
    text_want = text_ref(torch.from_numpy(ids)).last_hidden_state.numpy()
  assert rel_err(load_text_encoder(converted)(jnp.asarray(ids, jnp.int32)), text_want) <= 1e-5


def test_broken_files_fail_with_one_line(random_pipeline, tmp_path, capsys):
  data = open(random_pipeline["motion_original"], "rb").read()
  (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
  code = convert_main(["--base", random_pipeline["base"], "--motion-module", str(tmp_path / "cut.ckpt"),
                       "--out", str(tmp_path / "x")])
  err = capsys.readouterr().err.strip()
  assert code == 1 and "cut.ckpt" in err and "\n" not in err


class Exploit:
  def __reduce__(self):
    return (os.system, (f"touch {Exploit.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(random_pipeline, tmp_path, capsys):
  Exploit.marker = str(tmp_path / "pwned")
  torch.save({"state_dict": {"x": Exploit()}}, tmp_path / "evil.ckpt")
  code = convert_main(["--base", random_pipeline["base"], "--motion-module", str(tmp_path / "evil.ckpt"),
                       "--out", str(tmp_path / "x")])
  err = capsys.readouterr().err
  assert code == 1 and "system" in err
  assert not os.path.exists(Exploit.marker)


def test_wrong_shapes_are_listed(random_pipeline, tmp_path, capsys):
  from safetensors.torch import load_file, save_file
  sd = load_file(os.path.join(random_pipeline["motion_diffusers"], "diffusion_pytorch_model.safetensors"))
  key = next(k for k in sd if k.endswith("proj_in.weight"))
  sd[key] = torch.zeros(3, 3)
  del sd[next(k for k in sd if k.endswith("proj_out.bias"))]
  save_file(sd, tmp_path / "bad.safetensors")
  code = convert_main(["--base", random_pipeline["base"], "--motion-module", str(tmp_path / "bad.safetensors"),
                       "--out", str(tmp_path / "x")])
  err = capsys.readouterr().err
  assert code == 1 and "1 wrongly shaped" in err and "1 missing" in err and key in err


def test_videomaker_style_full_unet_weights_apply_over_the_base(random_pipeline, tmp_path):
  """VideoMaker ships a full UNetMotionModel state dict (diffusers names, .bin pickle) that is applied
  over base + motion module; the converted UNet must compute what that PyTorch model computes."""
  from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
  rp = random_pipeline
  model = UNetMotionModel.from_unet2d(UNet2DConditionModel.from_pretrained(os.path.join(rp["base"], "unet")),
                                      MotionAdapter.from_pretrained(rp["motion_diffusers"])).eval()
  gen = torch.Generator().manual_seed(7)
  with torch.no_grad():  # what GIRL trains: spatial attn1 and the motion modules
    for name, p in model.named_parameters():
      if ".attn1." in name or "motion_modules" in name:
        p.add_(0.05 * torch.randn(p.shape, generator=gen))
  torch.save(model.state_dict(), tmp_path / "videomaker_unet.bin")
  out = convert(tmp_path, "vm", "--base", rp["base"], "--motion-module", rp["motion_diffusers"],
                "--unet-weights", str(tmp_path / "videomaker_unet.bin"))
  rng = np.random.default_rng(3)
  latents = rng.standard_normal((1, 4, 2, 8, 8)).astype(np.float32)
  context = rng.standard_normal((1, 77, 32)).astype(np.float32)
  got, want = run_both(model, load_unet(out), latents, np.array([300]), context)
  assert rel_err(got, want) <= 1e-5
  # Without the override the output differs: the weights really were applied.
  plain = load_unet(convert(tmp_path, "plain", "--base", rp["base"], "--motion-module", rp["motion_diffusers"]))
  got_plain = call_compiled(plain, jnp.asarray(to_channels_last_video(latents)), jnp.array([300]),
                            jnp.asarray(context))
  assert rel_err(got_plain, want) > 1e-3


def test_lora_flag_merges_into_the_converted_unet(random_pipeline, converted, tmp_path):
  import jax
  from flax import nnx
  from vcjax.nn.lora import add_lora, lora_modules, set_lora_scale
  from vcjax.weights.lora_files import save_lora_peft
  unet = load_unet(converted)
  add_lora(unet, rank=4, rngs=nnx.Rngs(0))
  for i, m in enumerate(lora_modules(unet).values()):
    m.lora_up.set_value(0.2 * jax.random.normal(jax.random.key(i), m.lora_up.get_value().shape))
  lora = save_lora_peft(unet, str(tmp_path / "lora.safetensors"))
  out = convert(tmp_path, "merged", "--base", random_pipeline["base"], "--motion-module",
                random_pipeline["motion_diffusers"], "--lora", f"{lora}:0.5")
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((1, 2, 8, 8, 4)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((1, 77, 32)), jnp.float32)
  set_lora_scale(unet, 0.5)
  want = call_compiled(unet, x, jnp.array([10]), ctx)
  assert rel_err(call_compiled(load_unet(out), x, jnp.array([10]), ctx), want) <= 1e-5
  set_lora_scale(unet, 0.0)
  assert rel_err(call_compiled(unet, x, jnp.array([10]), ctx), want) > 1e-3


def test_the_base_models_scheduler_config_is_kept(random_pipeline, tmp_path, capsys):
  """A diffusers folder's scheduler/ is copied; a single file records none, so it gets SD1.5's, and says so."""
  import json
  import shutil
  from vcjax.loading import load_scheduler_config
  from vcjax.weights.bundle import SD15_SCHEDULER
  rp = random_pipeline
  folder = convert(tmp_path, "folder", "--base", rp["base"], "--motion-module", rp["motion_diffusers"])
  with open(os.path.join(rp["base"], "scheduler", "scheduler_config.json")) as f:
    assert load_scheduler_config(folder) == json.load(f)
  described = tmp_path / "configs_only"  # architecture configs for the single file, and no scheduler
  for part in ("unet", "vae", "text_encoder", "tokenizer"):
    shutil.copytree(os.path.join(rp["base"], part), described / part,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
  capsys.readouterr()
  single = convert(tmp_path, "single", "--base", rp["ldm"], "--motion-module", rp["motion_diffusers"],
                   "--base-config", str(described))
  assert "SD1.5's (the base carries no scheduler config)" in capsys.readouterr().out
  assert load_scheduler_config(single) == SD15_SCHEDULER
  assert read_info(single)["info"]["scheduler_source"].startswith("SD1.5's")
