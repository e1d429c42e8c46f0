"""FreeInit (vcjax/diffusion/free_init.py) against diffusers' `enable_free_init`: the filters, the frequency mix,
and whole runs of AnimateDiffPipeline on the tiny random model (both sides given the same re-init noise), at 5
frames of 32x48 (odd frame count, non-square latents 4x6)."""

import jax
import numpy as np
import pytest
import torch

from tests.reference import rel_err, to_channels_last_video
from vcjax.diffusion import free_init as fi
from vcjax.diffusion.schedulers import SchedulerConfig
from vcjax.pipeline import VideoPipeline

FRAMES, HEIGHT, WIDTH, STEPS = 5, 32, 48, 3
LATENT = (FRAMES, HEIGHT // 8, WIDTH // 8, 4)


def to_torch(x) -> torch.Tensor:
  """vcjax `(B, F, h, w, C)` -> diffusers `(B, C, F, h, w)`."""
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3)))


@pytest.fixture(scope="module")
def pipe(converted):
  return VideoPipeline.from_pretrained(converted)


@pytest.mark.parametrize("method,order,d_s,d_t", [("butterworth", 4, 0.25, 0.25), ("butterworth", 2, 0.4, 0.1),
                                                  ("gaussian", 4, 0.25, 0.5), ("ideal", 4, 0.3, 0.25),
                                                  ("gaussian", 4, 0.0, 0.25)])
def test_filter_matches_diffusers(method, order, d_s, d_t):
  from diffusers.pipelines.free_init_utils import FreeInitMixin
  cfg = fi.FreeInitConfig(method=method, order=order, spatial_stop_frequency=d_s, temporal_stop_frequency=d_t)
  want = FreeInitMixin()._get_free_init_freq_filter((1, 4, 5, 4, 6), "cpu", method, order, d_s, d_t)
  got = fi.low_pass_filter((5, 4, 6), cfg)
  assert got.shape == (5, 4, 6, 1)
  np.testing.assert_array_equal(got[..., 0], want[0, 0].numpy())  # the same float32 numbers


def test_mix_matches_diffusers():
  from diffusers.pipelines.free_init_utils import FreeInitMixin
  rng = np.random.default_rng(0)
  x, noise = (rng.standard_normal((2, *LATENT)).astype(np.float32) for _ in range(2))
  mask = fi.low_pass_filter(LATENT[:3], fi.FreeInitConfig())
  want = FreeInitMixin()._apply_freq_filter(to_torch(x), to_torch(noise), torch.from_numpy(mask[..., 0]))
  got = fi.mix_frequencies(x, noise, mask)
  err = rel_err(got, to_channels_last_video(want.numpy()))
  print(f"FreeInit frequency mix vs diffusers: rel err {err:.2e}")
  assert err <= 1e-6


def test_config_errors_and_fast_steps():
  for bad, match in [(dict(num_iters=0), "num_iters"), (dict(num_iters=1.5), "num_iters"),
                     (dict(method="box"), "method 'box' is unknown"), (dict(order=0), "order"),
                     (dict(spatial_stop_frequency=1.5), "spatial_stop_frequency")]:
    with pytest.raises(ValueError, match=match):
      fi.FreeInitConfig(**bad)
  with pytest.raises(ValueError, match="unknown free_init field"):
    fi.FreeInitConfig.from_dict(dict(enabled=True, iters=2))
  fast = fi.FreeInitConfig(num_iters=3, use_fast_sampling=True)
  assert [fi.iteration_steps(fast, 25, k) for k in range(3)] == [8, 16, 25]  # diffusers' int(25 / 3 * (k + 1))
  assert [fi.iteration_steps(fi.FreeInitConfig(num_iters=4, use_fast_sampling=True), 2, k)
          for k in range(4)] == [1, 1, 1, 2]
  with pytest.raises(ValueError, match="euler"):
    fi.check_scheduler("euler_a")


def diffusers_free_init(ref, cfg: fi.FreeInitConfig, prompts, noise, fresh, monkeypatch, *, steps=STEPS,
                        negative="blurry", guidance_scale=7.5):
  """diffusers AnimateDiffPipeline `ref` with enable_free_init(cfg), its re-init noise `fresh[k - 1]` (vcjax
  layout `(B, F, h, w, C)`), from initial latents `noise`. -> final latents, vcjax layout."""
  import diffusers.pipelines.free_init_utils as fiu
  ref.enable_free_init(**{f: getattr(cfg, f) for f in ("num_iters", "use_fast_sampling", "method", "order",
                                                       "spatial_stop_frequency", "temporal_stop_frequency")})
  draws = iter(to_torch(f) for f in fresh)
  monkeypatch.setattr(fiu, "randn_tensor", lambda shape, **kw: next(draws).reshape(shape))
  with torch.no_grad():
    out = ref(prompt=prompts, negative_prompt=[negative] * len(prompts), num_frames=FRAMES, height=HEIGHT,
              width=WIDTH, num_inference_steps=steps, guidance_scale=guidance_scale,
              latents=to_torch(noise), output_type="latent").frames.numpy()
  with pytest.raises(StopIteration):
    next(draws)  # every re-init drew once
  return to_channels_last_video(out)


