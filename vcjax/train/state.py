"""Train state and the pure, jitted train step.

The model is split ONCE into (graphdef, trainable, frozen); trainable and frozen are nested dicts of
arrays (`nnx.State.to_pure_dict()`), so optax, orbax and sharding rules see plain pytrees. The step

    train_step(trainable, opt_state, frozen, batch, key) -> (trainable, opt_state, metrics)

merges them back into the model inside the trace, differentiates the objective w.r.t. `trainable` only,
and applies AdamW after global-norm clipping. trainable and opt_state are donated.

Parallelism: `Trainer` places trainable / frozen with `param_shardings(params, mesh, mode)` (mode
"replicate" = data parallel, "fsdp" = parameters sharded over the mesh's fsdp axis), the optimizer state
like its parameters, the batch over (data, fsdp), and jits the step with those in/out shardings.
Random numbers are drawn at global shapes inside the step (threefry is partitionable), so a run's
numbers do not depend on the device count.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vcjax import compiler, parallel


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 1e-5
  weight_decay: float = 1e-2
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0  # global norm; <= 0 disables
  warmup_steps: int = 0  # linear warmup, then constant
  ema_decay: float = 0.0  # > 0: keep an EMA of the trainable parameters (track_ema); 0: none
  # ((pattern, factor), ...): the lr of the parameters whose "/"-joined path matches `pattern` (re.search;
  # the first matching rule wins) is learning_rate x factor; e.g. (("attentions/.*/attn2/to_[kv]", 5.0),).
  lr_multipliers: tuple[tuple[str, float], ...] = ()


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  if cfg.warmup_steps > 0:
    return optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)  # stays at the end value
  return optax.constant_schedule(cfg.learning_rate)


class EmaState(NamedTuple):
  count: jax.Array  # updates averaged so far
  ema: Any  # like the parameters


def track_ema(decay: float) -> optax.GradientTransformation:
  """An exponential moving average of the parameters after each update, kept in the optimizer state.

  Living in the optimizer state, the average is checkpointed, restored and sharded exactly like the
  parameters (orbax and `optax.tree_map_params` see it as one more params-shaped slot), so resuming stays
  bit-exact. Updates pass through unchanged: place it last in a chain. The n-th update (from 0) averages with
  decay 0 for n = 0 and min(decay, (1 + n) / (10 + n)) after, diffusers' `EMAModel` rule without its power
  warmup, so the average forgets the initial weights quickly and settles at `decay`.
  """

  def init(params):
    return EmaState(count=jnp.zeros([], jnp.int32), ema=jax.tree.map(jnp.array, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("track_ema needs the parameters: call update(updates, state, params)")
    n = state.count.astype(jnp.float32)
    d = jnp.where(state.count == 0, 0.0, jnp.minimum(decay, (1.0 + n) / (10.0 + n)))
    new_params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: (e - (1.0 - d) * (e - p)).astype(e.dtype), state.ema, new_params)
    return updates, EmaState(count=state.count + 1, ema=ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state):
  """The parameters' EMA kept by `track_ema` in an optimizer state, or None when the chain has none."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
           if isinstance(s, EmaState)]
  return found[0].ema if found else None


