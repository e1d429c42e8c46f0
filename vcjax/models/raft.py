"""RAFT optical flow (Teed & Deng, ECCV 2020), the full ("basic") model of the original code, as VBench and
the CustomCrafter authors' dynamic-degree scripts run it (`raft-things.pth`, 20 iterations, test mode).

    flow = raft(image1, image2, iters=20)   # (B, H, W, 3) in [0, 255], H and W multiples of 8
                                            # -> (B, H, W, 2) flow in pixels, (x, y) order

Steps: both frames through the feature encoder (instance norm), the first through the context encoder
(batch norm, eval statistics) split into the GRU state (tanh) and context (relu); an all-pairs correlation
volume at 1/8 resolution pooled into a 4-level pyramid; then `iters` updates, each looking up a
(2r+1)^2 window per level around the current estimate and adding the update block's delta; finally the
1/8 flow is upsampled by the learned convex combination of 3x3 neighbours.

Facts of the original code kept here because they change the numbers:
  * the window offset that varies fastest along the lookup's channels moves in y; the slower one in x;
  * lookups are bilinear with zero padding, on pixel coordinates (grid_sample, align_corners=True);
    a pyramid level one pixel wide or high has no finite normalised coordinate there (the flow is NaN),
    so frames under MIN_SIZE (128) pixels per side are refused;
  * pyramid levels are 2x2 average pools that drop an odd last row / column.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax.models.raft_blocks import BasicEncoder, BasicUpdateBlock

_HIGHEST = jax.lax.Precision.HIGHEST
MIN_SIZE = 128  # pixels per side (padded) for 4 levels whose coarsest is >= 2 pixels


@dataclasses.dataclass(frozen=True)
class RAFTConfig:
  """The full RAFT (the "small" variant is not implemented: neither VBench nor the authors use it)."""
  hidden_dim: int = 128
  context_dim: int = 128
  corr_levels: int = 4
  corr_radius: int = 4
  feature_dim: int = 256


def raft_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Original RAFT checkpoint keys -> vcjax paths: DataParallel's `module.` dropped, `downsample.1` (the
  same module as `norm3`) dropped, `update_block.mask.{0,2}` -> `update_block.mask{1,2}`."""
  out = {}
  for key, value in state.items():
    key = key[len("module."):] if key.startswith("module.") else key
    if ".downsample.1." in key:
      continue
    key = re.sub(r"^update_block\.mask\.0\.", "update_block.mask1.", key)
    key = re.sub(r"^update_block\.mask\.2\.", "update_block.mask2.", key)
    out[key] = value
  return out


