"""Step-by-step parity of vcjax.diffusion.schedulers with diffusers' DDIMScheduler and
DPMSolverMultistepScheduler (fp32 vs fp32).

Each side runs the whole loop with the same fake model (identical float32 arithmetic on both sides) and
feeds its OWN previous sample back, so the errors below include propagation through the loop.
Tolerances: samples <= 1e-6 relative L2 at every step. DDIM's pred_original_sample gets 1e-6 /
sqrt(alpha_bar_t): x0 = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) divides the ~1e-7 float32 noise
in x (and torch's occasional 1-ulp float32 sqrt) by sqrt(alpha_bar) (~0.07 at t = 999).
"""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.training_utils import compute_snr

from vcjax.diffusion import schedulers as S

warnings.filterwarnings("ignore", category=FutureWarning)

SHAPE = (2, 3, 4, 6, 6)  # (B, F, H, W, C): any layout works, the schedulers are elementwise
_rng = np.random.default_rng(0)
X_INIT = _rng.standard_normal(SHAPE).astype(np.float32)
W = _rng.standard_normal(SHAPE).astype(np.float32)
W_T = torch.from_numpy(W)



def _c(t) -> np.float32:
  return np.float32(int(t) / 1000.0)


def fake_torch(x, t):
  """A smooth deterministic "model": only correctly-rounded ops, so both sides compute the same."""
  return x / (1 + x.abs()) * 0.9 + float(_c(t)) * W_T


def fake_jax(x, c):
  return x / (1 + jnp.abs(x)) * np.float32(0.9) + c * W


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _record(name, err):
  """The worst error of a comparison, printed for the report (pytest -s); each test asserts its own bound."""
  print(f"{name}: {err:.3e}")


def _diffusers_kwargs(cfg: S.SchedulerConfig) -> dict:
  return dict(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
              beta_schedule=cfg.beta_schedule, timestep_spacing=cfg.timestep_spacing,
              steps_offset=cfg.steps_offset, prediction_type=cfg.prediction_type)


def make_ddim(cfg, n):
  d = DDIMScheduler(set_alpha_to_one=cfg.set_alpha_to_one, clip_sample=cfg.clip_sample,
                    clip_sample_range=cfg.clip_sample_range, **_diffusers_kwargs(cfg))
  d.set_timesteps(n)
  return d


def make_dpm(cfg, n):
  d = DPMSolverMultistepScheduler(solver_order=cfg.solver_order, lower_order_final=cfg.lower_order_final,
                                  final_sigmas_type=cfg.final_sigmas_type, **_diffusers_kwargs(cfg))
  d.set_timesteps(n)
  return d


def step_noises(n, seed=1):
  r = np.random.default_rng(seed)
  return [r.standard_normal(SHAPE).astype(np.float32) for _ in range(n)]


def test_defaults_are_animatediff():
  c = S.SchedulerConfig()
  assert (c.beta_start, c.beta_end, c.beta_schedule, c.steps_offset) == (0.00085, 0.012, "linear", 1)
  assert (c.clip_sample, c.set_alpha_to_one, c.timestep_spacing, c.prediction_type) == (
      False, True, "linspace", "epsilon")
  # A diffusers scheduler_config.json round-trips; unsupported options fail loudly.
  d = make_ddim(c, 25).config
  assert S.SchedulerConfig.from_dict(dict(d)) == c
  assert S.SchedulerConfig.from_dict(dict(make_dpm(c, 25).config)) == c
  with pytest.raises(ValueError):
    S.SchedulerConfig.from_dict({"use_exponential_sigmas": True})
  with pytest.raises(ValueError):
    S.SchedulerConfig(timestep_spacing="karras")


@pytest.mark.parametrize("beta_schedule", S.BETA_SCHEDULES)
def test_alphas_cumprod_add_noise_snr(beta_schedule):
  cfg = S.SchedulerConfig(beta_schedule=beta_schedule)
  d = make_ddim(cfg, 25)
  np.testing.assert_array_equal(S.alphas_cumprod(cfg), d.alphas_cumprod.numpy())  # bit for bit
  t = np.array([0, 1, 499, 998, 999], np.int64)
  x0 = _rng.standard_normal((5, 3, 4, 4, 2)).astype(np.float32)
  noise = _rng.standard_normal(x0.shape).astype(np.float32)
  want = d.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  got = jax.jit(lambda a, b, tt: S.add_noise(cfg, a, b, tt))(x0, noise, t)
  err = rel(got, want)
  _record("add_noise", err)
  assert err <= 1e-6, err
  want_v = d.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  err = rel(S.get_velocity(cfg, x0, noise, t), want_v)
  _record("get_velocity", err)
  assert err <= 1e-6, err
  all_t = np.arange(1000)
  want_snr = compute_snr(d, torch.from_numpy(all_t)).numpy()
  err = float(np.max(np.abs(np.asarray(S.snr(cfg, all_t)) / want_snr - 1)))
  _record("snr (max elementwise rel)", err)
  assert err <= 1e-6, err
  # A scalar t broadcasts too.
  np.testing.assert_allclose(S.add_noise(cfg, x0, noise, 7), S.add_noise(cfg, x0, noise, np.full(5, 7)))


