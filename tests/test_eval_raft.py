"""RAFT in vcjax vs the tests' PyTorch statement of the original (random weights, real architecture, small
frames), loaded torch-free from a `raft-things.pth`-style file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.reference import rel_err
from vcjax import compiler
from vcjax.models import raft as raft_lib
from vcjax.weights.errors import CheckpointError
from vcjax.weights.eval_models import load_raft

torch = pytest.importorskip("torch")
raft_torch = pytest.importorskip("tests.raft_torch")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  ref = raft_torch.randomized(seed=0)
  path = str(tmp_path_factory.mktemp("raft") / "raft-things.pth")
  raft_torch.save_original_format(ref, path)
  return ref, load_raft(path), path


def frames(rng, n, h, w):
  """Smooth random frames in [0, 255], the second a shifted copy of the first plus noise."""
  base = rng.uniform(0, 255, (n, h + 8, w + 8, 3)).astype(np.float32)
  base = (base + np.roll(base, 1, 1) + np.roll(base, 1, 2)) / 3
  return base[:, 4:4 + h, 4:4 + w], base[:, 2:2 + h, 5:5 + w] + rng.normal(0, 2, (n, h, w, 3)).astype(np.float32)


def torch_flow(ref, a, b, iters):
  ta, tb = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))) for x in (a, b))
  ta, tb = raft_torch.pad_sintel(ta, tb)
  with torch.no_grad():
    return ref(ta, tb, iters=iters).numpy().transpose(0, 2, 3, 1)


@compiler.jit(static_argnums=(0, 3))
def vcjax_flow(graphdef, state, pair, iters):
  from flax import nnx
  a, b = raft_lib.pad_to_multiple_of_8(*pair)
  return nnx.merge(graphdef, state)(a, b, iters=iters)


@pytest.mark.parametrize("h,w,iters", [(128, 128, 20), (124, 190, 20)])
def test_flow_matches_torch_statement(models, h, w, iters):
  from flax import nnx
  ref, model, _ = models
  a, b = frames(np.random.default_rng(h + w), 2, h, w)
  want = torch_flow(ref, a, b, iters)
  got = np.asarray(vcjax_flow(*nnx.split(model), (jnp.asarray(a), jnp.asarray(b)), iters))
  assert got.shape == want.shape == (2, h + (-h % 8), w + (-w % 8), 2)
  assert rel_err(got, want) < 1e-4
  assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_original_state_dict_is_the_checkpoint(models):
  """vcjax -> the original's names and layouts (what vcjax.world.flow saves) gives back the checkpoint."""
  ref, model, _ = models
  want = {k: v.numpy() for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
  got = raft_lib.original_state_dict(model)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_all_iterations_ends_with_the_plain_flow(models):
  from flax import nnx
  _, model, _ = models
  a, b = (jnp.asarray(x) for x in frames(np.random.default_rng(5), 1, 128, 128))
  run = compiler.jit(lambda g, s, a, b: nnx.merge(g, s)(a, b, iters=3, all_iterations=True), static_argnums=0)
  every = np.asarray(run(*nnx.split(model), a, b))
  assert every.shape == (3, 1, 128, 128, 2)
  np.testing.assert_allclose(every[-1], np.asarray(vcjax_flow(*nnx.split(model), (a, b), 3)), atol=1e-5)
  assert np.abs(every[0] - every[-1]).max() > 1e-3


def test_pieces_match_torch(models):
  """The correlation pyramid, window lookup and convex upsampling on their own."""
  ref, _, _ = models
  rng = np.random.default_rng(3)
  f1, f2 = rng.standard_normal((2, 1, 16, 24, 32)).astype(np.float32)
  coords = (raft_lib.coords_grid(1, 16, 24) + rng.normal(0, 3, (1, 16, 24, 2))).astype(np.float32)
  t = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    want = ref.lookup(ref.pyramid(t(f1), t(f2)), t(np.asarray(coords))).numpy().transpose(0, 2, 3, 1)
  got = raft_lib.lookup(raft_lib.correlation_pyramid(jnp.asarray(f1), jnp.asarray(f2), 4), jnp.asarray(coords), 4)
  assert rel_err(got, want) < 1e-5
  flow = rng.standard_normal((1, 16, 24, 2)).astype(np.float32)
  mask = rng.standard_normal((1, 16, 24, 576)).astype(np.float32)
  with torch.no_grad():
    want = ref.upsample(t(flow), t(mask)).numpy().transpose(0, 2, 3, 1)
  assert rel_err(raft_lib.upsample_flow(jnp.asarray(flow), jnp.asarray(mask)), want) < 1e-6


def test_geometry_of_lookup():
  """With one-hot features the window at zero flow peaks at the channel of the true displacement:
  a feature at (x, y) in frame 1 that sits at (x + 2, y - 1) in frame 2 lights channel (2+4)*9 + (-1+4)."""
  f1 = np.zeros((1, 8, 8, 64), np.float32)
  f2 = np.zeros_like(f1)
  for y in range(8):
    for x in range(8):
      f1[0, y, x, y * 8 + x] = 1
      if 0 <= x + 2 < 8 and 0 <= y - 1 < 8:
        f2[0, y - 1, x + 2, y * 8 + x] = 1
  pyr = raft_lib.correlation_pyramid(jnp.asarray(f1), jnp.asarray(f2), 1)
  win = np.asarray(raft_lib.lookup(pyr, raft_lib.coords_grid(1, 8, 8), 4))
  assert win.shape == (1, 8, 8, 81)
  assert np.argmax(win[0, 4, 3]) == (2 + 4) * 9 + (-1 + 4)
  assert np.isclose(win[0, 4, 3].max(), 1 / np.sqrt(64))


def test_bad_checkpoints(tmp_path, models):
  _, _, path = models
  torch.save({"module.something.weight": torch.zeros(3)}, tmp_path / "other.pth")
  with pytest.raises(CheckpointError, match="not a RAFT checkpoint"):
    load_raft(str(tmp_path / "other.pth"))
  with pytest.raises(CheckpointError, match="is a folder"):
    load_raft(str(tmp_path))
  (tmp_path / "trunc.pth").write_bytes(open(path, "rb").read()[:1000])
  with pytest.raises(CheckpointError, match="trunc.pth"):
    load_raft(str(tmp_path / "trunc.pth"))


def test_small_frames_are_refused(models):
  _, model, _ = models
  x = jnp.zeros((1, 64, 128, 3))  # the original's flow is NaN there (a 1-pixel coarsest level)
  with pytest.raises(ValueError, match="at least 128 pixels"):
    jax.eval_shape(lambda a, b: model(a, b, iters=1), x, x)
