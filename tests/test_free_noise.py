"""FreeNoise long videos and prompt travel against diffusers (`AnimateDiffPipeline.enable_free_noise`).

The model: conftest's tiny random SD + AnimateDiff v2 pipeline (positional encoding 32), converted with
diffusers norm semantics. The UNet with FreeNoise windows vs diffusers' `FreeNoiseTransformerBlock`s, each
weighting scheme; the noise types vs diffusers' `_prepare_latents_free_noise` (its randn / randperm given
vcjax's draws); prompt interpolation vs `_encode_prompt_free_noise`; whole sampling runs (FreeNoise +
prompt travel) vs the diffusers pipeline on the same initial latents; sample.py's errors and a 64-frame
video from the 32-frame motion module.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference import rel_err, run_both, to_channels_last_video
from tests.test_sample_parity import OVERRIDES, diffusers_pipeline
from vcjax.diffusion import long_video
from vcjax.models.free_noise import (FreeNoiseConfig, WEIGHTING_SCHEMES, frame_weights, frame_windows,
                                     free_noise_block, set_free_noise)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def torch_pipe(random_pipeline):
  return diffusers_pipeline(random_pipeline)


@pytest.fixture(scope="module")
def vc_pipe(converted):
  from vcjax.pipeline import VideoPipeline
  return VideoPipeline.from_pretrained(converted)


def free_noise_block_of(pipe, length, stride, scheme):
  from diffusers.models.attention import FreeNoiseTransformerBlock
  return FreeNoiseTransformerBlock(dim=8, num_attention_heads=1, attention_head_dim=8, context_length=length,
                                   context_stride=stride, weighting_scheme=scheme)


@pytest.mark.parametrize("length", [4, 6, 16])
@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_weights_and_windows_are_diffusers(length, scheme):
  block = free_noise_block_of(None, length, 4 if length > 4 else 2, scheme)
  np.testing.assert_allclose(frame_weights(length, scheme), np.float32(block._get_frame_weights(length, scheme)))
  for f in range(length, 3 * length):
    starts, tail = frame_windows(f, length, block.context_stride)
    assert [(s, s + length) for s in starts] == block._get_frame_indices(f)
    assert tail == f - (starts[-1] + length)
  # odd lengths: diffusers' code makes length + 1 sawtooth weights (and fails); vcjax its docstring's
  assert list(frame_weights(5, "delayed_reverse_sawtooth")) == pytest.approx([0.01, 0.01, 3, 2, 1])
  assert list(frame_weights(5, "pyramid")) == [1, 2, 3, 2, 1]


@pytest.mark.parametrize("frames,length,stride,scheme", [
    (24, 16, 4, "pyramid"),  # diffusers' defaults: windows (0, 16), (4, 20), (8, 24)
    (26, 8, 3, "flat"),  # a last window that only adds to its last frames
    (27, 10, 4, "delayed_reverse_sawtooth"),
    (29, 12, 5, "pyramid"),
])
def test_unet_matches_diffusers(torch_pipe, converted, frames, length, stride, scheme):
  from vcjax.loading import load_unet
  torch_pipe.enable_free_noise(context_length=length, context_stride=stride, weighting_scheme=scheme)
  unet = load_unet(converted)
  set_free_noise(unet, FreeNoiseConfig(length, stride, scheme))
  rng = np.random.default_rng(frames)
  latents = rng.standard_normal((1, 4, frames, 4, 4)).astype(np.float32)
  context = rng.standard_normal((1, 77, 32)).astype(np.float32)
  got, want = run_both(torch_pipe.unet.eval(), unet, latents, np.array([601]), context)
  err = rel_err(got, want)
  print(f"UNet FreeNoise {frames} frames, windows {length}/{stride} {scheme}: rel err {err:.2e}")
  assert err <= 1e-4
  torch_pipe.disable_free_noise()


@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_extra_frames_join_every_window():
  """VideoMaker's reference (an extra last frame) is appended to each window, its output the windows' mean."""
  from flax import nnx
  from vcjax.models.blocks import TransformerBlock
  from vcjax.models.motion import sinusoidal_positions
  block = TransformerBlock(8, 2, None, rngs=nnx.Rngs(0))
  cfg = FreeNoiseConfig(4, 2, "pyramid", extra_frames=1)
  x = jax.random.normal(jax.random.key(1), (3, 9, 8))  # 8 video frames + the reference
  pe = jnp.asarray(sinusoidal_positions(5, 8))
  got = free_noise_block(block, x, cfg, pe)
  w = frame_weights(4, "pyramid")[:, None]
  acc, cnt, ref = np.zeros((3, 8, 8)), np.zeros((8, 1)), 0
  for s in (0, 2, 4):
    h = jnp.concatenate([x[:, s:s + 4], x[:, 8:]], axis=1)
    h = h + block.attn1(block.norm1(h) + pe)
    h = np.asarray(h + block.attn2(block.norm2(h) + pe))
    acc[:, s:s + 4] += h[:, :4] * w
    cnt[s:s + 4] += w
    ref = ref + h[:, 4:] / 3
  h = jnp.asarray(np.concatenate([acc / cnt, ref], axis=1), jnp.float32)
  want = h + block.ff(block.norm3(h))
  assert rel_err(got, want) <= 1e-5
  # at most one window: the plain block, the reference after the video as without FreeNoise
  short = x[:, 5:]
  np.testing.assert_allclose(free_noise_block(block, short, cfg, pe), block(short, pos_embed=pe[None, :4]), atol=1e-6)


@pytest.mark.parametrize("noise_type", ["shuffle_context", "repeat_context", "random"])
def test_noise_types_match_diffusers(torch_pipe, monkeypatch, noise_type):
  """vcjax's initial noise for a seed vs diffusers' `_prepare_latents_free_noise` given the same normal draws
  (randn_tensor) and permutations (torch.randperm). diffusers' repeat_context only repeats given latents of
  context_length frames (its own draw has num_frames: the `context_length == "repeat_context"` typo)."""
  import diffusers.pipelines.free_noise_utils as fnu
  from vcjax.pipeline import video_keys
  frames, length, stride = 30, 8, 3
  cfg = FreeNoiseConfig(length, stride, noise_type=noise_type)
  keys, _, _ = video_keys([11])
  shape = (frames, 2, 3, 4)
  got = np.asarray(long_video.initial_noise(keys, shape, cfg))
  draw_frames = length if noise_type == "repeat_context" else frames
  draw = np.asarray(jax.random.normal(keys[0], (draw_frames, *shape[1:])))[None]
  torch_draw = torch.from_numpy(draw.transpose(0, 4, 1, 2, 3).copy())
  perms = iter(long_video.permutations(jax.random.fold_in(keys[0], 1), frames, cfg))
  monkeypatch.setattr(fnu, "randn_tensor", lambda shape, **kw: torch_draw.clone())
  monkeypatch.setattr(torch, "randperm", lambda n, **kw: torch.from_numpy(np.asarray(next(perms), np.int64)))
  torch_pipe.enable_free_noise(context_length=length, context_stride=stride, noise_type=noise_type)
  given = torch_draw.clone() if noise_type == "repeat_context" else None
  want = torch_pipe._prepare_latents_free_noise(1, 4, frames, 16, 24, torch.float32, "cpu", latents=given)
  torch_pipe.disable_free_noise()
  np.testing.assert_array_equal(got, to_channels_last_video(want.numpy()))
  if noise_type == "shuffle_context":  # frames from context_length on are the first frames' noise, shuffled
    assert sorted(map(tuple, got[0, length:length + stride, 0, 0])) == sorted(
        map(tuple, got[0, 0:stride, 0, 0]))


def test_prompt_interpolation_matches_diffusers(torch_pipe, vc_pipe):
  prompts, frames = {0: "a cat", 5: "a dog", 9: "a red boat"}, 14
  got = long_video.frame_prompts(vc_pipe.encode_prompts, [prompts], frames)[0]
  torch_pipe.enable_free_noise(context_length=8, context_stride=2)
  with torch.no_grad():
    want, _ = torch_pipe._encode_prompt_free_noise(prompts, frames, "cpu", 1, False)
  torch_pipe.disable_free_noise()
  err = rel_err(got, want.numpy())
  print(f"prompt travel embeddings vs diffusers: rel err {err:.2e}")
  assert got.shape == (frames, 77, 32) and err <= 1e-5


def test_prompt_specs():
  assert long_video.parse_prompts('{"0": "a cat", "8": "a dog"}') == {0: "a cat", 8: "a dog"}
  assert long_video.parse_prompts("0:a cat|8: a dog: running") == {0: "a cat", 8: "a dog: running"}
  for bad, match in [("0 a cat", "not frame:prompt"), ('{"0": "a", ', "not a JSON"), ("x:a cat", "not an integer"),
                     ("0:a|0:b", "twice"), ('{"0": 3}', "non-empty prompt")]:
    with pytest.raises(ValueError, match=match):
      long_video.parse_prompts(bad)
  with pytest.raises(ValueError, match="first key frame must be 0"):
    long_video.check_prompts({2: "a"}, 8)
  with pytest.raises(ValueError, match="out of range"):
    long_video.check_prompts({0: "a", 8: "b"}, 8)


@pytest.mark.parametrize("bad,match", [
    (dict(weighting_scheme="steps"), "weighting_scheme must be one of"),
    (dict(noise_type="fresh"), "noise_type must be one of"),
    (dict(context_length=4, context_stride=5), "exceeds context_length"),
    (dict(context_stride=0), "positive integer"),
])
def test_config_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    FreeNoiseConfig(**bad)


def test_config_is_static_and_round_trips(converted):
  from flax import nnx
  from vcjax.loading import load_unet
  from vcjax.models.configs import UNet3DConfig, reconfigure
  from vcjax.nn.lora import add_lora, lora_modules
  unet = load_unet(converted)
  plain_def = nnx.graphdef(unet)
  rebuilt = reconfigure(unet, free_noise=dict(context_length=8, context_stride=2))
  assert rebuilt.down_blocks[0].motion_modules[0].free_noise == FreeNoiseConfig(8, 2)
  assert nnx.graphdef(rebuilt) != plain_def  # jit keys its cache on it
  assert UNet3DConfig.from_dict(json.loads(json.dumps(rebuilt.config.to_dict()))) == rebuilt.config
  assert UNet3DConfig(free_noise=dict(enabled=False)).free_noise is None
  add_lora(unet, rank=2, rngs=nnx.Rngs(0))
  n = len(lora_modules(unet))
  set_free_noise(unet, FreeNoiseConfig())  # in place: the LoRA stays
  assert len(lora_modules(unet)) == n and unet.config.free_noise == FreeNoiseConfig()


def torch_free_noise_run(torch_pipe, prompt, noise, frames, steps, **free):
  torch_pipe.enable_free_noise(**free)
  try:
    with torch.no_grad():
      return torch_pipe(prompt=prompt, negative_prompt="blurry", num_frames=frames, height=32, width=32,
                        num_inference_steps=steps, guidance_scale=7.5, latents=torch.from_numpy(noise),
                        output_type="latent").frames.numpy()
  finally:
    torch_pipe.disable_free_noise()


@pytest.mark.slow
@pytest.mark.parametrize("travel", [False, True])
def test_sampling_matches_diffusers(torch_pipe, vc_pipe, travel):
  """VideoPipeline.generate with FreeNoise (defaults: 16 / 4 pyramid shuffle_context), 24 frames, vs
  AnimateDiffPipeline.enable_free_noise on vcjax's initial latents (which diffusers uses as given)."""
  from vcjax.pipeline import video_keys
  frames, steps = 24, 3
  prompt = {0: "a cat", 10: "a dog"} if travel else "a cat"
  vc_pipe.enable_free_noise()
  try:
    out = vc_pipe.generate([prompt], seeds=[3], negative_prompt="blurry", num_frames=frames, height=32, width=32,
                           steps=steps, scheduler_config=vc_pipe.scheduler_settings(OVERRIDES), decode=False)
  finally:
    vc_pipe.disable_free_noise()
  keys, _, _ = video_keys([3])
  noise = np.asarray(long_video.initial_noise(keys, (frames, 4, 4, 4), FreeNoiseConfig()))
  want = torch_free_noise_run(torch_pipe, prompt, noise.transpose(0, 4, 1, 2, 3).copy(), frames, steps)
  err = rel_err(out.latents, to_channels_last_video(want))
  print(f"sampling FreeNoise 24 frames (prompt travel {travel}) vs diffusers: rel err {err:.2e}")
  assert err <= 1e-3


