"""LDM single-file <-> diffusers key renaming (vcjax.weights.ldm), checked against diffusers' own converters.

Tiny random diffusers models are renamed into LDM names with our inverse; diffusers' official single-file
converters must map that back onto the original state dict exactly (validating our table against theirs),
and our forward functions must too.
"""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from vcjax.models.configs import UNet3DConfig
from vcjax.weights.errors import CheckpointError
from vcjax.weights.ldm import (diffusers_unet_to_ldm, diffusers_vae_to_ldm, is_ldm_checkpoint, is_ldm_vae,
                               join_ldm_checkpoint, ldm_clip_to_diffusers, ldm_unet_to_diffusers,
                               ldm_vae_to_diffusers, modernize_vae_attention_keys, split_ldm_checkpoint)

SD15_DOWN = ("CrossAttnDownBlock", "CrossAttnDownBlock", "CrossAttnDownBlock", "DownBlock")
SD15_UP = ("UpBlock", "CrossAttnUpBlock", "CrossAttnUpBlock", "CrossAttnUpBlock")
UNET_CASES = {
    "2-level": dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock", "DownBlock"),
                    up_block_types=("UpBlock", "CrossAttnUpBlock")),
    "4-level": dict(block_out_channels=(32, 32, 64, 64), down_block_types=SD15_DOWN, up_block_types=SD15_UP),
}
VAE_CASES = {"2-level": ((32, 64), 1), "4-level": ((32, 32, 64, 64), 2)}


def numpy_state(model):
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def assert_same_dict(got, want, squeeze_1x1=False):
  """Same key sets and bit-identical arrays (1x1 conv == linear up to reshape if `squeeze_1x1`)."""
  assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
  for k, w in want.items():
    g = np.asarray(got[k])
    if squeeze_1x1 and g.shape != w.shape:
      g = g.reshape(w.shape)
    assert g.shape == w.shape, k
    np.testing.assert_array_equal(g, w, err_msg=k)


@pytest.fixture(scope="module", params=sorted(UNET_CASES))
def unet_case(request):
  torch.manual_seed(0)
  kw = UNET_CASES[request.param]
  ours = UNet3DConfig(layers_per_block=2, cross_attention_dim=32, num_attention_heads=2, **kw)
  model = UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=kw["block_out_channels"],
      down_block_types=tuple(t + "2D" for t in kw["down_block_types"]),
      up_block_types=tuple(t + "2D" for t in kw["up_block_types"]),
      layers_per_block=2, cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32)
  return ours, model.config, numpy_state(model)


def test_unet_matches_official_converter(unet_case):
  config, diffusers_config, sd = unet_case
  ldm = diffusers_unet_to_ldm(sd, config)
  # LDM numbering sanity: SD1.5-style 4 levels give input_blocks 0..11 and output_blocks 0..11.
  n = len(config.block_out_channels)
  inputs = {int(k.split(".")[1]) for k in ldm if k.startswith("input_blocks.")}
  outputs = {int(k.split(".")[1]) for k in ldm if k.startswith("output_blocks.")}
  assert inputs == set(range(1 + 2 * n + n - 1)) and outputs == set(range(3 * n))
  assert all(k.split(".")[0] in {"time_embed", "input_blocks", "middle_block", "output_blocks", "out"} for k in ldm)
  # Known names of real LDM files (the official converter accepts the upsampler in slot 1 or 2, so
  # check ours: slot 2 after a transformer, slot 1 otherwise).
  known = ["input_blocks.0.0.weight", "input_blocks.3.0.op.weight", "time_embed.2.bias", "out.2.weight",
           "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.2.emb_layers.1.weight",
           "output_blocks.2.1.conv.weight", "output_blocks.3.0.skip_connection.weight"]
  if n == 4:  # SD1.5's numbering
    known += ["input_blocks.6.0.op.weight", "input_blocks.9.0.op.weight", "input_blocks.11.0.out_layers.3.weight",
              "input_blocks.8.1.proj_in.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
              "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight"]
  missing = [k for k in known if k not in ldm]
  assert not missing, missing
  assert not any(k.startswith(("output_blocks.2.2.", "output_blocks.5.1.conv", "input_blocks.10.1."))
                 for k in ldm)

  official = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()},
                                         dict(diffusers_config))
  assert_same_dict(official, sd)
  assert_same_dict(ldm_unet_to_diffusers(ldm, config), sd)
  # The diffusers config dict works as the layout config too.
  assert_same_dict(ldm_unet_to_diffusers(ldm, dict(diffusers_config)), sd)


def test_unet_passes_arrays_through(unet_case):
  config, _, sd = unet_case
  back = ldm_unet_to_diffusers(diffusers_unet_to_ldm(sd, config), config)
  assert all(back[k] is sd[k] for k in sd)


def test_unet_unknown_keys_raise(unet_case):
  config, _, sd = unet_case
  ldm = diffusers_unet_to_ldm(sd, config)
  with pytest.raises(CheckpointError, match="input_blocks.1.0.in_layers.9.weight"):
    ldm_unet_to_diffusers({**ldm, "input_blocks.1.0.in_layers.9.weight": np.zeros(1)}, config)
  with pytest.raises(CheckpointError, match="input_blocks.99"):
    ldm_unet_to_diffusers({**ldm, "input_blocks.99.0.in_layers.0.weight": np.zeros(1)}, config)
  with pytest.raises(CheckpointError, match="motion_modules"):
    diffusers_unet_to_ldm({**sd, "down_blocks.0.motion_modules.0.proj_in.weight": np.zeros(1)}, config)


