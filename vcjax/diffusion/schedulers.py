"""Noise schedules and samplers (DDIM, DPM-Solver++ 2M) as pure functions of arrays; Euler, Euler ancestral
(`sigma_schedulers`) and LCM (`lcm`) live next to this module and share its `Scheduler` interface.

Everything that depends on the step is precomputed once, on the host, into small per-step tables
(`DDIMTables`, `DPMTables`: NamedTuples of float32 arrays of length num_steps), so a step is a few
gathers at a (possibly traced) step index plus elementwise arithmetic. A whole denoising loop can run
inside one `jax.jit` / `jax.lax.fori_loop` / `jax.lax.scan`; no Python branch depends on a traced value.

Parity with diffusers (DDIMScheduler, DPMSolverMultistepScheduler) is the contract, quirks included:
  * alpha_bar matches diffusers' float32 table bit for bit (torch.linspace's two-sided formula, cumprod
    accumulated in float64); the per-step tables repeat diffusers' float32 operations in its order, each
    correctly rounded (torch's float32 sqrt/log/exp are sometimes an ulp off, so those can differ by an ulp);
  * DDIM's "previous" timestep is always t - num_train_timesteps // num_steps, whatever the spacing.
    With "linspace" spacing this is NOT the next timestep of the schedule (e.g. 25 steps: t=42 steps to
    alpha_bar[2], not alpha_bar[0]); we keep it, because that is what the AnimateDiff results used.
AnimateDiff defaults (see shared/docs/METHODS.md §1): linear betas 0.00085..0.012, steps_offset 1,
clip_sample False, set_alpha_to_one True, and "linspace" spacing as diffusers recommends for these
models (the original AnimateDiff code used "leading").

Steps compute in float32 and return the sample's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
SCHEDULERS = ("ddim", "dpmsolver++", "euler", "euler_a", "lcm")

_f32 = np.float32


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "linear"
  timestep_spacing: str = "linspace"
  steps_offset: int = 1  # only used by "leading" spacing
  set_alpha_to_one: bool = True  # DDIM: alpha_bar "before" the first training step is 1 (else alpha_bar[0])
  clip_sample: bool = False  # DDIM: clamp the predicted x0 to +-clip_sample_range
  clip_sample_range: float = 1.0
  prediction_type: str = "epsilon"
  # DPM-Solver++ (multistep) only.
  solver_order: int = 2
  lower_order_final: bool = True
  final_sigmas_type: str = "zero"
  algorithm_type: str = "dpmsolver++"
  # DPM-Solver++ and Euler: Karras et al.'s sigmas (rho 7) between the schedule's extreme sigmas.
  use_karras_sigmas: bool = False
  # LCM only (diffusers' LCMScheduler defaults).
  original_inference_steps: int = 50
  timestep_scaling: float = 10.0

  def __post_init__(self):
    for name, allowed in (("beta_schedule", BETA_SCHEDULES), ("timestep_spacing", TIMESTEP_SPACINGS),
                          ("prediction_type", PREDICTION_TYPES), ("final_sigmas_type", FINAL_SIGMAS_TYPES),
                          ("algorithm_type", ("dpmsolver++",))):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name}={getattr(self, name)!r} is not supported; expected one of {allowed}")
    if self.solver_order not in (1, 2):
      raise ValueError(f"solver_order={self.solver_order}: only 1 and 2 are implemented")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  # diffusers scheduler options we do not implement: reading a config that turns one on must fail loudly
  # rather than sample with a silently different schedule. Value = the only accepted setting.
  _UNSUPPORTED = {"trained_betas": None, "rescale_betas_zero_snr": False, "thresholding": False,
                  "use_exponential_sigmas": False, "use_beta_sigmas": False,
                  "use_lu_lambdas": False, "use_flow_sigmas": False, "euler_at_final": False,
                  "solver_type": "midpoint", "variance_type": None, "use_dynamic_shifting": False,
                  "interpolation_type": "linear", "timestep_type": "discrete", "sigma_min": None,
                  "sigma_max": None}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "SchedulerConfig":
    """Builds from our own dict or a diffusers scheduler_config.json dict (unknown keys are ignored)."""
    for key, ok in cls._UNSUPPORTED.items():
      if key in d and d[key] != ok and not (key == "solver_type" and d[key] in ("logrho", "bh1", "bh2")):
        raise ValueError(f"scheduler option {key}={d[key]!r} is not supported (only {ok!r})")
    lmc = d.get("lambda_min_clipped", -math.inf)
    if lmc is not None and lmc != -math.inf:
      raise ValueError(f"lambda_min_clipped={lmc!r} is not supported")
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in fields}
    if kw.get("algorithm_type") == "deis":  # diffusers maps it the same way
      kw["algorithm_type"] = "dpmsolver++"
    return cls(**kw)


# --------------------------------------------------------------------------------------------------
# Training-time schedule: alpha_bar, forward noising, SNR.


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
  """torch.linspace(start, end, n, dtype=float32) bit for bit: float32 step, the first half counted up
  from start and the second half down from end, each point a fused multiply-add (one rounding)."""
  s, e = _f32(start), _f32(end)
  step = _f32((e - s) / _f32(n - 1)) if n > 1 else _f32(0)
  i = np.arange(n, dtype=np.float64)
  lo = (np.float64(s) + np.float64(step) * i).astype(_f32)
  hi = (np.float64(e) - np.float64(step) * (n - 1 - i)).astype(_f32)
  return np.where(np.arange(n) < n // 2, lo, hi)


@functools.lru_cache(maxsize=32)
def _alphas_cumprod_cached(config: SchedulerConfig) -> np.ndarray:
  n = config.num_train_timesteps
  if config.beta_schedule == "linear":
    betas = _torch_linspace_f32(config.beta_start, config.beta_end, n)
  else:  # scaled_linear: linear in sqrt(beta)
    betas = np.square(_torch_linspace_f32(config.beta_start ** 0.5, config.beta_end ** 0.5, n))
  alphas = _f32(1) - betas
  out = np.cumprod(alphas.astype(np.float64)).astype(_f32)  # torch accumulates float cumprod in double
  out.setflags(write=False)
  return out


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
  """alpha_bar_t = prod_{s<=t} (1 - beta_s), `(num_train_timesteps,)` float32 (read-only numpy)."""
  return _alphas_cumprod_cached(config)


@functools.lru_cache(maxsize=32)
def _noise_tables(config: SchedulerConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  ac = alphas_cumprod(config)
  sqrt_ac = np.sqrt(ac)
  sqrt_1m = np.sqrt(_f32(1) - ac)
  snr_t = np.square(sqrt_ac / sqrt_1m)  # diffusers.training_utils.compute_snr's order of operations
  for a in (sqrt_ac, sqrt_1m, snr_t):
    a.setflags(write=False)
  return sqrt_ac, sqrt_1m, snr_t


def _gather_bcast(table: np.ndarray, t, ndim: int, dtype) -> jax.Array:
  """table[t] shaped to broadcast against an array of rank `ndim`: t `(B,)` -> `(B, 1, ..., 1)`."""
  c = jnp.asarray(table)[jnp.asarray(t)]
  return c.reshape(c.shape + (1,) * (ndim - c.ndim)).astype(dtype)


def add_noise(config: SchedulerConfig, x0, noise, t):
  """Forward diffusion q(x_t | x0): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.

  x0, noise: same shape `(B, ...)`; t: int `(B,)` (or a scalar), one timestep per batch element.
  The coefficients are float32 (then cast to x0's dtype; diffusers casts alpha_bar first).
  """
  sqrt_ac, sqrt_1m, _ = _noise_tables(config)
  x0 = jnp.asarray(x0)
  return (_gather_bcast(sqrt_ac, t, x0.ndim, x0.dtype) * x0
          + _gather_bcast(sqrt_1m, t, x0.ndim, x0.dtype) * noise)


def get_velocity(config: SchedulerConfig, x0, noise, t):
  """v-prediction target: sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0. Shapes as add_noise."""
  sqrt_ac, sqrt_1m, _ = _noise_tables(config)
  x0 = jnp.asarray(x0)
  return (_gather_bcast(sqrt_ac, t, x0.ndim, x0.dtype) * noise
          - _gather_bcast(sqrt_1m, t, x0.ndim, x0.dtype) * x0)


def training_target(config: SchedulerConfig, x0, noise, t):
  """What the model learns to output at timestep t, per config.prediction_type (diffusers' training scripts):
  epsilon -> noise; v_prediction -> get_velocity; sample -> x0. Shapes as add_noise."""
  if config.prediction_type == "epsilon":
    return noise
  if config.prediction_type == "v_prediction":
    return get_velocity(config, x0, noise, t)
  return jnp.asarray(x0)


def snr(config: SchedulerConfig, t) -> jax.Array:
  """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), float32, shape of t (for Min-SNR weights)."""
  return jnp.asarray(_noise_tables(config)[2])[jnp.asarray(t)]


def _check_num_steps(config: SchedulerConfig, num_steps: int):
  if not 1 <= num_steps <= config.num_train_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in [1, {config.num_train_timesteps}]")


# --------------------------------------------------------------------------------------------------
# DDIM.


def ddim_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
  """The `(num_steps,)` int64 timesteps, descending, of DDIMScheduler.set_timesteps."""
  _check_num_steps(config, num_steps)
  n_train = config.num_train_timesteps
  if config.timestep_spacing == "linspace":
    ts = np.linspace(0, n_train - 1, num_steps).round()[::-1].astype(np.int64)
  elif config.timestep_spacing == "leading":
    ts = (np.arange(num_steps) * (n_train // num_steps))[::-1].astype(np.int64) + config.steps_offset
  else:  # trailing
    ts = np.round(np.arange(n_train, 0, -n_train / num_steps)).astype(np.int64) - 1
  return ts.copy()


class DDIMTables(NamedTuple):
  """Per-step float32 scalars, each `(num_steps,)`."""
  sqrt_alpha: jax.Array  # sqrt(alpha_bar_t)
  sqrt_beta: jax.Array  # sqrt(1 - alpha_bar_t)
  alpha_prev: jax.Array  # alpha_bar of the previous (less noisy) timestep
  sqrt_alpha_prev: jax.Array
  variance: jax.Array  # sigma_t^2 of DDIM at eta = 1


def ddim_tables(config: SchedulerConfig, num_steps: int) -> DDIMTables:
  # Same float32 operations as diffusers, in the same order (x0 = (x - sqrt(beta) eps) / sqrt(alpha) is
  # ill-conditioned when the two terms nearly cancel, so an ulp in a coefficient shows in x0).
  ac = alphas_cumprod(config)
  ts = ddim_timesteps(config, num_steps)
  prev = ts - config.num_train_timesteps // num_steps
  final = _f32(1) if config.set_alpha_to_one else ac[0]
  a_t = ac[ts]
  a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(_f32)
  b_t = _f32(1) - a_t
  variance = ((_f32(1) - a_prev) / b_t) * (_f32(1) - a_t / a_prev)
  return DDIMTables(*(jnp.asarray(a, jnp.float32) for a in
                      (np.sqrt(a_t), np.sqrt(b_t), a_prev, np.sqrt(a_prev), variance)))


def _pred_x0_eps(config: SchedulerConfig, out, x, sqrt_a, sqrt_b):
  """(x0, eps) predicted from the model output, in diffusers' order of operations."""
  if config.prediction_type == "epsilon":
    return (x - sqrt_b * out) / sqrt_a, out
  if config.prediction_type == "v_prediction":
    return sqrt_a * x - sqrt_b * out, sqrt_a * out + sqrt_b * x
  return out, (x - sqrt_a * out) / sqrt_b  # "sample"


def ddim_step(config: SchedulerConfig, tables: DDIMTables, eps, step_index, x, *, eta=0.0, noise=None):
  """One DDIM update x_t -> x_{t_prev}, step_index (int, may be traced) into the timestep schedule.

  eps: the model output (epsilon, v or x0 per config.prediction_type), shape of x.
  eta: 0 = deterministic DDIM, 1 = DDPM-like. std_dev = eta * sqrt(variance[step_index]); the term
  std_dev * noise is added when noise (standard normal, shape of x) is given, which is required when
  eta is not the Python number 0.
  Returns (x_prev, pred_original_sample), both in x's dtype.
  """
  dtype = jnp.asarray(x).dtype
  x, eps = jnp.asarray(x, jnp.float32), jnp.asarray(eps, jnp.float32)
  sqrt_a, sqrt_b = tables.sqrt_alpha[step_index], tables.sqrt_beta[step_index]
  x0, pred_eps = _pred_x0_eps(config, eps, x, sqrt_a, sqrt_b)
  if config.clip_sample:
    x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
  std = eta * jnp.sqrt(tables.variance[step_index])
  direction = jnp.sqrt(1.0 - tables.alpha_prev[step_index] - std * std) * pred_eps
  x_prev = tables.sqrt_alpha_prev[step_index] * x0 + direction
  if noise is not None:
    x_prev = x_prev + std * jnp.asarray(noise, jnp.float32)
  elif not (isinstance(eta, (int, float)) and eta == 0):
    raise ValueError("ddim_step: eta != 0 needs `noise` (standard normal, shape of x)")
  return x_prev.astype(dtype), x0.astype(dtype)


# --------------------------------------------------------------------------------------------------
# DPM-Solver++ (multistep, data prediction, midpoint second-order update).


def dpm_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
  """The `(num_steps,)` int64 timesteps of DPMSolverMultistepScheduler.set_timesteps."""
  return _dpm_schedule(config, num_steps)[0]


def _spaced_dpm_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
  _check_num_steps(config, num_steps)
  n_train = config.num_train_timesteps  # == diffusers' last_timestep when lambda_min_clipped = -inf
  if config.timestep_spacing == "linspace":
    ts = np.linspace(0, n_train - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
  elif config.timestep_spacing == "leading":
    ratio = n_train // (num_steps + 1)
    ts = (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
  else:  # trailing
    ts = np.arange(n_train, 0, -n_train / num_steps).round().astype(np.int64) - 1
  return ts.copy()


def train_sigmas(config: SchedulerConfig) -> np.ndarray:
  """sigma_t = ((1 - alpha_bar_t) / alpha_bar_t) ** 0.5 of the VE view, `(num_train_timesteps,)` float32."""
  ac = alphas_cumprod(config)
  return np.sqrt((_f32(1) - ac) / ac)


def final_sigma(config: SchedulerConfig) -> np.float32:
  """The sigma after the last step: 0, or ("sigma_min") the sigma of training timestep 0."""
  return _f32(0) if config.final_sigmas_type == "zero" else train_sigmas(config)[0]


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
  """Karras et al. (2022) sigmas, rho = 7, float64 `(num_steps,)` descending (diffusers' _convert_to_karras)."""
  rho = 7.0
  ramp = np.linspace(0, 1, num_steps)
  min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """Fractional timesteps of sigmas by linear interpolation in log sigma (diffusers' _sigma_to_t, vectorized;
  elementwise the same numpy operations). log_sigmas: np.log of the float32 `train_sigmas`."""
  sigma = np.asarray(sigma, np.float64)
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, np.newaxis]
  low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  high_idx = low_idx + 1
  low, high = log_sigmas[low_idx], log_sigmas[high_idx]
  w = np.clip((low - log_sigma) / (low - high), 0, 1)
  return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _dpm_schedule(config: SchedulerConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """-> (timesteps int64 `(N,)`, sigmas float32 `(N + 1,)` ending with the final sigma)."""
  train = train_sigmas(config)
  if config.use_karras_sigmas:  # rounded timesteps of the Karras sigmas (which may repeat at few steps)
    _check_num_steps(config, num_steps)
    sig = karras_sigmas(train[0].item(), train[-1].item(), num_steps)
    ts = sigma_to_t(sig, np.log(train)).round().astype(np.int64)
  else:
    ts = _spaced_dpm_timesteps(config, num_steps)
    sig = np.interp(ts, np.arange(len(train)), train)  # train[ts], clamped at the end as diffusers
  return ts, np.concatenate([sig, [final_sigma(config)]]).astype(_f32)


class DPMTables(NamedTuple):
  """Per-step float32 scalars, each `(num_steps,)`, of x_prev = ratio x - b D0 - (b / 2) D1,
  D0 = x0_i, D1 = inv_r0 (x0_i - x0_{i-1})."""
  alpha: jax.Array  # alpha_s of the current sigma (x0 = (x - sigma eps) / alpha)
  sigma: jax.Array  # sigma_s of the current sigma
  ratio: jax.Array  # sigma_t / sigma_s
  b: jax.Array  # alpha_t (exp(-h) - 1), h = lambda_t - lambda_s
  inv_r0: jax.Array  # h / h_0 (0 where no second-order step is possible)
  force_first: jax.Array  # bool: a first-order step whatever the history (the final step)


def _log32(x: np.ndarray) -> np.ndarray:
  """float32 log, correctly rounded (numpy's own float32 log may be an ulp off)."""
  with np.errstate(divide="ignore"):
    return np.log(np.asarray(x, np.float64)).astype(_f32)


def _exp32(x: np.ndarray) -> np.ndarray:
  return np.exp(np.asarray(x, np.float64)).astype(_f32)


def dpm_tables(config: SchedulerConfig, num_steps: int) -> DPMTables:
  # diffusers' float32 operations in diffusers' order, each correctly rounded (torch's float32
  # sqrt/log/exp are sometimes an ulp off; that, not the formulas, is the remaining ~1e-7 difference).
  sig = _dpm_schedule(config, num_steps)[1]
  alpha = _f32(1) / np.sqrt(sig * sig + _f32(1))  # -> (alpha_t, sigma_t) of the VP process
  sigma = sig * alpha
  lam = _log32(alpha) - _log32(sigma)  # half log-SNR; +inf at sigma 0
  s, t = slice(0, num_steps), slice(1, num_steps + 1)
  with np.errstate(divide="ignore", invalid="ignore"):
    h = lam[t] - lam[s]
    b = alpha[t] * (_exp32(-h) - _f32(1))
    h0 = np.concatenate([[np.nan], lam[1:num_steps] - lam[:num_steps - 1]]).astype(_f32)
    inv_r0 = _f32(1) / (h0 / h)  # 1 / r0, r0 = h_0 / h
    ratio = sigma[t] / sigma[s]
  inv_r0 = np.where(np.isfinite(inv_r0), inv_r0, _f32(0))  # no second-order step there (first, last)
  last = np.arange(num_steps) == num_steps - 1
  force_first = last & ((config.lower_order_final and num_steps < 15) or config.final_sigmas_type == "zero")
  if config.solver_order == 1:
    force_first = np.ones(num_steps, bool)
  return DPMTables(*(jnp.asarray(a, jnp.float32) for a in (alpha[s], sigma[s], ratio, b, inv_r0)),
                   jnp.asarray(force_first))


class DPMState(NamedTuple):
  prev_x0: jax.Array  # the previous step's data prediction, shape of x (float32)
  num_prev: jax.Array  # int32 scalar: model outputs seen so far (capped at 1): diffusers' lower_order_nums


def dpm_init_state(x) -> DPMState:
  return DPMState(jnp.zeros(jnp.shape(x), jnp.float32), jnp.zeros((), jnp.int32))


def dpm_step(config: SchedulerConfig, tables: DPMTables, state: DPMState, model_output, step_index, x):
  """One DPM-Solver++ 2M update; step_index (int, may be traced). Returns (x_prev, new_state).

  The first step of a run (state.num_prev == 0) and, per diffusers, the final step are first order;
  with final_sigmas_type "zero" the final step returns the data prediction x0 itself.
  """
  dtype = jnp.asarray(x).dtype
  x, out = jnp.asarray(x, jnp.float32), jnp.asarray(model_output, jnp.float32)
  alpha, sigma = tables.alpha[step_index], tables.sigma[step_index]
  x0, _ = _pred_x0_eps(config, out, x, alpha, sigma)  # diffusers' convert_model_output
  ratio, b = tables.ratio[step_index], tables.b[step_index]
  first = ratio * x - b * x0
  d1 = tables.inv_r0[step_index] * (x0 - state.prev_x0)
  second = first - (0.5 * b) * d1
  use_first = tables.force_first[step_index] | (state.num_prev < 1)
  x_prev = jnp.where(use_first, first, second)
  new_state = DPMState(x0, jnp.minimum(state.num_prev + 1, 1).astype(jnp.int32))
  return x_prev.astype(dtype), new_state


# --------------------------------------------------------------------------------------------------
# Generic interface for samplers.


@functools.partial(jax.tree_util.register_dataclass, data_fields=["timesteps", "tables"],
                   meta_fields=["name", "config", "eta", "init_noise_sigma"])
@dataclasses.dataclass(frozen=True)
class Scheduler:
  """A scheduler bound to a number of steps. A pytree (tables are leaves; name/config/eta static), so it
  can be closed over or passed to a jitted function.

  Loop: x = noise * init_noise_sigma; state = s.init_state(x); for i: eps = model(s.scale_input(x, i),
  s.timestep(i)); x, state = s.step(state, eps, i, x, key_i). Split the key per step yourself (e.g.
  fold_in(key, i)). Stochastic steps (DDIM eta > 0, Euler ancestral, LCM: `needs_noise`) take `noise`.
  """
  name: str  # "ddim" | "dpmsolver++" | "euler" | "euler_a" | "lcm"
  config: SchedulerConfig
  eta: float
  timesteps: Any  # (num_steps,) numpy outside jit: int64, or float32 for Euler (fractional timesteps)
  tables: Any  # DDIMTables | DPMTables | EulerTables | LCMTables
  init_noise_sigma: float = 1.0

  @property
  def num_steps(self) -> int:
    return int(np.shape(self.timesteps)[0])

  def timestep(self, i) -> jax.Array:
    """timesteps[i] as an int32 (float32 for Euler's fractional timesteps) array; i may be traced."""
    floating = jnp.issubdtype(jnp.asarray(self.timesteps).dtype, jnp.floating)
    return jnp.asarray(self.timesteps, jnp.float32 if floating else jnp.int32)[i]

  def init_state(self, x=None):
    """The loop state. Pass the initial latents when the loop is a lax loop (fixed carry shapes)."""
    if self.name != "dpmsolver++":
      return ()
    return dpm_init_state(jnp.zeros(()) if x is None else x)  # scalar: fine for Python loops

  @property
  def needs_noise(self) -> bool:
    return (self.name == "ddim" and self.eta != 0) or self.name in ("euler_a", "lcm")

  def scale_input(self, x, i):
    """The model input at step i (diffusers' scale_model_input): x / sqrt(sigma^2 + 1) for Euler, else x."""
    if self.name in ("euler", "euler_a"):
      from vcjax.diffusion.sigma_schedulers import euler_scale_input
      return euler_scale_input(self.tables, x, i)
    return x

  def step(self, state, eps, i, x, key=None, *, noise=None):
    """(x, state) -> (x_prev, new_state). Stochastic steps need either `noise` (standard normal, shape of
    x; e.g. drawn per video so a seed's video does not depend on its batch) or a PRNG `key`."""
    if self.needs_noise and noise is None:
      if key is None:
        raise ValueError(f"{self.name} (stochastic) needs `noise` or a PRNG key per step")
      noise = jax.random.normal(key, jnp.shape(x), jnp.float32)
    if self.name == "ddim":
      x_prev, _ = ddim_step(self.config, self.tables, eps, i, x, eta=self.eta, noise=noise)
      return x_prev, state
    if self.name == "dpmsolver++":
      return dpm_step(self.config, self.tables, state, eps, i, x)
    if self.name == "lcm":
      from vcjax.diffusion.lcm import lcm_step
      return lcm_step(self.config, self.tables, eps, i, x, noise)[0], state
    from vcjax.diffusion.sigma_schedulers import euler_step
    return euler_step(self.config, self.tables, eps, i, x, noise=noise)[0], state


_ALIASES = {"ddim": "ddim", "dpm": "dpmsolver++", "dpm++": "dpmsolver++", "dpmsolver++": "dpmsolver++",
            "dpmsolver++2m": "dpmsolver++", "dpmsolvermultistep": "dpmsolver++", "euler": "euler",
            "eulerdiscrete": "euler", "eulera": "euler_a", "eulerancestral": "euler_a",
            "eulerancestraldiscrete": "euler_a", "lcm": "lcm"}


def make_scheduler(name: str, config: SchedulerConfig | None = None, num_steps: int = 25, *,
                   eta: float = 0.0) -> Scheduler:
  """name: "ddim", "dpmsolver++" (aliases "dpm", "dpm++", "dpmsolver++2m"; Karras sigmas with
  config.use_karras_sigmas), "euler" (also Karras sigmas), "euler_a" ("euler_ancestral") or "lcm".
  eta: DDIM only."""
  config = config or SchedulerConfig()
  key = _ALIASES.get(name.lower().replace("_", "").replace("-", ""))
  if key is None:
    raise ValueError(f"unknown scheduler {name!r}; expected one of {SCHEDULERS}")
  if eta and key != "ddim":
    raise ValueError("eta is a DDIM option")
  if config.use_karras_sigmas and key not in ("dpmsolver++", "euler"):
    raise ValueError(f"use_karras_sigmas is not an option of {key} (diffusers has none)")
  if key == "ddim":
    return Scheduler("ddim", config, float(eta), ddim_timesteps(config, num_steps),
                     ddim_tables(config, num_steps))
  if key == "dpmsolver++":
    ts, _ = _dpm_schedule(config, num_steps)
    return Scheduler("dpmsolver++", config, 0.0, ts, dpm_tables(config, num_steps))
  if key == "lcm":
    from vcjax.diffusion.lcm import lcm_tables, lcm_timesteps
    return Scheduler("lcm", config, 0.0, lcm_timesteps(config, num_steps), lcm_tables(config, num_steps))
  from vcjax.diffusion.sigma_schedulers import euler_schedule, euler_tables
  ancestral = key == "euler_a"
  ts, sigmas, init_sigma = euler_schedule(config, num_steps, ancestral=ancestral)
  return Scheduler(key, config, 0.0, ts, euler_tables(config, sigmas, ancestral=ancestral),
                   init_noise_sigma=init_sigma)