def param_path(path) -> str:
  """A pytree key path as "unet/down_blocks/1/attentions/0/.../to_k/kernel"."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def parse_lr_multipliers(text: str) -> tuple[tuple[str, float], ...]:
  """"pattern=factor,pattern=factor" (the config's string form) -> OptimizerConfig.lr_multipliers."""
  rules = []
  for item in filter(None, (t.strip() for t in text.split(","))):
    pattern, sep, factor = item.rpartition("=")
    if not sep or not pattern:
      raise ValueError(f"optimizer.lr_multipliers: expected 'pattern=factor', got {item!r}")
    re.compile(pattern)
    rules.append((pattern, float(factor)))
  return tuple(rules)


def scale_by_path(rules: tuple[tuple[str, float], ...]) -> optax.GradientTransformation:
  """Multiplies each update by the factor of the first rule whose pattern matches its parameter's path
  (1 where none does). Placed after AdamW it scales the whole step, decay included: exactly AdamW with that
  parameter group's learning rate multiplied (torch's per-group lr)."""

  def factor(path):
    name = param_path(path)
    return next((f for p, f in rules if re.search(p, name)), 1.0)

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda path, u: u * jnp.asarray(factor(path), u.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW (torch.optim.AdamW semantics: decoupled decay on every trainable)
  [-> per-path lr factors when cfg.lr_multipliers] [-> track_ema when cfg.ema_decay > 0]."""
  adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay)
  parts = ([optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []) + [adamw]
  if cfg.lr_multipliers:
    parts.append(scale_by_path(tuple(cfg.lr_multipliers)))
  if cfg.ema_decay > 0:
    parts.append(track_ema(cfg.ema_decay))
  return optax.chain(*parts) if len(parts) > 1 else adamw


def split_model(model: nnx.Module, trainable_filter) -> tuple[nnx.GraphDef, dict, dict]:
  """-> (graphdef, trainable pure dict, frozen pure dict). Everything not trainable is frozen."""
  graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
  return graphdef, trainable.to_pure_dict(), frozen.to_pure_dict()


def merge_model(graphdef, trainable, frozen) -> nnx.Module:
  return nnx.merge(graphdef, nnx.State(trainable), nnx.State(frozen))


def count_params(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]


def make_train_step(graphdef, loss_fn: LossFn, tx: optax.GradientTransformation):
  """The pure train step (not jitted): loss_fn(model, batch, key) -> (loss, aux dict of scalars)."""

  def train_step(trainable, opt_state, frozen, batch, key):
    def objective(tr):
      return loss_fn(merge_model(graphdef, tr, frozen), batch, key)

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}  # grad norm before clipping
    return trainable, opt_state, metrics

  return train_step


class Trainer:
  """Holds the split model, the optimizer and the jitted, sharded step.

  trainer = Trainer(model, trainable_filter, loss_fn, OptimizerConfig(...), mesh=..., param_mode=...)
  trainable, opt_state = trainer.init()
  trainable, opt_state, metrics = trainer.step(trainable, opt_state, batch, key)
  """

  def __init__(self, model: nnx.Module, trainable_filter, loss_fn: LossFn, opt_cfg: OptimizerConfig, *,
               mesh=None, param_mode: str = "replicate"):
    par = self.par = parallel
    self.mesh = mesh if mesh is not None else par.make_mesh()
    self.graphdef, trainable, frozen = split_model(model, trainable_filter)
    if not jax.tree.leaves(trainable):
      raise ValueError("the trainable filter selects no parameters")
    self.tx = make_optimizer(opt_cfg)
    self.lr_schedule = learning_rate_schedule(opt_cfg)
    self.param_mode = param_mode
    self.trainable_shardings = par.param_shardings(trainable, self.mesh, param_mode)
    self.frozen_shardings = par.param_shardings(frozen, self.mesh, param_mode)
    self.replicated = NamedSharding(self.mesh, P())
    abstract_opt = jax.eval_shape(self.tx.init, trainable)
    self.opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, abstract_opt, self.trainable_shardings,
        transform_non_params=lambda _: self.replicated)
    self.frozen = jax.device_put(frozen, self.frozen_shardings)
    self._initial_trainable = trainable  # released by init() / release_initial()
    self._abstract_trainable = jax.eval_shape(lambda: trainable)
    self.batch_sharding = par.batch_sharding(self.mesh)
    step = make_train_step(self.graphdef, loss_fn, self.tx)
    self._step = compiler.jit(
        step, donate_argnums=(0, 1),
        in_shardings=(self.trainable_shardings, self.opt_shardings, self.frozen_shardings,
                      self.batch_sharding, self.replicated),
        out_shardings=(self.trainable_shardings, self.opt_shardings, self.replicated))
    self.num_trainable = count_params(trainable)
    self.num_frozen = count_params(frozen)

  def init(self) -> tuple[Any, Any]:
    """Initial (trainable, opt_state), placed on the mesh. Once only (the step donates them)."""
    if self._initial_trainable is None:
      raise RuntimeError("Trainer.init() was already called (or the initial values were released)")
    trainable = jax.device_put(self._initial_trainable, self.trainable_shardings)
    self._initial_trainable = None
    opt_state = compiler.jit(self.tx.init, out_shardings=self.opt_shardings)(trainable)
    return trainable, opt_state

  def release_initial(self) -> None:
    """Drop the initial trainable values (after restoring a checkpoint instead of init())."""
    self._initial_trainable = None

  def abstract_state(self):
    """ShapeDtypeStructs (with shardings) of (trainable, opt_state): the restore target."""
    def spec(x, s):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    tr = jax.tree.map(spec, self._abstract_trainable, self.trainable_shardings)
    opt = jax.tree.map(spec, jax.eval_shape(self.tx.init, self._abstract_trainable), self.opt_shardings)
    return tr, opt

  def shard_batch(self, batch):
    """Host numpy batch -> global arrays over (data, fsdp); non-numeric entries (captions) dropped."""
    batch = {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
    return self.par.shard_batch(batch, self.mesh)

  def step(self, trainable, opt_state, batch, key):
    with self.par.use_mesh(self.mesh):  # sequence parallelism's constraints need the active mesh
      return self._step(trainable, opt_state, self.frozen, batch, key)

  def model(self, trainable) -> nnx.Module:
    """The full model with the given trainable values (for export / evaluation)."""
    return merge_model(self.graphdef, trainable, self.frozen)


def step_key(seed_key: jax.Array, step: int) -> jax.Array:
  """The step's random key: fold_in(seed key, step); resuming at step s reproduces it."""
  return jax.random.fold_in(seed_key, step)
