"""FreeNoise with scope "unet" (vcjax/diffusion/context_windows.py): the whole UNet per frame window.

Not a diffusers computation, so the references here are a numpy re-statement of the windowing and a UNet that
must come out unchanged when one window covers the video. The memory claim (the buffer plan grows with the
window, not the video) is measured by bench/free_noise_memory.py: memory targets live in the benchmarks."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcjax.diffusion.context_windows import window_starts, windowed_eps
from vcjax.models.free_noise import WEIGHTING_SCHEMES, FreeNoiseConfig, frame_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_window_starts_cover_every_frame_once_flush_at_the_end():
  assert window_starts(16, 16, 4) == [0] and window_starts(9, 16, 4) == [0]
  assert window_starts(24, 8, 4) == [0, 4, 8, 12, 16]
  assert window_starts(21, 8, 4) == [0, 4, 8, 12, 13]  # one more window, flush with the last frame
  assert window_starts(23, 8, 8) == [0, 8, 15]


def _position_dependent(x, c):
  """A stand-in UNet whose output depends on the frame's place in the window and on its context (shared
  `(B, T, D)` or per frame `(B, L + E, T, D)`, E extra frames last)."""
  length = x.shape[1]
  pos = jnp.arange(1, length + 1, dtype=jnp.float32).reshape(1, length, 1, 1, 1)
  if c.ndim == 4:
    own = c[:, :length].mean((2, 3)).reshape(x.shape[0], length, 1, 1, 1)
    extra = c[:, length:].sum((1, 2, 3)).reshape(-1, 1, 1, 1, 1)
  else:
    own, extra = c.mean((1, 2)).reshape(-1, 1, 1, 1, 1), 0.0
  return x * pos + own * jnp.sqrt(pos) + extra


def _numpy_reference(latents, ctx, config):
  """The windowing written out: every window's outputs, weighted by position, averaged per frame."""
  latents, ctx = np.asarray(latents, np.float64), np.asarray(ctx, np.float64)
  f, length = latents.shape[1], config.context_length
  acc, total = np.zeros_like(latents), np.zeros(f)
  w = frame_weights(length, config.weighting_scheme).astype(np.float64)
  for start in window_starts(f, length, config.context_stride):
    c = ctx if ctx.ndim == 3 else np.concatenate([ctx[:, start:start + length], ctx[:, f:]], 1)
    out = np.asarray(_position_dependent(jnp.asarray(latents[:, start:start + length], jnp.float32),
                                         jnp.asarray(c, jnp.float32)), np.float64)
    acc[:, start:start + length] += out * w[None, :, None, None, None]
    total[start:start + length] += w
  return acc / total[None, :, None, None, None]


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
@pytest.mark.parametrize("frames,length,stride,per_frame", [(21, 8, 4, False), (19, 6, 3, True),
                                                            (12, 5, 5, True)])
def test_windowed_eps_equals_the_windowing_written_out(scheme, frames, length, stride, per_frame):
  rng = np.random.default_rng(frames)
  latents = jnp.asarray(rng.normal(size=(2, frames, 3, 5, 4)), jnp.float32)
  # per frame: prompt travel's (B, F, T, D) plus one extra (reference) frame's context at the end
  ctx = jnp.asarray(rng.normal(size=(2, frames + 1, 3, 6) if per_frame else (2, 3, 6)), jnp.float32)
  config = FreeNoiseConfig(length, stride, scheme)
  got = jax.jit(lambda x, c: windowed_eps(_position_dependent, x, c, config))(latents, ctx)
  want = _numpy_reference(latents, ctx, config)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
  # A per-frame function gives the same per frame whatever window it runs in: the weights must normalise.
  plain = lambda x, c: x * 3.0 - 1.0
  np.testing.assert_allclose(np.asarray(windowed_eps(plain, latents, ctx, config)), np.asarray(plain(latents, ctx)),
                             rtol=1e-6, atol=1e-6)


