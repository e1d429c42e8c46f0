"""Sharded UNet3D forward passes on 8 simulated CPU devices reproduce the single-device result.

(a) data parallel: 8 videos over "data"; (b) sequence parallel: ONE video of 8 frames, frames over "seq" in
the spatial transformers and spatial positions over "seq" in the motion modules; (c) FSDP: parameters split
over "fsdp". Each also checks that the sharding really happened (shard shapes, collectives in the HLO),
so a silently replicated computation fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.reference import rel_err
from vcjax import parallel
from vcjax.models.configs import tiny_unet
from vcjax.models.unet3d import UNet3D

FRAMES, SIZE = 8, 16  # 16x16 latents: 8x8 at the lowest level, so 8 devices split its rows evenly
# tiny_unet with one layer per block: every kind of block, about half the compile time of the default.
CONFIG = tiny_unet(layers_per_block=1)


def random_state(abstract_state, seed=0):
  """Fills an abstract nnx.State with numpy random values (torch-like fan-in init for kernels, norm
  scales near 1, small random biases): much faster than compiling the modules' own initialisers."""
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    shape = leaf.shape
    if len(shape) >= 2:
      bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
      return rng.uniform(-bound, bound, shape).astype(np.float32)
    offset = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
    return (offset + 0.1 * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, abstract_state)


@pytest.fixture(scope="module")
def model():
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: UNet3D(CONFIG, rngs=nnx.Rngs(0))))
  state = random_state(abstract)
  rng = np.random.default_rng(1)
  inputs = (rng.standard_normal((8, FRAMES, SIZE, SIZE, 4)).astype(np.float32),
            rng.integers(0, 1000, (8,)).astype(np.int32),
            rng.standard_normal((8, 7, 32)).astype(np.float32))
  forward = lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c)
  reference = np.asarray(jax.jit(forward)(jax.device_put(state, jax.devices()[0]), *inputs))
  return graphdef, state, forward, inputs, reference


def compile_sharded(forward, state, inputs, mesh, mode):
  """Lower + compile under `mesh` (constrain sees it while tracing); returns (compiled, args)."""
  with parallel.use_mesh(mesh):
    params = parallel.shard_params(state, mesh, mode, min_size=1024)
    args = (params, *parallel.shard_batch(inputs, mesh))
    compiled = jax.jit(forward).lower(*args).compile()
  return compiled, args


def test_mesh_construction():
  mesh = parallel.make_mesh(data=-1, fsdp=2, sequence=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "seq": 2}
  assert dict(parallel.make_mesh().shape) == {"data": 8, "fsdp": 1, "seq": 1}
  with pytest.raises(ValueError):
    parallel.make_mesh(data=3)
  # single process: nothing to join
  assert parallel.initialize_distributed() is False


def test_param_shardings_rules():
  mesh = parallel.make_mesh(data=2, fsdp=4)
  tree = {"kernel": jnp.zeros((3, 3, 64, 128)), "odd": jnp.zeros((3, 5001)), "bias": jnp.zeros((128,)),
          "lm": jax.ShapeDtypeStruct((256, 64), jnp.float32)}
  sh = parallel.param_shardings(tree, mesh, "fsdp", min_size=1024)
  assert sh["kernel"].spec == P(None, None, None, "fsdp")  # largest divisible axis
  assert sh["odd"].spec == P()  # nothing divisible by 4
  assert sh["bias"].spec == P()  # small
  assert sh["lm"].spec == P("fsdp")
  assert all(s.spec == P() for s in jax.tree.leaves(parallel.param_shardings(tree, mesh)))