def run_cli(tmp_path, model, *args):
  cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--config", os.path.join(ROOT, "configs",
         "sample_animatediff.py"), f"--config.model={model}", "--config.height=32", "--config.width=32",
         "--config.steps=2", f"--config.output={tmp_path / 'v.mp4'}", "--config.gif=False",
         "--config.compilation_cache=", *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


def test_cli_errors(converted, tmp_path):
  """Each bad value: one `error: ...` line. In-process through sample.run (what main prints), one subprocess
  for the printing itself."""
  import sample
  from configs.sample_animatediff import get_config
  cases = [
      (dict(num_frames=40), "exceed the motion module's positional-encoding length 32 (--config.free_noise"),
      (dict(num_frames=40, free_noise=dict(enabled=True, weighting_scheme="steps")), "weighting_scheme must be"),
      (dict(num_frames=40, free_noise=dict(enabled=True, noise_type="x")), "noise_type must be one of"),
      (dict(num_frames=40, free_noise=dict(enabled=True, context_length=8, context_stride=9)), "exceeds context"),
      (dict(num_frames=40, free_noise=dict(enabled=True, context_length=48)), "exceeds the motion module's"),
      (dict(prompts="0 a cat"), "not frame:prompt"),
      (dict(prompts='{"0": "a cat", "16": "a dog"}'), "frame index 16 out of range for 16 frames"),
      (dict(prompts="4:a cat"), "first key frame must be 0"),
      (dict(prompts="0:a cat", prompt_file="p.txt"), "not both"),
  ]
  for overrides, match in cases:
    cfg = get_config()
    cfg.model, cfg.height, cfg.width, cfg.steps = converted, 32, 32, 1
    cfg.compilation_cache = ""
    fn = dict(overrides.pop("free_noise", {}))
    cfg.free_noise.update(fn)
    cfg.update(overrides)
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
      sample.run(cfg)
  proc = run_cli(tmp_path, converted, "--config.num_frames=40", "--config.free_noise.enabled=True",
                 "--config.free_noise.weighting_scheme=steps")
  assert proc.returncode == 1 and proc.stdout == ""
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: free_noise.weighting_scheme must be one of"), proc.stderr[-2000:]


