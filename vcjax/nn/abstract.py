"""Building a module for its shapes only (nothing allocated), as every loader does before filling weights."""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


class ShapeOnlyRngs:
  """Stands in for nnx.Rngs while a module is built under nnx.eval_shape: every stream (`rngs.params()`,
  `rngs()`, `rngs["dropout"]()`) gives one fixed key, since only shapes come out.

  Why not nnx.Rngs(0): it counts its draws in a Variable, which is a tracer here, and flax compares the
  `.sharding` of every update; on a tracer that attribute fails with a message that walks the whole trace
  so far. That is quadratic in the number of draws: 3.3 of the 3.9 s it took to build the world UNet
  abstractly (0.55 s with this), paid by every `python sample.py` before anything compiles.
  """

  def __call__(self) -> jax.Array:
    return jax.random.key(0)

  def __getattr__(self, stream: str) -> Callable[[], jax.Array]:
    if stream.startswith("__"):
      raise AttributeError(stream)
    return self

  def __getitem__(self, stream: str) -> Callable[[], jax.Array]:
    return self


def abstract_module(build: Callable[..., M]) -> M:
  """`build(rngs)` under nnx.eval_shape: the module with abstract (ShapeDtypeStruct) parameters."""
  return nnx.eval_shape(lambda: build(ShapeOnlyRngs()))