@pytest.mark.parametrize("scheduler,cfg", [
    ("ddim", fi.FreeInitConfig()),  # diffusers' defaults: 3 iterations, Butterworth order 4, 0.25 / 0.25
    ("dpmsolver++", fi.FreeInitConfig(num_iters=2, use_fast_sampling=True, method="gaussian",
                                      spatial_stop_frequency=0.4)),
    ("ddim", fi.FreeInitConfig(num_iters=2, method="ideal", temporal_stop_frequency=0.5)),
])
def test_matches_diffusers_enable_free_init(pipe, random_pipeline, monkeypatch, scheduler, cfg):
  prompts, seeds = ["a cat surfing a wave", "a red boat"], [3, 11]
  noise = np.random.default_rng(1).standard_normal((2, *LATENT)).astype(np.float32)
  keys = fi.stream_keys(seeds, fi.FREE_INIT_STREAM)
  fresh = [np.asarray(fi.reinit_noise(keys, k, LATENT)) for k in range(1, cfg.num_iters)]
  got = pipe.generate(prompts, seeds=seeds, negative_prompt="blurry", num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                      steps=STEPS, scheduler=scheduler, scheduler_config=SchedulerConfig(), init_noise=noise,
                      free_init=cfg, decode=False, devices=jax.devices()[:1]).latents
  import diffusers
  from tests.test_sampling import diffusers_pipeline
  ref = diffusers_pipeline(random_pipeline)
  cls = {"ddim": "DDIMScheduler", "dpmsolver++": "DPMSolverMultistepScheduler"}[scheduler]
  ref.scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config)
  want = diffusers_free_init(ref, cfg, prompts, noise, fresh, monkeypatch)
  plain = pipe.generate(prompts, seeds=seeds, negative_prompt="blurry", num_frames=FRAMES, height=HEIGHT,
                        width=WIDTH, steps=STEPS, scheduler=scheduler, scheduler_config=SchedulerConfig(),
                        init_noise=noise, decode=False, devices=jax.devices()[:1]).latents
  err = rel_err(got, want)
  print(f"FreeInit {scheduler} {cfg}: rel err {err:.2e} vs diffusers (vs no FreeInit {rel_err(got, plain):.2e})")
  assert err <= 1e-3
  assert rel_err(got, plain) > 1e-2  # the iterations really act


def test_one_iteration_is_no_free_init_and_devices_agree(pipe):
  kw = dict(seeds=[0, 1, 2], negative_prompt="", num_frames=FRAMES, height=HEIGHT, width=WIDTH, steps=2,
            scheduler="ddim", eta=1.0, decode=False)
  prompts = ["a", "b", "c"]
  plain = pipe.generate(prompts, devices=jax.devices()[:1], **kw).latents
  once = pipe.generate(prompts, free_init=fi.FreeInitConfig(num_iters=1), devices=jax.devices()[:1], **kw).latents
  np.testing.assert_allclose(once, plain, rtol=0, atol=1e-6)
  cfg = fi.FreeInitConfig(num_iters=2)
  one = pipe.generate(prompts, free_init=cfg, devices=jax.devices()[:1], **kw).latents
  eight = pipe.generate(prompts, free_init=cfg, devices=jax.devices(), **kw).latents  # 3 videos padded to 8
  assert rel_err(eight, one) <= 1e-5
  alone = pipe.generate(prompts[1:2], free_init=cfg, devices=jax.devices()[:1], **dict(kw, seeds=[1])).latents
  assert rel_err(alone[0], one[1]) <= 1e-5  # a video depends on its own seed only


def test_lcm_matches_diffusers_with_per_step_noise(pipe, random_pipeline, monkeypatch):
  """LCM draws noise at every step but the last: diffusers gets vcjax's, iteration k's from
  `iteration_noise_keys` (the run's own keys at k = 0)."""
  import diffusers
  import diffusers.schedulers.scheduling_lcm as lcm_module
  from tests.test_sampling import diffusers_pipeline
  from vcjax.pipeline import video_keys
  prompts, seeds, cfg = ["a lighthouse"], [9], fi.FreeInitConfig(num_iters=2)
  noise = np.random.default_rng(4).standard_normal((1, *LATENT)).astype(np.float32)
  got = pipe.generate(prompts, seeds=seeds, negative_prompt="blurry", num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                      steps=STEPS, scheduler="lcm", scheduler_config=SchedulerConfig(), init_noise=noise,
                      free_init=cfg, decode=False, devices=jax.devices()[:1]).latents
  step_keys = [fi.iteration_noise_keys(video_keys(seeds)[2], k) for k in range(cfg.num_iters)]
  draws = iter(to_torch(jax.vmap(lambda key, i=i: jax.random.normal(jax.random.fold_in(key, i), LATENT))(keys))
               for keys in step_keys for i in range(STEPS - 1))
  monkeypatch.setattr(lcm_module, "randn_tensor", lambda shape, **kw: next(draws).reshape(shape))
  ref = diffusers_pipeline(random_pipeline)
  ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
  keys = fi.stream_keys(seeds, fi.FREE_INIT_STREAM)
  fresh = [np.asarray(fi.reinit_noise(keys, k, LATENT)) for k in range(1, cfg.num_iters)]
  want = diffusers_free_init(ref, cfg, prompts, noise, fresh, monkeypatch)
  err = rel_err(got, want)
  print(f"FreeInit LCM (2 iterations, per-step noise) vs diffusers: rel err {err:.2e}")
  assert err <= 1e-3
