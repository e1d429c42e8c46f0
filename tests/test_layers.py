"""vcjax.nn.layers.Conv: both of its paths (XLA convolution, and the matmul over stacked taps for small
outputs) against torch.nn.functional.conv2d, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.reference import rel_err
from vcjax.nn import layers
from vcjax.nn.layers import Conv

CASES = {  # name: (N, H, W, Cin, Cout, kernel, stride, padding)
    "3x3 on 2x2 (matmul path)": (3, 2, 2, 16, 24, 3, 1, 1),
    "3x3 on 4x4 (matmul path)": (2, 4, 4, 16, 8, 3, 1, 1),
    "3x3 on 5x5 (convolution path)": (2, 5, 5, 16, 8, 3, 1, 1),
    "3x3 stride 2 on 4x4 -> 2x2 (matmul path)": (2, 4, 4, 16, 8, 3, 2, 1),
    "VAE downsample: stride 2, pad (0,1) -> 2x2": (2, 5, 5, 8, 8, 3, 2, ((0, 1), (0, 1))),
    "1x1 on 3x3 (matmul path)": (2, 3, 3, 16, 8, 1, 1, 0),
}


def torch_conv(x, kernel, bias, stride, padding):
  xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)
  if not isinstance(padding, int):  # explicit (lo, hi) pairs: pad first, as diffusers' VAE does
    (t, b), (l, r) = padding
    xt, padding = torch.nn.functional.pad(xt, (l, r, t, b)), 0
  w = torch.from_numpy(np.asarray(kernel)).permute(3, 2, 0, 1)
  y = torch.nn.functional.conv2d(xt, w, torch.from_numpy(np.asarray(bias)), stride=stride, padding=padding)
  return y.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("case", CASES)
def test_conv_matches_torch(case):
  n, h, w, cin, cout, k, stride, padding = CASES[case]
  conv = Conv(cin, cout, k, stride=stride, padding=padding, rngs=nnx.Rngs(0))
  x = np.random.default_rng(1).standard_normal((n, h, w, cin)).astype(np.float32)
  got = np.asarray(conv(jnp.asarray(x)))
  want = torch_conv(x, conv.kernel[...], conv.bias[...], stride, padding)
  print(f"{case}: rel err {rel_err(got, want):.2e}")
  assert got.shape == want.shape
  assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("case", ["3x3 on 2x2 (matmul path)", "VAE downsample: stride 2, pad (0,1) -> 2x2"])
def test_matmul_path_gradients_match_the_convolution(case, monkeypatch):
  n, h, w, cin, cout, k, stride, padding = CASES[case]
  conv = Conv(cin, cout, k, stride=stride, padding=padding, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(2).standard_normal((n, h, w, cin)), jnp.float32)

  def grads():
    loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
    return jax.grad(loss, argnums=(0, 1))(conv, x)

  (g_model, g_x) = grads()
  monkeypatch.setattr(layers, "SMALL_CONV_PIXELS", 0)  # every conv through lax.conv_general_dilated
  (r_model, r_x) = grads()
  assert rel_err(g_x, r_x) <= 1e-6
  assert rel_err(g_model.kernel[...], r_model.kernel[...]) <= 1e-6
