"""LoRA files (vcjax.weights.lora_files): every flavour must merge to what diffusers' own `fuse_lora()` gives.

A tiny random diffusers UNet gets a PEFT LoRA (random non-zero B, lora_alpha != r, an alpha_pattern,
linear and conv targets); diffusers saves it and fuses it. Our reader + merger must reproduce the fused
weights from the saved files, and from kohya (diffusers and LDM names) and AnimateDiff-processor files
written by hand from the same matrices.
"""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from vcjax.testing import randomize_
from vcjax.weights.errors import CheckpointError
from vcjax.weights.ldm import diffusers_unet_to_ldm
from vcjax.weights.lora_files import LoRAWeight, merge_lora, module_names, parse_lora_arg, read_lora
from vcjax.weights.sources import save_safetensors

UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                   cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
RANK, ALPHA, K_ALPHA, USER_SCALE = 4, 8, 2, 0.7
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]


def numpy_state(sd):
  return {k: v.detach().cpu().numpy().copy() for k, v in sd.items()}


def alpha_of(module):
  return K_ALPHA if module.endswith("to_k") else ALPHA


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("lora")
  torch.manual_seed(0)
  unet = randomize_(UNet2DConditionModel(**UNET_CONFIG), seed=0).eval()
  base = numpy_state(unet.state_dict())
  config = LoraConfig(r=RANK, lora_alpha=ALPHA, alpha_pattern={"to_k": K_ALPHA}, target_modules=TARGETS,
                      init_lora_weights=False)  # False: B is random, not zero
  unet.add_adapter(config)
  lora = numpy_state(get_peft_model_state_dict(unet))
  meta = config.to_dict()
  # diffusers pipeline format: `unet.` prefix, adapter config packed into the safetensors metadata.
  StableDiffusionLoraLoaderMixin.save_lora_weights(tmp / "pipe", unet_lora_layers=get_peft_model_state_dict(unet),
                                                   unet_lora_adapter_metadata=dict(meta))
  # diffusers model format: no prefix, unprefixed metadata.
  unet.save_lora_adapter(tmp / "model")
  # PEFT folder: `base_model.model.` prefix, adapter_config.json beside, no metadata.
  os.makedirs(tmp / "peft")
  save_safetensors({"base_model.model." + k: v for k, v in lora.items()}, tmp / "peft" / "adapter_model.safetensors")
  with open(tmp / "peft" / "adapter_config.json", "w") as f:
    json.dump({k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}, f)
  with torch.no_grad():
    unet.fuse_lora(lora_scale=USER_SCALE)
  fused = {k.replace(".base_layer.", "."): v for k, v in numpy_state(unet.state_dict()).items() if ".lora_" not in k}
  assert set(fused) == set(base)
  mods = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
  pairs = {m: (lora[m + ".lora_A.weight"], lora[m + ".lora_B.weight"]) for m in mods}
  return dict(tmp=tmp, base=base, fused=fused, pairs=pairs, names=module_names(base))


def max_diff(got, want):
  assert set(got) == set(want)
  return max(float(np.max(np.abs(np.asarray(got[k], np.float64) - want[k]))) for k in want)


def assert_matches_fused(case, merged, tol=2e-6):
  changed = [k for k in case["base"] if not np.array_equal(case["base"][k], case["fused"][k])]
  assert len(changed) == len(case["pairs"])  # the reference really moved every LoRA target
  diff = max_diff(merged, case["fused"])
  print(f"max |ours - diffusers fuse_lora| = {diff:.2e}")
  assert diff < tol, diff
  return diff


@pytest.mark.parametrize("where", ["pipe", "model", "peft"])
def test_diffusers_peft_files_match_fuse_lora(case, where):
  loras = read_lora(case["tmp"] / where, case["names"])
  assert set(loras) == {"unet", "text_encoder"} and not loras["text_encoder"]
  unet = loras["unet"]
  assert set(unet) == set(case["pairs"])
  assert len(case["pairs"]) == 4 * 2 * 4 + 8 + 4  # 4 transformers x (attn1, attn2) x 4, 8 resnet conv1, 4 proj_in
  for m, lw in unet.items():
    assert lw.scale == pytest.approx(alpha_of(m) / RANK)
  to_out = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
  conv = "down_blocks.0.resnets.0.conv1"
  assert unet[to_out].down.shape == (RANK, 32) and unet[conv].down.shape == (RANK, 32, 3, 3)
  merged = merge_lora(case["base"], unet, USER_SCALE)
  assert_matches_fused(case, merged)
  untouched = "down_blocks.0.resnets.0.conv2.weight"
  assert merged[untouched] is case["base"][untouched]