@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps(spacing, steps_offset):
  cfg = S.SchedulerConfig(timestep_spacing=spacing, steps_offset=steps_offset)
  for n in (1, 4, 7, 10, 25, 30, 50, 999):
    np.testing.assert_array_equal(S.ddim_timesteps(cfg, n), make_ddim(cfg, n).timesteps.numpy())
    np.testing.assert_array_equal(S.dpm_timesteps(cfg, n), make_dpm(cfg, n).timesteps.numpy())


def run_ddim(cfg, n, eta):
  d = make_ddim(cfg, n)
  tables = S.ddim_tables(cfg, n)
  ts = S.ddim_timesteps(cfg, n)
  np.testing.assert_array_equal(ts, d.timesteps.numpy())
  ac = S.alphas_cumprod(cfg)
  noises = step_noises(n)
  xt, xj = torch.from_numpy(X_INIT.copy()), jnp.asarray(X_INIT)
  worst_x = worst_x0 = 0.0
  for i, t in enumerate(ts):
    vn = torch.from_numpy(noises[i]) if eta > 0 else None
    out = d.step(fake_torch(xt, t), int(t), xt, eta=eta, variance_noise=vn)
    xt = out.prev_sample
    xj, x0 = S.ddim_step(cfg, tables, fake_jax(xj, _c(t)), i, xj, eta=eta,
                         noise=noises[i] if eta > 0 else None)
    ex, ex0 = rel(xj, xt.numpy()), rel(x0, out.pred_original_sample.numpy())
    assert ex <= 1e-6, (i, t, ex)
    assert ex0 <= 1e-6 / np.sqrt(ac[t]), (i, t, ex0)
    worst_x, worst_x0 = max(worst_x, ex), max(worst_x0, ex0 * np.sqrt(ac[t]))
    _record(f"ddim eta={eta} x0 (raw)", ex0)
  _record(f"ddim eta={eta} sample", worst_x)
  _record(f"ddim eta={eta} x0*sqrt(alpha_bar)", worst_x0)


DDIM_GRID = list(itertools.product(S.BETA_SCHEDULES, S.TIMESTEP_SPACINGS, [0, 1], [True, False]))


@pytest.mark.parametrize("beta_schedule,spacing,steps_offset,set_alpha_to_one", DDIM_GRID)
def test_ddim_parity(beta_schedule, spacing, steps_offset, set_alpha_to_one):
  cfg = S.SchedulerConfig(beta_schedule=beta_schedule, timestep_spacing=spacing, steps_offset=steps_offset,
                          set_alpha_to_one=set_alpha_to_one)
  for eta in (0.0, 1.0):  # eta 1 draws the same per-step noise on both sides
    run_ddim(cfg, 25, eta)


@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
def test_ddim_clip_and_v_prediction(spacing):
  cfg = S.SchedulerConfig(timestep_spacing=spacing, clip_sample=True, clip_sample_range=1.5)
  run_ddim(cfg, 25, 0.0)
  run_ddim(cfg, 25, 1.0)
  run_ddim(S.SchedulerConfig(timestep_spacing=spacing, prediction_type="v_prediction"), 10, 0.0)
  run_ddim(S.SchedulerConfig(timestep_spacing=spacing), 50, 1.0)  # CustomCrafter's sampler


def run_dpm(cfg, n):
  d = make_dpm(cfg, n)
  tables = S.dpm_tables(cfg, n)
  ts = S.dpm_timesteps(cfg, n)
  np.testing.assert_array_equal(ts, d.timesteps.numpy())
  xt, xj = torch.from_numpy(X_INIT.copy()), jnp.asarray(X_INIT)
  state = S.dpm_init_state(xj)
  worst = 0.0
  for i, t in enumerate(ts):
    xt = d.step(fake_torch(xt, t), int(t), xt).prev_sample
    xj, state = S.dpm_step(cfg, tables, state, fake_jax(xj, _c(t)), i, xj)
    err = rel(xj, xt.numpy())
    assert err <= 1e-6, (i, t, err)
    worst = max(worst, err)
  _record("dpm++2m sample", worst)


