"""Meshes, shardings and multi-host start-up for vcjax.

One mesh with three named axes serves sampling and training:

  data  plain data parallelism: the batch is split, parameters are replicated;
  fsdp  the batch is split AND each large parameter is split on one axis (ZeRO-3 / FSDP): the compiler
        all-gathers a parameter where it is used and reduce-scatters its gradient;
  seq   sequence parallelism inside one video: the spatial transformers split frames over it and the
        motion modules split spatial positions over it, so one long / large video spans several devices.

Programs are written for one device and compiled with `jax.jit` over `NamedSharding`s; the model calls
`constrain(x, kind)` at the few places where the layout must change (frames-split <-> positions-split),
and XLA inserts the all-to-alls. `constrain` only acts while a mesh whose "seq" axis is larger than 1 is
active (`with use_mesh(mesh):`, i.e. `jax.set_mesh`), so single-device and data-parallel runs trace the
exact same program as before.

Typical use:

  initialize_distributed()                      # no-op on one process
  mesh = make_mesh(data=-1, fsdp=1, sequence=1)
  params = jax.device_put(state, param_shardings(state, mesh, "fsdp"))
  with use_mesh(mesh):
    out = compiler.jit(step)(params, shard_batch(host_batch, mesh))   # vcjax.compiler, as every program
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP, SEQ = "data", "fsdp", "seq"
AXES = (DATA, FSDP, SEQ)
BATCH_AXES = (DATA, FSDP)  # the axes the leading (batch) dimension is split over

# Activation layouts, one entry per array dimension (missing trailing dimensions are replicated). Each
# entry is a tuple of axis GROUPS: a dimension made by merging several logical dimensions (frames folded
# into the batch) lists one group per merged factor, outermost first; `constrain(..., batch=B)` tells the
# size of the first factor, so each group is checked against the factor it splits.
RULES: dict[str, tuple[tuple[tuple[str, ...], ...], ...]] = {
    # (B, F, H, W, C): batch over data/fsdp, frames over seq.
    "video": ((BATCH_AXES,), ((SEQ,),)),
    # (B*F, H*W, C), b-major: the spatial transformer's tokens, frames over seq.
    "frame_tokens": ((BATCH_AXES, (SEQ,)),),
    # (B*H*W, F, C), b-major: the motion module's tokens, spatial positions over seq.
    "temporal_tokens": ((BATCH_AXES, (SEQ,)),),
}


# ----------------------------------------------------------------------------------------------------
# Processes and meshes.

# Environment variables of launchers that start one process per host or per device; if one of them says
# there is more than one process, jax.distributed.initialize() can detect the rest by itself.
_LAUNCHER_WORLD_SIZE = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MEGASCALE_NUM_SLICES")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
                           cpu_collectives: str | None = None, timeout_s: int = 300) -> bool:
  """Joins a multi-process (multi-host) JAX job; returns True if this is one, False for a single process.

  Arguments left None come from VCJAX_COORDINATOR_ADDRESS (or JAX_COORDINATOR_ADDRESS), VCJAX_NUM_PROCESSES
  and VCJAX_PROCESS_ID. Without any of them the job is single-process, unless a launcher (SLURM, Open MPI,
  PMI, a multi-host TPU slice) says otherwise, in which case JAX's own cluster detection fills them in.
  Must run before anything touches a JAX device. Calling it again is harmless.
  cpu_collectives: e.g. "gloo", for multi-process jobs on CPU devices (tests, CPU clusters).
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = (coordinator_address or os.environ.get("VCJAX_COORDINATOR_ADDRESS")
                         or os.environ.get("JAX_COORDINATOR_ADDRESS"))
  num_processes = num_processes if num_processes is not None else _env_int("VCJAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("VCJAX_PROCESS_ID")
  launched = any((_env_int(name) or 1) > 1 for name in _LAUNCHER_WORLD_SIZE)
  launched = launched or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if num_processes == 1 or (num_processes is None and not launched):
    return False  # one process: nothing to join (a coordinator address alone does not make a job)
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=timeout_s)
  return True


