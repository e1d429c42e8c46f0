"""RAFT's building blocks (Teed & Deng 2020, the original code's structure and names): convolutions,
batch / instance norm, the residual feature encoder, the motion encoder, the separable ConvGRU and the
flow and mask heads. Channels-last: `(B, H, W, C)`.

Names follow the original checkpoint (`fnet.layer2.0.downsample.0`, `update_block.gru.convz1`, ...), so
`vcjax.weights.keymaps.load_state_dict` fills them (see `raft.raft_state_dict` for the few renames).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class Conv2d(nnx.Module):
  """torch.nn.Conv2d with a (kh, kw) kernel, symmetric padding (ph, pw), a stride and a bias. HWIO kernel."""

  def __init__(self, cin: int, cout: int, kernel, *, stride: int = 1, padding=None, rngs: nnx.Rngs):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = ((kh // 2, kw // 2) if padding is None else
              (padding, padding) if isinstance(padding, int) else padding)
    self.stride, self.padding = stride, ((ph, ph), (pw, pw))
    bound = 1.0 / math.sqrt(cin * kh * kw)
    init = jax.nn.initializers.uniform(2 * bound)
    self.kernel = nnx.Param(init(rngs.params(), (kh, kw, cin, cout)) - bound)
    self.bias = nnx.Param(init(rngs.params(), (cout,)) - bound)

  def __call__(self, x):
    y = jax.lax.conv_general_dilated(x, self.kernel[...], (self.stride, self.stride), self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return y + self.bias[...]


class BatchNorm(nnx.Module):
  """torch.nn.BatchNorm2d in eval mode (running statistics). The statistics are Params only so that the
  checkpoint loader fills them; nothing trains them."""

  def __init__(self, channels: int, *, eps: float = 1e-5):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((channels,)))
    self.bias = nnx.Param(jnp.zeros((channels,)))
    self.running_mean = nnx.Param(jnp.zeros((channels,)))
    self.running_var = nnx.Param(jnp.ones((channels,)))

  def __call__(self, x):
    inv = jax.lax.rsqrt(self.running_var[...] + self.eps) * self.scale[...]
    return (x - self.running_mean[...]) * inv + self.bias[...]


def instance_norm(x, eps: float = 1e-5):
  """torch.nn.InstanceNorm2d (no affine, no running stats): per sample and channel over H, W."""
  mean = x.mean(axis=(1, 2), keepdims=True)
  var = jnp.square(x - mean).mean(axis=(1, 2), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _norm(kind: str, channels: int):
  """A BatchNorm module for "batch"; None for "instance" (parameter-free, applied by `_apply`) and "none"."""
  if kind == "batch":
    return BatchNorm(channels)
  if kind in ("instance", "none"):
    return None
  raise ValueError(f"unsupported RAFT norm {kind!r}")


def _apply(norm, kind: str, x):
  if kind == "instance":
    return instance_norm(x)
  return x if norm is None else norm(x)


class ResidualBlock(nnx.Module):
  """relu(shortcut(x) + relu(n2(c2(relu(n1(c1(x))))))); the shortcut is a strided 1x1 conv + norm3."""

  def __init__(self, cin: int, cout: int, norm: str, stride: int, *, rngs: nnx.Rngs):
    self.kind = norm
    self.conv1 = Conv2d(cin, cout, 3, stride=stride, padding=1, rngs=rngs)
    self.conv2 = Conv2d(cout, cout, 3, padding=1, rngs=rngs)
    self.norm1, self.norm2 = _norm(norm, cout), _norm(norm, cout)
    if stride == 1:
      self.norm3, self.downsample = None, None
    else:  # the checkpoint also stores norm3 as downsample.1 (one module under two names)
      self.norm3 = _norm(norm, cout)
      self.downsample = nnx.List([Conv2d(cin, cout, 1, stride=stride, padding=0, rngs=rngs)])

  def __call__(self, x):
    y = jax.nn.relu(_apply(self.norm1, self.kind, self.conv1(x)))
    y = jax.nn.relu(_apply(self.norm2, self.kind, self.conv2(y)))
    if self.downsample is not None:
      x = _apply(self.norm3, self.kind, self.downsample[0](x))
    return jax.nn.relu(x + y)


class BasicEncoder(nnx.Module):
  """7x7/2 conv (64) + norm, residual stages 64, 96/2, 128/2, 1x1 conv. `(B, H, W, 3)` -> `(B, H/8, W/8, D)`."""

  def __init__(self, output_dim: int, norm: str, *, rngs: nnx.Rngs):
    self.kind = norm
    self.conv1 = Conv2d(3, 64, 7, stride=2, padding=3, rngs=rngs)
    self.norm1 = _norm(norm, 64)
    stages, cin = [], 64
    for dim, stride in ((64, 1), (96, 2), (128, 2)):
      stages.append(nnx.List([ResidualBlock(cin, dim, norm, stride, rngs=rngs),
                              ResidualBlock(dim, dim, norm, 1, rngs=rngs)]))
      cin = dim
    self.layer1, self.layer2, self.layer3 = stages
    self.conv2 = Conv2d(128, output_dim, 1, padding=0, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(_apply(self.norm1, self.kind, self.conv1(x)))
    for stage in (self.layer1, self.layer2, self.layer3):
      for block in stage:
        x = block(x)
    return self.conv2(x)


class BasicMotionEncoder(nnx.Module):
  """Correlation features (2 convs) and flow features (2 convs), fused, with the flow appended (128 ch)."""

  def __init__(self, corr_planes: int, *, rngs: nnx.Rngs):
    self.convc1 = Conv2d(corr_planes, 256, 1, padding=0, rngs=rngs)
    self.convc2 = Conv2d(256, 192, 3, padding=1, rngs=rngs)
    self.convf1 = Conv2d(2, 128, 7, padding=3, rngs=rngs)
    self.convf2 = Conv2d(128, 64, 3, padding=1, rngs=rngs)
    self.conv = Conv2d(64 + 192, 128 - 2, 3, padding=1, rngs=rngs)

  def __call__(self, flow, corr):
    cor = jax.nn.relu(self.convc2(jax.nn.relu(self.convc1(corr))))
    flo = jax.nn.relu(self.convf2(jax.nn.relu(self.convf1(flow))))
    out = jax.nn.relu(self.conv(jnp.concatenate([cor, flo], axis=-1)))
    return jnp.concatenate([out, flow], axis=-1)


class SepConvGRU(nnx.Module):
  """A ConvGRU run twice: with 1x5 kernels (horizontal), then with 5x1 kernels (vertical)."""

  def __init__(self, hidden: int, inputs: int, *, rngs: nnx.Rngs):
    c = hidden + inputs
    for suffix, kernel in (("1", (1, 5)), ("2", (5, 1))):
      for gate in ("z", "r", "q"):
        setattr(self, f"conv{gate}{suffix}", Conv2d(c, hidden, kernel, rngs=rngs))

  def __call__(self, h, x):
    for suffix in ("1", "2"):
      hx = jnp.concatenate([h, x], axis=-1)
      z = jax.nn.sigmoid(getattr(self, f"convz{suffix}")(hx))
      r = jax.nn.sigmoid(getattr(self, f"convr{suffix}")(hx))
      q = jnp.tanh(getattr(self, f"convq{suffix}")(jnp.concatenate([r * h, x], axis=-1)))
      h = (1 - z) * h + z * q
    return h


class FlowHead(nnx.Module):
  def __init__(self, cin: int, hidden: int, *, rngs: nnx.Rngs):
    self.conv1 = Conv2d(cin, hidden, 3, padding=1, rngs=rngs)
    self.conv2 = Conv2d(hidden, 2, 3, padding=1, rngs=rngs)

  def __call__(self, x):
    return self.conv2(jax.nn.relu(self.conv1(x)))


class BasicUpdateBlock(nnx.Module):
  """(hidden, context, correlation features, flow) -> (new hidden, upsampling mask logits, delta flow).

  The mask (64 * 9 channels: for each of the 8x8 sub-pixels, weights of the 3x3 coarse neighbours) is
  scaled by 0.25 as in the original (it balances gradients there; it changes the softmax, so it stays).
  The checkpoint's `mask.0` / `mask.2` are `mask1` / `mask2` here.
  """

  def __init__(self, corr_planes: int, hidden: int = 128, *, rngs: nnx.Rngs):
    self.encoder = BasicMotionEncoder(corr_planes, rngs=rngs)
    self.gru = SepConvGRU(hidden, 128 + hidden, rngs=rngs)
    self.flow_head = FlowHead(hidden, 256, rngs=rngs)
    self.mask1 = Conv2d(128, 256, 3, padding=1, rngs=rngs)
    self.mask2 = Conv2d(256, 64 * 9, 1, padding=0, rngs=rngs)

  def __call__(self, net, inp, corr, flow):
    inp = jnp.concatenate([inp, self.encoder(flow, corr)], axis=-1)
    net = self.gru(net, inp)
    delta = self.flow_head(net)
    mask = 0.25 * self.mask2(jax.nn.relu(self.mask1(net)))
    return net, mask, delta
