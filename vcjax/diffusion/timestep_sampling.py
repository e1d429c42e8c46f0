"""Which training timesteps a diffusion objective sees: uniform, or biased toward a part of the schedule.

The bias follows diffusers' SDXL fine-tuning flags (`--timestep_bias_strategy`, `_multiplier`, `_portion`,
`_begin`, `_end`): every timestep starts with weight 1, the biased ones are multiplied by `multiplier`, and
timesteps are drawn in proportion to the weights. "later" biases the last `portion` of the schedule (the
high-noise steps, where layout and motion are decided), "earlier" the first `portion` (fine detail),
"range" the timesteps begin <= t < end. A multiplier below 1 biases *against* those steps; 0 removes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("none", "later", "earlier", "range")


def timestep_weights(num_timesteps: int, strategy: str = "none", *, multiplier: float = 1.0,
                     portion: float = 0.25, begin: int = 0, end: int = 1000) -> np.ndarray:
  """Sampling probabilities `(num_timesteps,)` float64 summing to 1 (uniform for "none")."""
  if strategy not in STRATEGIES:
    raise ValueError(f"timestep_bias_strategy must be one of {STRATEGIES}, got {strategy!r}")
  weights = np.ones(num_timesteps)
  if strategy != "none":
    if multiplier < 0:
      raise ValueError(f"timestep_bias_multiplier must be >= 0, got {multiplier}")
    if strategy == "range":
      if not 0 <= begin < end <= num_timesteps:
        raise ValueError(f"timestep bias range: need 0 <= begin < end <= {num_timesteps}, got [{begin}, {end})")
      biased = slice(begin, end)
    else:
      if not 0 < portion <= 1:
        raise ValueError(f"timestep_bias_portion must be in (0, 1], got {portion}")
      count = int(portion * num_timesteps)
      if count == 0:
        raise ValueError(f"timestep_bias_portion {portion} selects no timestep of {num_timesteps}")
      biased = slice(num_timesteps - count, None) if strategy == "later" else slice(0, count)
    weights[biased] *= multiplier
    if weights.sum() == 0:
      raise ValueError("the timestep bias leaves no timestep to sample (multiplier 0 over the whole schedule)")
  return weights / weights.sum()


def sample_timesteps(key, batch: int, num_timesteps: int, weights: np.ndarray | None = None) -> jax.Array:
  """`(batch,)` int32 timesteps in [0, num_timesteps). weights None: uniform (jax.random.randint, so runs
  made before the bias existed replay bit for bit); else drawn in proportion to `weights (num_timesteps,)`
  (zero-weight timesteps never)."""
  if weights is None:
    return jax.random.randint(key, (batch,), 0, num_timesteps)
  if len(weights) != num_timesteps:
    raise ValueError(f"sample_timesteps: {len(weights)} weights for {num_timesteps} timesteps")
  with np.errstate(divide="ignore"):
    logits = np.log(np.asarray(weights, np.float64)).astype(np.float32)
  return jax.random.categorical(key, jnp.asarray(logits), shape=(batch,)).astype(jnp.int32)
