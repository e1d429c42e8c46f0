"""vcjax.diffusion.losses against straightforward numpy (float64) implementations."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.reference import rel_err
from vcjax.diffusion import losses
from vcjax.diffusion.schedulers import SchedulerConfig, snr


def _data(seed=0, shape=(3, 4, 6, 6, 4)):
  rng = np.random.default_rng(seed)
  return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def test_eps_mse_and_min_snr():
  pred, target = _data()
  got = np.asarray(losses.eps_mse(pred, target))
  want = ((pred.astype(np.float64) - target) ** 2).reshape(3, -1).mean(1)
  assert rel_err(got, want) < 1e-6
  s = np.array([0.01, 5.0, 120.0], np.float32)
  w = np.asarray(losses.min_snr_weight(s, 5.0))
  np.testing.assert_allclose(w, np.minimum(s, 5.0) / s, rtol=1e-6)
  assert w[0] == 1.0 and w[1] == 1.0 and abs(w[2] - 5 / 120) < 1e-7
  wv = np.asarray(losses.min_snr_weight(s, 5.0, "v_prediction"))
  np.testing.assert_allclose(wv, np.minimum(s, 5.0) / (s + 1), rtol=1e-6)
  with pytest.raises(ValueError):
    losses.min_snr_weight(s, 5.0, "sample")


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_masked_error(kind):
  pred, target = _data(1)
  rng = np.random.default_rng(2)
  mask = (rng.random((3, 4, 6, 6, 1)) > 0.4).astype(np.float32)
  got = np.asarray(losses.masked_error(pred, target, mask, kind=kind))
  d = pred.astype(np.float64) - target
  err = d ** 2 if kind == "l2" else np.abs(d)
  m = np.broadcast_to(mask, err.shape)
  want = (err * m).reshape(3, -1).sum(1) / m.reshape(3, -1).sum(1)
  assert rel_err(got, want) < 1e-6
  # An all-ones mask is the plain mean; the masked-out region does not matter at all.
  ones = np.asarray(losses.masked_error(pred, target, np.ones_like(mask), kind=kind))
  assert rel_err(ones, err.reshape(3, -1).mean(1)) < 1e-6
  garbage = np.where(mask > 0, pred, 1e6).astype(np.float32)
  np.testing.assert_allclose(np.asarray(losses.masked_error(garbage, target, mask, kind=kind)), got, rtol=1e-6)
  with pytest.raises(ValueError):
    losses.masked_error(pred, target, mask, kind="huber")


def test_prior_preservation():
  per = np.array([1.0, 2.0, 3.0, 10.0], np.float32)
  is_prior = np.array([0, 0, 1, 1])
  total, inst, prior = (float(x) for x in losses.prior_preservation_loss(per, is_prior, 0.5))
  assert inst == pytest.approx(1.5) and prior == pytest.approx(6.5) and total == pytest.approx(1.5 + 3.25)
  # No class images in the batch: the prior part is 0, not NaN.
  total, inst, prior = (float(x) for x in losses.prior_preservation_loss(per, np.zeros(4), 1.0))
  assert prior == 0.0 and total == pytest.approx(per.mean())


def test_girl_loss_and_remind_timesteps():
  cfg = SchedulerConfig()
  t = np.arange(1000)
  assert np.array_equal(np.asarray(losses.remind_timesteps(t)), np.array([int(0.01 * x) for x in t]))
  ev, nv = _data(3, (2, 4, 4, 4, 4))
  er, nr = _data(4, (2, 1, 4, 4, 4))
  ts = np.array([3, 800])
  s = np.asarray(snr(cfg, ts), np.float64)
  total, lv, lr = (float(x) for x in losses.girl_loss(ev, nv, er, nr, snr(cfg, ts), gamma=5.0, ref_weight=0.1))
  per = ((ev.astype(np.float64) - nv) ** 2).reshape(2, -1).mean(1)
  want_v = (per * np.minimum(s, 5.0) / s).mean()
  want_r = ((er.astype(np.float64) - nr) ** 2).mean()
  assert lv == pytest.approx(want_v, rel=1e-6) and lr == pytest.approx(want_r, rel=1e-6)
  assert total == pytest.approx(want_v + 0.1 * want_r, rel=1e-6)
  _, lv_plain, _ = losses.girl_loss(ev, nv, er, nr, snr(cfg, ts), gamma=None)
  assert float(lv_plain) == pytest.approx(per.mean(), rel=1e-6)


def test_bf16_inputs_reduce_in_float32():
  pred, target = _data(5)
  got = losses.eps_mse(jnp.asarray(pred, jnp.bfloat16), jnp.asarray(target, jnp.bfloat16))
  assert got.dtype == jnp.float32