def test_activation_spec_rules():
  mesh = parallel.make_mesh(data=2, sequence=4)
  spec = parallel.activation_spec
  assert spec((2, 8, 4, 4, 32), "video", mesh) == P("data", "seq", None, None, None)
  assert spec((1, 8, 4, 4, 32), "video", mesh) == P(None, "seq", None, None, None)  # 1 video: no data split
  assert spec((2, 6, 4, 4, 32), "video", mesh) == P("data", None, None, None, None)  # 6 frames: not over 4
  assert spec((16, 16, 32), "frame_tokens", mesh, batch=2) == P(("data", "seq"), None, None)
  assert spec((8, 16, 32), "frame_tokens", mesh, batch=1) == P("seq", None, None)
  assert spec((32, 8, 32), "temporal_tokens", mesh, batch=2) == P(("data", "seq"), None, None)
  # constrain is a no-op without an active seq mesh, and inside one without a seq axis
  x = jnp.ones((2, 8, 4, 4, 32))
  assert parallel.constrain(x, "video") is x
  with parallel.use_mesh(parallel.make_mesh()):
    assert not parallel.seq_parallel_active()
  with parallel.use_mesh(mesh):
    assert parallel.seq_parallel_active()


@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_data_parallel_forward(model):
  _, state, forward, inputs, reference = model
  mesh = parallel.make_mesh(data=8)
  compiled, args = compile_sharded(forward, state, inputs, mesh, "replicate")
  out = compiled(*args)
  assert out.sharding.is_equivalent_to(parallel.batch_sharding(mesh), out.ndim)
  assert {s.data.shape for s in out.addressable_shards} == {(1, FRAMES, SIZE, SIZE, 4)}
  err = rel_err(np.asarray(out), reference)
  print(f"data parallel rel err {err:.2e}")
  assert err < 1e-5


def test_sequence_parallel_forward(model, monkeypatch):
  _, state, forward, inputs, reference = model
  one_video = tuple(a[:1] for a in inputs)
  seen = []  # (kind, global shape, per-device shard shape) of every constrained activation

  original = parallel.constrain

  def recording_constrain(x, kind, **kw):
    y = original(x, kind, **kw)
    record = lambda sharding: seen.append((kind, y.shape, sharding.shard_shape(y.shape)))
    jax.debug.inspect_array_sharding(y, callback=record)
    return y

  monkeypatch.setattr(parallel, "constrain", recording_constrain)
  mesh = parallel.make_mesh(data=1, fsdp=1, sequence=8)
  compiled, args = compile_sharded(forward, state, one_video, mesh, "replicate")
  out = compiled(*args)
  err = rel_err(np.asarray(out), reference[:1])
  print(f"sequence parallel rel err {err:.2e}")
  assert err < 1e-5

  kinds = {k for k, _, _ in seen}
  assert kinds == {"video", "frame_tokens", "temporal_tokens"}, kinds
  for kind, shape, shard in seen:
    if kind == "video":  # (1, F, H, W, C): one frame per device
      assert shard == (1, 1) + shape[2:], (kind, shape, shard)
    else:  # frame tokens (F, HW, C) and temporal tokens (HW, F, C): leading axis split 8 ways
      assert shard == (shape[0] // 8,) + shape[1:], (kind, shape, shard)
  # frames-split <-> positions-split is done with all-to-alls, not by gathering everything
  n_motion = sum(1 for k, _, _ in seen if k == "temporal_tokens")
  n_all_to_all = compiled.as_text().count(" all-to-all(")
  print(f"{n_motion} motion modules, {n_all_to_all} all-to-alls")
  assert n_all_to_all >= 2 * n_motion  # into and out of every motion module
  assert out.sharding.spec in (P(None, "seq"), P(None, "seq", None, None, None))


@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_fsdp_forward(model):
  _, state, forward, inputs, reference = model
  mesh = parallel.make_mesh(data=1, fsdp=8)
  compiled, args = compile_sharded(forward, state, inputs, mesh, "fsdp")
  params = args[0]
  specs = [leaf.sharding.spec for leaf in jax.tree.leaves(params)]
  n_split = sum(1 for s in specs if "fsdp" in tuple(s))
  assert n_split > len(specs) // 4, (n_split, len(specs))
  kernel = params["mid_block"]["resnets"][0]["conv1"]["kernel"]
  assert kernel.sharding.spec == P(None, None, None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (3, 3, 64, 8)
  assert "all-gather" in compiled.as_text()  # parameters are gathered where used
  out = compiled(*args)
  assert out.sharding.is_equivalent_to(parallel.batch_sharding(mesh), out.ndim)
  err = rel_err(np.asarray(out), reference)
  print(f"fsdp rel err {err:.2e}")
  assert err < 1e-5