def test_one_window_is_the_plain_call():
  x = jnp.ones((1, 8, 2, 2, 4))
  calls = []
  fn = lambda a, c: calls.append(a.shape) or a * 2
  out = windowed_eps(fn, x, jnp.zeros((1, 3, 4)), FreeNoiseConfig(8, 4))
  assert calls == [(1, 8, 2, 2, 4)] and np.array_equal(np.asarray(out), 2 * np.ones((1, 8, 2, 2, 4)))


def test_pipeline_scope_setting_and_errors(converted):
  from vcjax.pipeline import VideoPipeline
  pipe = VideoPipeline.from_pretrained(converted)
  pipe.enable_free_noise(context_length=8, context_stride=4, scope="unet")
  assert pipe.unet.config.free_noise is None and pipe.context_windows == FreeNoiseConfig(8, 4)
  assert pipe.free_noise == FreeNoiseConfig(8, 4) and pipe.max_frames is None
  pipe.enable_free_noise(context_length=8, context_stride=4)  # back to diffusers' scope
  assert pipe.context_windows is None and pipe.unet.config.free_noise == FreeNoiseConfig(8, 4)
  pipe.disable_free_noise()
  assert pipe.free_noise is None and pipe.max_frames == pipe.unet.config.motion_max_seq_length
  with pytest.raises(ValueError, match="scope must be one of"):
    pipe.enable_free_noise(scope="layers")


@pytest.mark.slow
def test_scope_unet_samples_long_videos_with_reference_and_travel(converted):
  """One window covering the video: exactly the plain sampler. Longer: each window is a plain short video,
  so the result differs from diffusers' scope but stays finite and takes the reference and prompt travel."""
  from vcjax.pipeline import VideoPipeline
  pipe = VideoPipeline.from_pretrained(converted)
  kw = dict(seeds=[1], height=32, width=24, steps=2, decode=False)
  plain = pipe.generate(["a cat"], num_frames=9, **kw).latents
  pipe.enable_free_noise(context_length=16, context_stride=4, noise_type="random", scope="unet")
  one = pipe.generate(["a cat"], num_frames=9, **kw).latents
  np.testing.assert_array_equal(one, plain)
  image = np.random.default_rng(0).uniform(-1, 1, (1, 32, 24, 3)).astype(np.float32)
  pipe.enable_free_noise(context_length=8, context_stride=4, scope="unet")
  long = pipe.generate([{0: "a cat", 12: "a dog"}], num_frames=21, reference_images=image, **kw).latents
  pipe.enable_free_noise(context_length=8, context_stride=4, scope="motion")
  layer = pipe.generate([{0: "a cat", 12: "a dog"}], num_frames=21, reference_images=image, **kw).latents
  assert long.shape == (1, 21, 4, 3, 4) and np.isfinite(long).all()
  assert np.abs(long - layer).max() > 1e-4  # the two scopes are different computations


@pytest.mark.slow
def test_cli_scope_unet_and_sidecar(converted, tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--config", os.path.join(ROOT, "configs",
         "sample_animatediff.py"), f"--config.model={converted}", "--config.height=32", "--config.width=32",
         "--config.steps=2", f"--config.output={tmp_path / 'v.mp4'}", "--config.gif=False",
         "--config.compilation_cache=", "--config.num_frames=37", "--config.free_noise.enabled=True",
         "--config.free_noise.scope=unet", f"--config.save_latents={tmp_path / 'final.npy'}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  latents = np.load(tmp_path / "final.npy")
  assert latents.shape[2] == 37 and np.isfinite(latents).all()
  with open(tmp_path / "v.json") as f:
    assert json.load(f)["config"]["free_noise"]["scope"] == "unet"
  bad = subprocess.run(cmd[:-2] + ["--config.free_noise.scope=layers"], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(
      "error: free_noise.scope must be one of"), bad.stderr[-2000:]