def test_peft_dict_without_alpha_uses_scale_one(case):
  sd = {}
  for m, (a, b) in case["pairs"].items():
    sd[m + ".lora_A.weight"], sd[m + ".lora_B.weight"] = a, b
  loras = read_lora(sd, case["names"])["unet"]
  assert {lw.scale for lw in loras.values()} == {1.0}
  given = read_lora(sd, case["names"], adapter_config={"lora_alpha": ALPHA, "alpha_pattern": {"to_k": K_ALPHA}})
  assert_matches_fused(case, merge_lora(case["base"], given["unet"], USER_SCALE))
  # explicit `.alpha` keys are honoured too
  sd.update({m + ".alpha": np.float32(alpha_of(m)) for m in case["pairs"]})
  assert_matches_fused(case, merge_lora(case["base"], read_lora(sd, case["names"])["unet"], USER_SCALE))


def kohya_file(case, ldm: bool):
  mods = list(case["pairs"])
  names = dict(zip(mods, mods))
  if ldm:
    names = {v: k.removesuffix(".weight")
             for k, v in diffusers_unet_to_ldm({m + ".weight": m for m in mods}, UNET_CONFIG).items()}
  sd = {}
  for m, (a, b) in case["pairs"].items():
    if ldm and a.ndim == 4 and a.shape[2:] == (1, 1):  # LDM-era trainers store 1x1-conv LoRAs as linears
      a, b = a[:, :, 0, 0], b[:, :, 0, 0]
    stem = "lora_unet_" + names[m].replace(".", "_")
    sd[stem + ".lora_down.weight"] = a
    sd[stem + ".lora_up.weight"] = b
    sd[stem + ".alpha"] = np.asarray(alpha_of(m), np.float16)
  return sd


@pytest.mark.parametrize("ldm", [False, True], ids=["diffusers_names", "ldm_names"])
def test_kohya_matches_peft(case, ldm):
  sd = kohya_file(case, ldm)
  if ldm:
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in sd  # LoCon on a resnet conv
  else:
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in sd
  # text-encoder LoRAs come back separately (kohya names resolved for CLIP, PEFT names kept).
  te_a, te_b = np.ones((RANK, 16), np.float32), np.ones((16, RANK), np.float32)
  sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = te_a
  sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = te_b
  sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = np.asarray(2.0, np.float32)
  sd["text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_A.weight"] = te_a
  sd["text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_B.weight"] = te_b
  path = case["tmp"] / f"kohya_{ldm}.safetensors"
  save_safetensors(sd, path)
  for config in (None, UNET_CONFIG):  # the layout for LDM names is read off the module names when absent
    loras = read_lora(path, case["names"], config=config)
    assert set(loras["unet"]) == set(case["pairs"])
    te = loras["text_encoder"]
    assert set(te) == {"text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"}
    assert te["text_model.encoder.layers.0.self_attn.q_proj"].scale == pytest.approx(0.5)
    assert_matches_fused(case, merge_lora(case["base"], loras["unet"], USER_SCALE))
  # without `.alpha` a kohya LoRA has scale 1
  bare = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
  assert {lw.scale for lw in read_lora(bare, case["names"])["unet"].values()} == {1.0}


def test_animatediff_processor_lora_matches_peft(case, tmp_path):
  """v3 domain-adapter style: `...attn1.processor.to_q_lora.down.weight`, W += alpha * up @ down."""
  attn = {m: p for m, p in case["pairs"].items() if ".attn" in m}
  sd = {}
  for m, (a, b) in attn.items():
    module, proj = m.split(".to_")
    stem = f"{module}.processor.to_{proj.removesuffix('.0')}_lora"
    # fold the per-module alpha/r into `up` so that one user alpha reproduces the PEFT merge
    sd[stem + ".down.weight"], sd[stem + ".up.weight"] = torch.tensor(a), torch.tensor(b * alpha_of(m) / ALPHA)
  torch.save(sd, tmp_path / "adapter.ckpt")  # AnimateDiff ships pickles
  loras = read_lora(tmp_path / "adapter.ckpt", case["names"])["unet"]
  assert set(loras) == set(attn) and {lw.scale for lw in loras.values()} == {1.0}
  merged = merge_lora(case["base"], loras, USER_SCALE * ALPHA / RANK)
  want = {k: case["fused"][k] if k.removesuffix(".weight") in attn else case["base"][k] for k in case["base"]}
  diff = max_diff(merged, want)
  print(f"max |ours - diffusers fuse_lora| (processor format) = {diff:.2e}")
  assert diff < 2e-6, diff