def original_state_dict(model: "RAFT") -> dict[str, np.ndarray]:
  """The inverse of raft_state_dict: a vcjax RAFT's parameters under the original checkpoint's names and
  PyTorch layouts (OIHW kernels, batch norm `weight`; a batch-norm `norm3` also as `downsample.1`), without
  DataParallel's `module.` prefix. No `num_batches_tracked` (eval never reads it)."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(var.get_value())
    *module, name = (str(p) for p in path)
    if name == "kernel":
      value, name = value.transpose(3, 2, 0, 1), "weight"
    elif name == "scale":
      name = "weight"
    key = re.sub(r"^update_block\.mask([12])\.", lambda m: f"update_block.mask.{2 * int(m[1]) - 2}.",
                 ".".join(module + [name]))
    out[key] = value
    if ".norm3." in key:  # a norm3 with parameters is a batch norm, stored twice by the original
      out[key.replace(".norm3.", ".downsample.1.")] = value
  return out


def coords_grid(b: int, h: int, w: int):
  """`(B, h, w, 2)` pixel coordinates, (x, y) order."""
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  return jnp.broadcast_to(jnp.stack([xs, ys], axis=-1), (b, h, w, 2))


def correlation_pyramid(fmap1, fmap2, levels: int):
  """All-pairs dot products / sqrt(D), pooled. `(B, h, w, D)` x2 -> list of `(B, h, w, h_l, w_l)`."""
  d = fmap1.shape[-1]
  corr = jnp.einsum("bijd,bkld->bijkl", fmap1, fmap2, precision=_HIGHEST) / jnp.sqrt(jnp.float32(d))
  h, w = corr.shape[-2:]
  if min(h, w) >> (levels - 1) < 2:
    raise ValueError(f"RAFT needs frames of at least {MIN_SIZE} pixels per side (after padding to a multiple "
                     f"of 8), got {8 * h}x{8 * w}: the original's coarsest correlation level would be one "
                     "pixel wide, where its lookup divides by zero and the flow comes out NaN")
  pyramid = [corr]
  for _ in range(levels - 1):
    b, h, w, h2, w2 = corr.shape
    corr = corr[..., :h2 // 2 * 2, :w2 // 2 * 2].reshape(b, h, w, h2 // 2, 2, w2 // 2, 2).mean(axis=(4, 6))
    pyramid.append(corr)
  return pyramid


def _bilinear_zeros(img, x, y):
  """Bilinear samples of `img (N, H, W)` at pixel coordinates `x, y (N, K)`, 0 outside. -> `(N, K)`."""
  n, h, w = img.shape
  x0, y0 = jnp.floor(x), jnp.floor(y)
  flat = img.reshape(n, h * w)
  out = 0.0
  for dx in (0, 1):
    for dy in (0, 1):
      xi, yi = x0 + dx, y0 + dy
      weight = (1 - jnp.abs(x - xi)) * (1 - jnp.abs(y - yi))
      valid = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
      idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
      out = out + jnp.where(valid, weight * jnp.take_along_axis(flat, idx, axis=1), 0.0)
  return out


def lookup(pyramid, coords, radius: int):
  """Correlation windows around `coords (B, h, w, 2)` -> `(B, h, w, levels * (2r+1)^2)`.

  Channel a * (2r+1) + b of a level samples at (x + a - r, y + b - r) / 2^level, as in the original.
  """
  b, h, w, _ = coords.shape
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  dx = jnp.repeat(offsets, 2 * radius + 1)  # slow axis: x
  dy = jnp.tile(offsets, 2 * radius + 1)  # fast axis: y
  out = []
  for level, corr in enumerate(pyramid):
    h2, w2 = corr.shape[-2:]
    c = coords.reshape(b * h * w, 1, 2) / 2 ** level
    samples = _bilinear_zeros(corr.reshape(b * h * w, h2, w2), c[..., 0] + dx, c[..., 1] + dy)
    out.append(samples.reshape(b, h, w, -1))
  return jnp.concatenate(out, axis=-1)


def upsample_flow(flow, mask):
  """Convex 8x upsampling. flow `(B, h, w, 2)`, mask logits `(B, h, w, 9 * 64)` -> `(B, 8h, 8w, 2)`.

  Mask channel k * 64 + i * 8 + j weighs coarse neighbour k (3x3, row-major) for fine pixel (8y+i, 8x+j).
  """
  b, h, w, _ = flow.shape
  m = jax.nn.softmax(mask.reshape(b, h, w, 9, 8, 8), axis=3)
  padded = jnp.pad(8 * flow, ((0, 0), (1, 1), (1, 1), (0, 0)))
  neighbours = jnp.stack([padded[:, ky:ky + h, kx:kx + w] for ky in range(3) for kx in range(3)], axis=3)
  up = jnp.einsum("bhwkij,bhwkc->bhiwjc", m, neighbours, precision=_HIGHEST)
  return up.reshape(b, 8 * h, 8 * w, 2)


def pad_to_multiple_of_8(*images):
  """The original InputPadder ("sintel" mode): edge-replicate to multiples of 8, split evenly (extra on the
  bottom / right). `(B, H, W, C)` each -> padded, same padding for all."""
  h, w = images[0].shape[1:3]
  ph, pw = -h % 8, -w % 8
  pads = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
  return [jnp.pad(x, pads, mode="edge") if ph or pw else x for x in images]


class RAFT(nnx.Module):
  """image1, image2 `(B, H, W, 3)` in [0, 255] (H, W multiples of 8) -> flow `(B, H, W, 2)` (x, y)."""

  def __init__(self, config: RAFTConfig = RAFTConfig(), *, rngs: nnx.Rngs):
    self.config = config
    corr_planes = config.corr_levels * (2 * config.corr_radius + 1) ** 2
    self.fnet = BasicEncoder(config.feature_dim, "instance", rngs=rngs)
    self.cnet = BasicEncoder(config.hidden_dim + config.context_dim, "batch", rngs=rngs)
    self.update_block = BasicUpdateBlock(corr_planes, config.hidden_dim, rngs=rngs)

  def __call__(self, image1, image2, *, iters: int = 20, all_iterations: bool = False):
    """all_iterations: return every iteration's upsampled flow `(iters, B, H, W, 2)` (what RAFT's sequence
    loss trains on) instead of the last one's."""
    cfg = self.config
    if image1.shape[1] % 8 or image1.shape[2] % 8:
      raise ValueError(f"RAFT input must be a multiple of 8 pixels per side, got {image1.shape[1:3]}; "
                       "pad with pad_to_multiple_of_8")
    x1 = 2 * (image1.astype(jnp.float32) / 255.0) - 1.0
    x2 = 2 * (image2.astype(jnp.float32) / 255.0) - 1.0
    b = x1.shape[0]
    fmaps = self.fnet(jnp.concatenate([x1, x2], axis=0))  # instance norm: per image, batching is free
    pyramid = correlation_pyramid(fmaps[:b], fmaps[b:], cfg.corr_levels)
    context = self.cnet(x1)
    net = jnp.tanh(context[..., :cfg.hidden_dim])
    inp = jax.nn.relu(context[..., cfg.hidden_dim:])
    h, w = fmaps.shape[1:3]
    coords0 = coords_grid(b, h, w)

    graphdef, state = nnx.split(self.update_block)

    def step(carry, _):
      net, coords1, _ = carry
      coords1 = jax.lax.stop_gradient(coords1)  # as the original: each iteration's estimate is detached
      corr = lookup(pyramid, coords1, cfg.corr_radius)
      net, mask, delta = nnx.merge(graphdef, state)(net, inp, corr, coords1 - coords0)
      coords1 = coords1 + delta
      return (net, coords1, mask), ((coords1 - coords0, mask) if all_iterations else None)

    mask0 = jnp.zeros((b, h, w, 9 * 64), jnp.float32)
    (net, coords1, mask), per_iteration = jax.lax.scan(step, (net, coords0, mask0), None, length=iters)
    if all_iterations:
      return jax.vmap(upsample_flow)(*per_iteration)
    return upsample_flow(coords1 - coords0, mask)