@pytest.mark.parametrize("beta_schedule", S.BETA_SCHEDULES)
@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("num_steps", [10, 25])
def test_dpm_parity(beta_schedule, spacing, num_steps):
  run_dpm(S.SchedulerConfig(beta_schedule=beta_schedule, timestep_spacing=spacing), num_steps)


def test_dpm_variants():
  # sigma_min final (the last step is second order from 15 steps on), v-prediction, first order only.
  run_dpm(S.SchedulerConfig(final_sigmas_type="sigma_min"), 10)
  run_dpm(S.SchedulerConfig(final_sigmas_type="sigma_min"), 20)
  run_dpm(S.SchedulerConfig(prediction_type="v_prediction"), 10)
  run_dpm(S.SchedulerConfig(solver_order=1), 10)


@pytest.mark.parametrize("name,eta,num_steps", [("ddim", 0.0, 25), ("ddim", 1.0, 25), ("dpmsolver++", 0.0, 25),
                                                ("dpmsolver++", 0.0, 10)])
def test_jitted_loop_with_traced_step_index(name, eta, num_steps):
  """The generic interface inside one jax.jit + lax.fori_loop (step index traced) vs diffusers."""
  cfg = S.SchedulerConfig()
  sched = S.make_scheduler(name, cfg, num_steps, eta=eta)
  assert sched.init_noise_sigma == 1.0
  c_table = np.array([_c(t) for t in sched.timesteps], np.float32)
  key = jax.random.key(3)

  @jax.jit
  def sample(sched, x):
    def body(i, carry):
      x, state, hist = carry
      eps = fake_jax(x, jnp.asarray(c_table)[i])
      x, state = sched.step(state, eps, i, x, jax.random.fold_in(key, i))
      return x, state, hist.at[i].set(x)
    hist = jnp.zeros((num_steps,) + x.shape, x.dtype)
    return jax.lax.fori_loop(0, num_steps, body, (x, sched.init_state(x), hist))[2]

  hist = np.asarray(sample(sched, jnp.asarray(X_INIT)))
  d = make_ddim(cfg, num_steps) if name == "ddim" else make_dpm(cfg, num_steps)
  np.testing.assert_array_equal(sched.timesteps, d.timesteps.numpy())
  xt = torch.from_numpy(X_INIT.copy())
  worst = 0.0
  for i, t in enumerate(sched.timesteps):
    if name == "ddim":
      noise = np.array(jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32))
      xt = d.step(fake_torch(xt, t), int(t), xt, eta=eta,
                  variance_noise=torch.from_numpy(noise) if eta > 0 else None).prev_sample
    else:
      xt = d.step(fake_torch(xt, t), int(t), xt).prev_sample
    err = rel(hist[i], xt.numpy())
    assert err <= 1e-6, (i, t, err)
    worst = max(worst, err)
  _record(f"jit fori_loop {name} eta={eta} N={num_steps}", worst)


def test_step_errors():
  cfg = S.SchedulerConfig()
  tables = S.ddim_tables(cfg, 10)
  with pytest.raises(ValueError):
    S.ddim_step(cfg, tables, X_INIT, 0, X_INIT, eta=1.0)
  with pytest.raises(ValueError):
    S.make_scheduler("ddim", cfg, 10, eta=1.0).step((), X_INIT, 0, X_INIT)
  with pytest.raises(ValueError):
    S.make_scheduler("heun", cfg, 10)
  with pytest.raises(ValueError):
    S.ddim_timesteps(cfg, 0)


@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
def test_training_target_is_what_diffusers_training_scripts_regress(prediction_type):
  """diffusers' train scripts: target = noise (epsilon), scheduler.get_velocity (v), latents (sample)."""
  cfg = S.SchedulerConfig(beta_start=0.0001, beta_end=0.02, prediction_type=prediction_type)
  d = make_ddim(cfg, 25)
  t = np.array([0, 321, 999], np.int64)
  x0 = _rng.standard_normal((3, 2, 4, 4, 2)).astype(np.float32)
  noise = _rng.standard_normal(x0.shape).astype(np.float32)
  want = {"epsilon": noise, "sample": x0,
          "v_prediction": d.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise),
                                         torch.from_numpy(t)).numpy()}[prediction_type]
  err = rel(S.training_target(cfg, x0, noise, t), want)
  assert err <= 1e-6, err
