"""Training timesteps: uniform, or biased as diffusers' SDXL trainer's --timestep_bias_* flags do; every
diffusion objective (t2v, girl, subject) draws through the same config keys."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs.train_common import default_config
from vcjax.diffusion.timestep_sampling import sample_timesteps, timestep_weights
from vcjax.train.task import task_class


def test_weights_follow_the_bias_rule():
  w = timestep_weights(1000, "later", multiplier=2.0, portion=0.25)
  np.testing.assert_allclose(w[:750], 1 / 1250)
  np.testing.assert_allclose(w[750:], 2 / 1250)
  w = timestep_weights(1000, "earlier", multiplier=3.0, portion=0.1)
  np.testing.assert_allclose(w[:100], 3 / 1200)
  np.testing.assert_allclose(w[100:], 1 / 1200)
  w = timestep_weights(1000, "range", multiplier=0.0, begin=200, end=300)
  assert (w[200:300] == 0).all() and np.allclose(w[:200], 1 / 900) and np.allclose(w[300:], 1 / 900)
  np.testing.assert_allclose(timestep_weights(10, "none"), 0.1)
  assert timestep_weights(1000, "later", multiplier=5.0, portion=0.5).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="latest"), "one of"), (dict(strategy="later", multiplier=-1.0), "multiplier"),
    (dict(strategy="later", portion=0.0), "portion"), (dict(strategy="later", portion=0.0004), "no timestep"),
    (dict(strategy="range", begin=500, end=500), "begin < end"),
    (dict(strategy="range", begin=0, end=1001), "begin < end"),
    (dict(strategy="range", multiplier=0.0, begin=0, end=1000), "no timestep")])
def test_bad_bias_is_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    timestep_weights(1000, kwargs.pop("strategy"), **kwargs)


def test_uniform_draws_are_the_old_randint_and_biased_draws_follow_the_weights():
  key = jax.random.key(3)
  np.testing.assert_array_equal(sample_timesteps(key, 64, 1000), jax.random.randint(key, (64,), 0, 1000))
  w = timestep_weights(1000, "later", multiplier=3.0, portion=0.4)
  t = np.asarray(sample_timesteps(key, 40_000, 1000, w))
  assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
  assert (t >= 600).mean() == pytest.approx(2 / 3, abs=0.01)  # 400 x 3 / (600 + 1200)
  hist = np.bincount(t // 100, minlength=10) / len(t)  # every tenth of the schedule vs its probability
  np.testing.assert_allclose(hist, w.reshape(10, 100).sum(1), atol=0.008)
  w = timestep_weights(1000, "range", multiplier=0.0, begin=0, end=900)
  t = np.asarray(sample_timesteps(key, 5000, 1000, w))
  assert t.min() >= 900 and len(np.unique(t)) > 90


@pytest.mark.parametrize("task_name", ["t2v", "girl", "subject"])
def test_every_objective_draws_its_timesteps_through_the_bias(converted, task_name):
  """The loss of each diffusion task hands its objective timesteps from the configured bias (here: only
  [990, 1000) can be drawn), and a bad bias fails when the config is read."""
  cfg = default_config(task_name)
  cfg.model, cfg.data.kind, cfg.resolution, cfg.num_frames = converted, "synthetic", 32, 3
  cfg.timestep_bias_strategy, cfg.timestep_bias_multiplier = "range", 0.0
  cfg.timestep_bias_begin, cfg.timestep_bias_end = 0, 990
  task = task_class(task_name).from_config(cfg)
  built = task.build(cfg, rngs=nnx.Rngs(0))
  batch = next(iter(task.data(cfg, built.tokenizer, batch_size=2, seed=0)))
  task.objective = lambda *args: (args[-1], {})  # the timesteps the loss drew
  drawn = np.concatenate([np.asarray(task.loss(built.model, batch, jax.random.key(i))[0]) for i in range(8)])
  assert len(drawn) == 16 and drawn.min() >= 990 and drawn.max() <= 999
  cfg.timestep_bias_strategy = "late"
  with pytest.raises(ValueError, match="timestep_bias_strategy"):
    task_class(task_name).from_config(cfg)