def make_mesh(data: int = -1, fsdp: int = 1, sequence: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "seq") mesh over `devices` (default: every device of every process).

  One size may be -1: all the devices the others leave. The order is data-major, so with several
  processes the data axis runs across hosts and fsdp / seq stay within a host where they fit (their
  collectives are the frequent ones).
  """
  n = len(devices) if devices is not None else jax.device_count()
  sizes = [data, fsdp, sequence]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive, with at most one -1; got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ValueError(f"{n} devices cannot be split into fsdp/data/seq sizes {sizes}")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, there are {n}")
  return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def use_mesh(mesh: jax.sharding.Mesh):
  """Context manager making `mesh` the active mesh (jax.set_mesh): jit, bare PartitionSpecs and
  `constrain` see it. Trace (call the jitted function for the first time) inside it."""
  return jax.set_mesh(mesh)


def axis_size(mesh, axis: str | Sequence[str]) -> int:
  """Product of the sizes of the named axes present in `mesh` (1 for absent ones)."""
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  shape = dict(mesh.shape)
  return math.prod(shape.get(a, 1) for a in names)


# ----------------------------------------------------------------------------------------------------
# Parameters.

def _fsdp_spec(shape: tuple[int, ...], n: int, axis: str, min_size: int) -> P:
  """Split the largest dimension divisible by n (the last of equals); replicate small arrays."""
  if n <= 1 or math.prod(shape) < min_size:
    return P()
  candidates = [(d, i) for i, d in enumerate(shape) if d % n == 0]
  if not candidates:
    return P()
  _, dim = max(candidates)
  return P(*([None] * dim + [axis]))


def param_shardings(state_or_params, mesh: jax.sharding.Mesh, mode: str = "replicate", *,
                    axis: str = FSDP, min_size: int = 2 ** 12):
  """A pytree like `state_or_params` (an nnx.State, any pytree of arrays or ShapeDtypeStructs, or an
  nnx.Module, whose state is used) with a NamedSharding at every leaf.

  mode "replicate": every array on every device. mode "fsdp": arrays with at least `min_size` elements
  are split over `axis` on their largest dimension divisible by its size; the rest are replicated.
  """
  if mode not in ("replicate", "fsdp"):
    raise ValueError(f"mode must be 'replicate' or 'fsdp', got {mode!r}")
  from flax import nnx  # local: parallel.py is otherwise model-agnostic

  tree = nnx.state(state_or_params) if isinstance(state_or_params, nnx.Module) else state_or_params
  n = axis_size(mesh, axis) if mode == "fsdp" else 1

  def one(leaf):
    shape = tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)
    return NamedSharding(mesh, _fsdp_spec(shape, n, axis, min_size))

  return jax.tree.map(one, tree)


def shard_params(state_or_params, mesh: jax.sharding.Mesh, mode: str = "replicate", **kwargs):
  """`jax.device_put(state, param_shardings(state, mesh, mode))` (single-process or identical params on
  every process)."""
  from flax import nnx

  tree = nnx.state(state_or_params) if isinstance(state_or_params, nnx.Module) else state_or_params
  return jax.device_put(tree, param_shardings(tree, mesh, mode, **kwargs))


# ----------------------------------------------------------------------------------------------------
# Batches.

def batch_sharding(mesh: jax.sharding.Mesh, ndim: int | None = None) -> NamedSharding:
  """Leading axis over ("data", "fsdp"), everything else replicated (also over "seq": the model splits
  frames itself). `ndim=0` gives the replicated sharding for scalars."""
  if ndim == 0:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch, mesh: jax.sharding.Mesh):
  """Host-local numpy batch (pytree) -> global jax.Arrays split over ("data", "fsdp").

  Every process passes its own rows (leading axis = global batch / process count when the batch axes
  span all processes); scalars and 0-d leaves must be identical on every process. One process: the
  batch is simply split over the devices.
  """
  n = axis_size(mesh, BATCH_AXES)
  # How many different batch shards this process's devices hold: its rows are split into that many.
  names = list(mesh.axis_names)
  local_shards = len({tuple(idx[names.index(a)] for a in BATCH_AXES if a in names)
                      for idx, d in np.ndenumerate(mesh.devices) if d.process_index == jax.process_index()})

  def one(x):
    x = np.asarray(x)
    if x.ndim and x.shape[0] % local_shards:
      raise ValueError(f"this process's batch of {x.shape[0]} rows cannot be split into its {local_shards} "
                       f"of the data*fsdp = {n} batch shards")
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

  return jax.tree.map(one, batch)


# ----------------------------------------------------------------------------------------------------
# Activation layouts inside the model.

def _usable_axes(mesh) -> dict[str, int]:
  """Axes of the active mesh that a sharding constraint may name: Auto axes larger than 1."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  return {a: s for a, s in mesh.shape.items() if s > 1 and types[a] == AxisType.Auto}


def _fit(size: int, axes: Sequence[str], usable: dict[str, int]) -> tuple[str, ...]:
  """The axes (in order) that split `size` evenly: each is kept if the running product still divides."""
  kept, prod = [], 1
  for a in axes:
    if a in usable and size % (prod * usable[a]) == 0:
      kept.append(a)
      prod *= usable[a]
  return tuple(kept)


def activation_spec(shape: Sequence[int], kind: str, mesh, *, batch: int | None = None) -> P:
  """The PartitionSpec `constrain` applies to an array of `shape` under `mesh` (see RULES)."""
  usable = _usable_axes(mesh)
  spec = []
  for dim, size in enumerate(shape):
    groups = RULES[kind][dim] if dim < len(RULES[kind]) else ()
    if len(groups) > 1 and dim == 0 and batch is not None and size % batch == 0:
      # A merged (batch, rest) leading dimension: fit each group to its own factor.
      first = _fit(batch, groups[0], usable)
      rest = tuple(a for g in groups[1:] for a in g)
      axes = first + _fit(size // batch, rest, usable)
    else:
      axes = _fit(size, [a for g in groups for a in g], usable)
    spec.append(axes if len(axes) > 1 else (axes[0] if axes else None))
  return P(*spec)


def seq_parallel_active() -> bool:
  """True while the active (abstract) mesh has an Auto "seq" axis larger than 1."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and SEQ in _usable_axes(mesh)


def constrain(x, kind: str, *, batch: int | None = None):
  """Pins the layout of activation `x` to RULES[kind] on the active mesh (no-op without a "seq" axis
  larger than 1). `batch`: the number of videos B when the leading dimension is B*F or B*H*W.

  Dimensions that an axis does not divide evenly are left replicated on that axis, so any shape works.
  """
  if not seq_parallel_active():
    return x
  spec = activation_spec(x.shape, kind, jax.sharding.get_abstract_mesh(), batch=batch)
  return jax.lax.with_sharding_constraint(x, spec)
