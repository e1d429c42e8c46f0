"""Batched, compiled, device-parallel feature extraction for the evaluation models.

`Runner(model).map(fn, *arrays)` applies `fn(model, *batch)` to fixed-size batches of the leading axis:
rows are padded up to a whole batch (so one compile serves every call of a shape; a set smaller than a
batch runs as the smallest whole number of rows per device), the batch is split
over every local device on a 1-D "data" mesh, the weights are replicated, and the program is compiled
through `vcjax.compiler.jit`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vcjax import compiler
from vcjax.models import raft as raft_lib


@compiler.jit(static_argnums=(0, 1))
def _apply(fn, graphdef, state, *arrays):
  return fn(nnx.merge(graphdef, state), *arrays)


class Runner:
  """One model, replicated on every local device; `map` runs functions of it over batches."""

  def __init__(self, model: nnx.Module, *, batch_per_device: int = 8, devices=None):
    devices = list(devices if devices is not None else jax.local_devices())
    self.mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    self.devices = len(devices)
    self.batch = batch_per_device * len(devices)
    graphdef, state = nnx.split(model)
    self.graphdef = graphdef
    self.state = jax.device_put(state, NamedSharding(self.mesh, P()))
    self._rows = NamedSharding(self.mesh, P("data"))

  def map(self, fn: Callable, *arrays: np.ndarray) -> np.ndarray:
    """`fn(model, *batch) -> (B, ...)` over the rows of `arrays` (all of the same length) -> `(N, ...)`."""
    n = len(arrays[0])
    if n == 0:
      raise ValueError("nothing to run")
    # A set smaller than one batch runs as a smaller one (a whole number of rows per device).
    batch = min(self.batch, -(-n // self.devices) * self.devices)
    out = []
    for start in range(0, n, batch):
      chunk = [np.asarray(a[start:start + batch]) for a in arrays]
      rows = len(chunk[0])
      pad = batch - rows
      if pad:  # repeat the last row: padded rows are computed and dropped
        chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunk]
      placed = [jax.device_put(c, self._rows) for c in chunk]
      out.append(np.asarray(_apply(fn, self.graphdef, self.state, *placed))[:rows])
    return np.concatenate(out)


# ------------------------------------------------------------------ functions of the models, jit-static


def clip_image_features(model, pixels):
  """CLIPModel, `(B, 224, 224, 3)` normalised -> `(B, P)`."""
  return model.get_image_features(pixels)


def clip_text_features(model, ids):
  """CLIPModel, ids `(B, 77)` -> `(B, P)`."""
  return model.get_text_features(ids)


def dino_cls(model, pixels):
  """ViTModel, `(B, 224, 224, 3)` normalised -> CLS token `(B, D)`."""
  return model.cls(pixels)


def raft_flow(model, image1, image2):
  """RAFT, frame pairs `(B, H, W, 3)` in [0, 255] (H, W multiples of 8) -> flow `(B, H, W, 2)`, 20 iterations."""
  return model(image1.astype(jnp.float32), image2.astype(jnp.float32), iters=20)


def raft_flow_top5(model, image1, image2, iters: int = 20):
  """RAFT on frame pairs `(B, H, W, 3)` in [0, 255]: pad as the original InputPadder, flow, and the mean of
  the top 5% flow magnitudes over the padded frame (the authors' score) -> `(B,)`."""
  a, b = raft_lib.pad_to_multiple_of_8(image1.astype(jnp.float32), image2.astype(jnp.float32))
  flow = model(a, b, iters=iters)
  mag = jnp.sqrt(jnp.square(flow[..., 0]) + jnp.square(flow[..., 1])).reshape(flow.shape[0], -1)
  k = int(mag.shape[-1] * 0.05)
  if k == 0:
    return jnp.full(mag.shape[:1], jnp.nan)
  return jax.lax.top_k(mag, k)[0].mean(-1)