@pytest.mark.slow
def test_cli_64_frames_from_a_32_frame_motion_module(converted, tmp_path):
  proc = run_cli(tmp_path, converted, "--config.num_frames=64", "--config.free_noise.enabled=True",
                 "--config.prompts=0:a cat|40:a dog", f"--config.save_latents={tmp_path / 'final.npy'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  latents = np.load(tmp_path / "final.npy")
  assert latents.shape == (1, 4, 64, 4, 4) and np.isfinite(latents).all()
  with open(tmp_path / "v.json") as f:
    sidecar = json.load(f)
  assert sidecar["config"]["free_noise"] == dict(enabled=True, context_length=16, context_stride=4,
                                                 weighting_scheme="pyramid", noise_type="shuffle_context", scope="motion")
  assert sidecar["config"]["prompts"] == "0:a cat|40:a dog" and sidecar["prompt"] == "a cat | a dog"
  assert sidecar["frame_prompts"] == {"0": "a cat", "40": "a dog"}


@pytest.mark.slow
def test_videomaker_reference_and_lora_schedule_with_free_noise(converted):
  """FreeNoise with VideoMaker's reference frame (in every window), prompt travel (the reference gets frame 0's
  prompt) and a per-step LoRA scale: it samples, and the schedule acts (a smoke test; the window semantics are
  test_extra_frames_join_every_window's)."""
  from flax import nnx
  from vcjax.nn.lora import add_lora, lora_modules
  from vcjax.pipeline import VideoPipeline
  pipe = VideoPipeline.from_pretrained(converted)
  add_lora(pipe.unet, rank=2, rngs=nnx.Rngs(0))
  for i, m in enumerate(lora_modules(pipe.unet).values()):
    m.lora_up.set_value(0.3 * jax.random.normal(jax.random.key(i), m.lora_up.get_value().shape))
  pipe.enable_free_noise(context_length=8, context_stride=4)
  image = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  run = lambda scales: pipe.generate([{0: "a cat", 6: "a dog"}], seeds=[0], num_frames=14, height=32, width=32,
                                     steps=2, reference_images=image, lora_scales=scales, decode=False).latents
  a, b = run([0.2, 1.0]), run([1.0, 1.0])
  assert a.shape == (1, 14, 4, 4, 4) and np.isfinite(a).all() and rel_err(a, b) > 1e-4