def test_animatediff_motion_lora_original_names(tmp_path):
  rng = np.random.default_rng(0)
  c, r, alpha = 32, 2, 0.8
  mm = "down_blocks.0.motion_modules.0"
  base = {f"{mm}.transformer_blocks.0.{attn}.{p}.weight": rng.standard_normal((c, c)).astype(np.float32)
          for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}
  base[f"{mm}.transformer_blocks.0.attn1.to_out.0.bias"] = np.zeros(c, np.float32)
  sd, want = {}, {}
  for i, attn in enumerate(("attn1", "attn2")):
    for proj, target in (("to_q", "to_q"), ("to_v", "to_v"), ("to_out", "to_out.0")):
      down, up = rng.standard_normal((r, c)).astype(np.float32), rng.standard_normal((c, r)).astype(np.float32)
      stem = f"{mm}.temporal_transformer.transformer_blocks.0.attention_blocks.{i}.processor.{proj}_lora"
      sd[stem + ".down.weight"], sd[stem + ".up.weight"] = torch.tensor(down), torch.tensor(up)
      key = f"{mm}.transformer_blocks.0.{attn}.{target}.weight"
      want[key] = base[key].astype(np.float64) + alpha * up.astype(np.float64) @ down
  torch.save({"state_dict": sd}, tmp_path / "v2_lora_ZoomIn.ckpt")
  loras = read_lora(tmp_path / "v2_lora_ZoomIn.ckpt", module_names(base))
  assert len(loras["unet"]) == 6 and all(lw.scale == 1.0 for lw in loras["unet"].values())
  merged = merge_lora(base, loras["unet"], alpha)
  for k, v in base.items():
    if k in want:
      np.testing.assert_allclose(merged[k], want[k], rtol=0, atol=2e-5)
      assert merged[k].dtype == np.float32
    else:
      assert merged[k] is v


def test_merge_keeps_dtype_and_conv_shapes():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((8, 4, 3, 3)).astype(np.float16)
  lw = LoRAWeight(down=rng.standard_normal((2, 4, 3, 3)), up=rng.standard_normal((8, 2, 1, 1)), scale=0.5)
  out = merge_lora({"c.weight": w}, {"c": lw}, 2.0)["c.weight"]
  want = w.astype(np.float64) + np.einsum("or,rihw->oihw", lw.up[:, :, 0, 0], lw.down)
  assert out.dtype == np.float16 and out.shape == w.shape
  np.testing.assert_allclose(out, want, rtol=2e-3, atol=2e-2)
  with pytest.raises(CheckpointError, match="1 LoRA targets without"):
    merge_lora({"c.weight": w}, {"d": lw})
  with pytest.raises(CheckpointError, match="update for a weight"):
    merge_lora({"c.weight": w[:, :2]}, {"c": lw})


def test_unknown_and_broken_keys(case):
  good = kohya_file(case, ldm=False)
  bad = dict(good)
  bad["lora_unet_down_blocks_0_attentions_9_proj_in.lora_down.weight"] = np.zeros((RANK, 32), np.float32)
  bad["lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a"] = np.zeros((RANK, 32), np.float32)  # LoHa
  bad["down_blocks.0.attentions.0.proj_in.lora_magnitude_vector"] = np.zeros(32, np.float32)  # DoRA
  with pytest.raises(CheckpointError, match=r"3 LoRA keys in no known format.*hada_w1_a") as e:
    read_lora(bad, case["names"])
  assert "\n" not in str(e.value)
  lonely = {k: v for k, v in good.items() if not k.endswith("attn1_to_q.lora_up.weight")}
  with pytest.raises(CheckpointError, match="without their up matrix"):
    read_lora(lonely, case["names"])
  # LDM-style names need a UNet layout: with no down_blocks among the target names they stay unknown
  ldm = kohya_file(case, ldm=True)
  only_motion = {"down_blocks_x.motion_modules.0.proj_in"}
  with pytest.raises(CheckpointError, match="no known format"):
    read_lora(ldm, only_motion)


def test_parse_lora_arg():
  assert parse_lora_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
  assert parse_lora_arg("a/b.safetensors:0.8") == ("a/b.safetensors", 0.8)
  assert parse_lora_arg("a/b.safetensors:-1.5e-1") == ("a/b.safetensors", -0.15)
  assert parse_lora_arg(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
  assert parse_lora_arg(r"C:\loras\x.safetensors:0.5") == (r"C:\loras\x.safetensors", 0.5)
  assert parse_lora_arg("a:b:c") == ("a:b:c", 1.0)
  assert parse_lora_arg("x.ckpt:nan") == ("x.ckpt:nan", 1.0)
  assert parse_lora_arg(":0.5") == (":0.5", 1.0)
