"""Preemption-safe training checkpoints with orbax.

A checkpoint at step s holds: the trainable parameters and the optimizer state (arrays, written
asynchronously and sharded as they live on the mesh), the base random key, and a JSON part with the step,
the data iterator's state and free-form metadata. The newest `max_to_keep` are kept. Arrays are stored
under flat string keys (`trainable/unet.down_blocks.0...`, `opt_state/1.0.mu.unet...`) so that any
pytree (nnx pure dicts with integer keys, optax NamedTuples) round-trips; restoring needs the live
structure (from the Trainer) as the target, which also gives every array its sharding.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _key_str(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flatten(tree) -> dict[str, Any]:
  """Pytree -> {"a.b.0.c": leaf} (every leaf, in tree order)."""
  return {".".join(_key_str(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_like(flat: dict[str, Any], like):
  """Inverse of `flatten` given a tree of the same structure."""
  names = list(flatten(like))
  missing = [n for n in names if n not in flat]
  if missing:
    raise KeyError(f"checkpoint lacks {len(missing)} arrays, e.g. {missing[:3]}")
  return jax.tree.unflatten(jax.tree.structure(like), [flat[n] for n in names])


class Checkpointer:
  """Thin wrapper over orbax's CheckpointManager for (trainable, opt_state, rng key, JSON state)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, trainable, opt_state, rng_key, json_state: dict[str, Any]) -> None:
    """Starts an (asynchronous) save; call `wait()` before relying on it on disk."""
    arrays = {"trainable": flatten(trainable), "opt_state": flatten(opt_state),
              "rng": {"key": np.asarray(jax.device_get(rng_key))}}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                    meta=ocp.args.JsonSave(dict(json_state, step=int(step)))),
                      force=True)

  def restore(self, step: int, trainable_target, opt_target):
    """-> (trainable, opt_state, rng key (np uint32), json dict); targets are ShapeDtypeStruct trees
    with shardings (Trainer.abstract_state())."""
    target = {"trainable": flatten(trainable_target), "opt_state": flatten(opt_target),
              "rng": {"key": np.zeros((2,), np.uint32)}}
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             meta=ocp.args.JsonRestore()))
    st = out["state"]
    return (unflatten_like(st["trainable"], trainable_target), unflatten_like(st["opt_state"], opt_target),
            np.asarray(st["rng"]["key"], np.uint32), dict(out["meta"]))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
