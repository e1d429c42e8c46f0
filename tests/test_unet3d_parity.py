"""UNet3D vs diffusers' UNetMotionModel (random weights, tiny real architecture), and vs a PyTorch
reference with the original AnimateDiff's per-frame norms."""

import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import UNetMotionModel
from flax import nnx

from tests.reference import rel_err, run_both
from vcjax.testing import randomize_
from vcjax.models.configs import tiny_unet
from vcjax.models.unet3d import UNet3D
from vcjax.weights.keymaps import load_state_dict

FRAMES = 4


def diffusers_unet(mid_block: bool, seed: int = 0) -> UNetMotionModel:
  torch.manual_seed(seed)
  model = UNetMotionModel(
      block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
      up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), layers_per_block=2,
      num_attention_heads=2, cross_attention_dim=32, norm_num_groups=32, motion_num_attention_heads=2,
      motion_max_seq_length=24, use_motion_mid_block=mid_block)
  return randomize_(model, seed).eval()


def load_vcjax(state_dict, **config) -> UNet3D:
  unet = nnx.eval_shape(lambda: UNet3D(tiny_unet(**config), rngs=nnx.Rngs(0)))
  return load_state_dict(unet, state_dict, ignore=[r"pos_embed\.pe$"])


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((2, 4, FRAMES, 16, 16)).astype(np.float32)  # diffusers layout
  context = rng.standard_normal((2, 7, 32)).astype(np.float32)
  timesteps = np.array([999, 17], np.int64)
  return latents, timesteps, context


@pytest.mark.parametrize("mid_block", [False, True])
@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_matches_diffusers_unet_motion_model(tmp_path, mid_block):
  ref = diffusers_unet(mid_block)
  ref.save_pretrained(tmp_path)
  state_dict = safetensors.numpy.load_file(tmp_path / "diffusion_pytorch_model.safetensors")
  unet = load_vcjax(state_dict, motion_mid_block=mid_block)  # defaults = diffusers norm semantics
  got, want = run_both(ref, unet, *inputs())
  assert got.shape == want.shape
  err = rel_err(got, want)
  print(f"UNet3D vs UNetMotionModel (mid motion {mid_block}): rel err {err:.2e}")
  assert err <= 1e-5


@pytest.mark.parametrize("size", [(5, 7), (9, 6), (3, 3)])
@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_latent_sizes_the_downsamplers_round(tmp_path, size):
  """Odd latent sizes: stride-2 downsampling rounds up, and each upsampler resizes to its skip's size (diffusers'
  upsample_size, torch's nearest rule) instead of doubling."""
  ref = diffusers_unet(True)
  ref.save_pretrained(tmp_path)
  unet = load_vcjax(safetensors.numpy.load_file(tmp_path / "diffusion_pytorch_model.safetensors"),
                    motion_mid_block=True)
  latents, timesteps, context = inputs()
  latents = np.random.default_rng(1).standard_normal((2, 4, 3, *size)).astype(np.float32)
  got, want = run_both(ref, unet, latents, timesteps, context)
  err = rel_err(got, want)
  print(f"UNet3D vs UNetMotionModel at {size[0]}x{size[1]} latents: rel err {err:.2e}")
  assert got.shape == want.shape == (2, 3, *size, 4) and err <= 1e-5


def test_nearest_indices_follow_torch():
  from vcjax.models.blocks import nearest_indices
  for n_in, n_out in [(3, 5), (4, 7), (5, 9), (2, 3), (7, 13), (8, 16)]:
    want = torch.nn.functional.interpolate(torch.arange(n_in, dtype=torch.float32)[None, None], size=n_out,
                                           mode="nearest")[0, 0].long().numpy()
    np.testing.assert_array_equal(nearest_indices(n_in, n_out), want)


class PerFrameGroupNorm(torch.nn.Module):
  """The original AnimateDiff's motion-module norm: the same GroupNorm, each frame on its own."""

  def __init__(self, norm: torch.nn.GroupNorm):
    super().__init__()
    self.norm = norm

  def forward(self, x):  # (B, C, F, H, W)
    b, c, f, h, w = x.shape
    y = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
    return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


class PooledGroupNorm(torch.nn.Module):
  """A resnet norm with statistics over all frames (original AnimateDiff v1: GroupNorm on 5-D)."""

  def __init__(self, norm: torch.nn.GroupNorm, frames: int):
    super().__init__()
    self.norm, self.frames = norm, frames

  def forward(self, x):  # (B*F, C, H, W)
    bf, c, h, w = x.shape
    x5 = x.reshape(bf // self.frames, self.frames, c, h, w).permute(0, 2, 1, 3, 4)
    y = self.norm(x5)
    return y.permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)


def original_semantics_(model: UNetMotionModel, pooled_resnets: bool):
  """Turn diffusers' norms into the original AnimateDiff's, in place."""
  for module in model.modules():
    if module.__class__.__name__ == "AnimateDiffTransformer3D":
      module.norm = PerFrameGroupNorm(module.norm)
    if pooled_resnets and module.__class__.__name__ == "ResnetBlock2D":
      module.norm1 = PooledGroupNorm(module.norm1, FRAMES)
      module.norm2 = PooledGroupNorm(module.norm2, FRAMES)
  if pooled_resnets:
    model.conv_norm_out = PooledGroupNorm(model.conv_norm_out, FRAMES)
  return model


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_original_semantics_matches_per_frame_reference(tmp_path, version):
  from vcjax.models.configs import norm_semantics
  mid = version == "v2"
  ref = diffusers_unet(mid, seed=1)
  ref.save_pretrained(tmp_path)
  state_dict = safetensors.numpy.load_file(tmp_path / "diffusion_pytorch_model.safetensors")
  unet = load_vcjax(state_dict, motion_mid_block=mid, **norm_semantics("original", version))
  ref = original_semantics_(ref, pooled_resnets=version == "v1")
  got, want = run_both(ref, unet, *inputs(1))
  err = rel_err(got, want)
  print(f"UNet3D original semantics {version}: rel err {err:.2e}")
  assert err <= 1e-5
  # The two semantics really differ on these weights (else this test could not fail).
  diffusers_unet_out, _ = run_both(diffusers_unet(mid, seed=1), load_vcjax(state_dict, motion_mid_block=mid),
                                   *inputs(1))
  assert rel_err(diffusers_unet_out, want) > 1e-3