@pytest.fixture(scope="module", params=sorted(VAE_CASES))
def vae_state(request):
  torch.manual_seed(0)
  channels, layers = VAE_CASES[request.param]
  n = len(channels)
  model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        layers_per_block=layers, norm_num_groups=32, sample_size=16)
  return model.config, numpy_state(model)


def test_vae_matches_official_converter(vae_state):
  diffusers_config, sd = vae_state
  ldm = diffusers_vae_to_ldm(sd)
  n = len(diffusers_config["block_out_channels"])
  # The decoder is numbered by resolution in LDM: up.{n-1} is the first (lowest-resolution) block and
  # the only one without an upsampler is up.0.
  assert f"decoder.up.{n - 1}.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
  # nin_shortcut exactly where the channel count changes (encoder level i, decoder up.(i-1)).
  channels = diffusers_config["block_out_channels"]
  widen = [i for i in range(1, n) if channels[i] != channels[i - 1]]
  assert sorted(int(k.split(".")[2]) for k in ldm
                if k.startswith("encoder.down.") and k.endswith("nin_shortcut.weight")) == widen
  assert sorted(int(k.split(".")[2]) for k in ldm
                if k.startswith("decoder.up.") and k.endswith("nin_shortcut.weight")) == [i - 1 for i in widen]
  assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # LDM stores 1x1 convs

  official = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()},
                                        dict(diffusers_config))
  assert_same_dict(official, sd)
  ours = ldm_vae_to_diffusers(ldm)
  assert ours["decoder.mid_block.attentions.0.to_out.0.weight"].ndim == 4  # left as the 1x1 conv
  assert_same_dict(ours, sd, squeeze_1x1=True)


def test_vae_old_attention_names(vae_state):
  _, sd = vae_state
  new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for k, v in sd.items():
    for new, o in new_to_old.items():
      if ".mid_block.attentions.0." in k and f".{new}." in k:
        k = k.replace(f".{new}.", f".{o}.")
    old[k] = v
  assert any(".query." in k for k in old) and not any(".to_q." in k for k in old)
  assert_same_dict(modernize_vae_attention_keys(old), sd)
  # The exporter accepts the old names as well.
  assert_same_dict(diffusers_vae_to_ldm(old), diffusers_vae_to_ldm(sd))


def test_vae_unknown_keys_raise(vae_state):
  _, sd = vae_state
  ldm = diffusers_vae_to_ldm(sd)
  with pytest.raises(CheckpointError, match="encoder.mid.attn_1.qkv.weight"):
    ldm_vae_to_diffusers({**ldm, "encoder.mid.attn_1.qkv.weight": np.zeros(1)})


@pytest.fixture(scope="module")
def clip_state():
  torch.manual_seed(0)
  model = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       bos_token_id=998, eos_token_id=999, pad_token_id=1))
  sd = numpy_state(model)
  # transformers >= 5 saves without the `text_model.` level; SD1.5 files have it.
  return model, {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def test_clip(clip_state):
  model, sd = clip_state
  position_ids = np.arange(77, dtype=np.int64)[None]
  sd15 = {**sd, "text_model.embeddings.position_ids": position_ids}
  assert_same_dict(ldm_clip_to_diffusers(sd15), sd)
  bare = {k[len("text_model."):]: v for k, v in sd15.items()}  # the variant without `text_model.`
  assert_same_dict(ldm_clip_to_diffusers(bare), sd)
  # The result loads strictly into transformers' CLIPTextModel.
  out = ldm_clip_to_diffusers(sd15)
  stripped = {k.removeprefix("text_model."): torch.from_numpy(v) for k, v in out.items()}
  result = model.load_state_dict(stripped, strict=False)
  assert not result.missing_keys and not result.unexpected_keys
  with pytest.raises(CheckpointError):
    ldm_clip_to_diffusers({**sd, "text_projection.weight": np.zeros(1)})


def test_whole_checkpoint(unet_case, clip_state):
  config, _, unet_sd = unet_case
  vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=32)
  vae_sd = numpy_state(vae)
  _, clip_sd = clip_state
  parts = {"unet": diffusers_unet_to_ldm(unet_sd, config), "vae": diffusers_vae_to_ldm(vae_sd),
           "text_encoder": clip_sd}
  full = join_ldm_checkpoint(parts)
  full["alphas_cumprod"] = np.ones(1000, np.float32)  # scheduler buffers that real files carry
  full["model_ema.decay"] = np.ones((), np.float32)
  assert any(k.startswith("model.diffusion_model.input_blocks.1.") for k in full)
  assert any(k.startswith("first_stage_model.decoder.up.") for k in full)
  assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in full)
  assert is_ldm_checkpoint(full) and is_ldm_checkpoint({"state_dict": full})
  assert not is_ldm_checkpoint(unet_sd) and not is_ldm_checkpoint(vae_sd)
  assert is_ldm_vae(parts["vae"]) and not is_ldm_vae(vae_sd)

  for split in (split_ldm_checkpoint(full), split_ldm_checkpoint({"state_dict": full})):
    assert set(split) == {"unet", "vae", "text_encoder"}
    for name in split:
      assert_same_dict(split[name], parts[name])
    assert_same_dict(ldm_unet_to_diffusers(split["unet"], config), unet_sd)
    assert_same_dict(ldm_vae_to_diffusers(split["vae"]), vae_sd, squeeze_1x1=True)
    assert_same_dict(ldm_clip_to_diffusers(split["text_encoder"]), clip_sd)
