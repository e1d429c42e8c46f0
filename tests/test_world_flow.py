"""The world's exact flow and RAFT's training and check on it (vcjax/world/flow.py)."""

import numpy as np
import pytest

from vcjax.world import clips as clips_lib
from vcjax.world import flow
from vcjax.world.config import WorldConfig

WORLD = flow.world_for_flow(WorldConfig())


def bilinear(image, x, y):
  """Samples of `image (H, W, C)` at pixel-centre coordinates (x, y) (pixel i's centre is i + 0.5)."""
  h, w = image.shape[:2]
  x, y = np.clip(x - 0.5, 0, w - 1.001), np.clip(y - 0.5, 0, h - 1.001)
  x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
  fx, fy = (x - x0)[..., None], (y - y0)[..., None]
  img = image.astype(np.float64)
  return ((1 - fx) * (1 - fy) * img[y0, x0] + fx * (1 - fy) * img[y0, x0 + 1] +
          (1 - fx) * fy * img[y0 + 1, x0] + fx * fy * img[y0 + 1, x0 + 1])


def interior(mask, pixels: int = 2):
  """The mask eroded by `pixels` (4-neighbour): pixels whose colour is the sprite's, not a blend."""
  m = mask.copy()
  for _ in range(pixels):
    m[1:] &= m[:-1].copy()
    m[:-1] &= m[1:].copy()
    m[:, 1:] &= m[:, :-1].copy()
    m[:, :-1] &= m[:, 1:].copy()
  return m


@pytest.mark.parametrize("motion", ["right", "up_left", "spin", "grow", "shrink", "still"])
def test_true_flow_carries_the_sprite_onto_itself(motion):
  """Frame t1 read at p + flow(p) is frame t0's sprite (its pattern included); zero flow is not."""
  shape = "star" if motion == "spin" else "square"
  attrs = clips_lib.sample_attributes(WORLD, 3, motion=motion, shape=shape, pattern="checkered")
  clip = clips_lib.render(WORLD, attrs)
  t0, t1 = 4, 7
  f = flow.true_flow(clip, t0, t1)
  assert f.shape == (128, 128, 2) and f.dtype == np.float32
  assert not f[~clip.masks[t0]].any()  # the background stays
  inside = interior(clip.masks[t0])
  ys, xs = np.nonzero(inside)
  x, y = xs + 0.5 + f[ys, xs, 0], ys + 0.5 + f[ys, xs, 1]
  warped = bilinear(clip.frames[t1], x, y)
  error = np.abs(warped - clip.frames[t0][ys, xs]).mean()
  landed = clip.masks[t1][np.floor(y).astype(int), np.floor(x).astype(int)].mean()
  assert landed > 0.99
  assert error < 8.0  # of 255: resampling a checkered pattern
  if motion != "still":
    unmoved = np.abs(clip.frames[t1][ys, xs].astype(np.float64) - clip.frames[t0][ys, xs]).mean()
    assert unmoved > 3 * error


def test_true_flow_of_a_translation_is_its_displacement():
  attrs = clips_lib.sample_attributes(WORLD, 0, motion="down_right", speed="fast")
  clip = clips_lib.render(WORLD, attrs)
  f = flow.true_flow(clip, 2, 5)
  want = (clip.centres[5] - clip.centres[2])[::-1]  # (y, x) -> (x, y)
  np.testing.assert_allclose(f[clip.masks[2]], np.broadcast_to(want, f[clip.masks[2]].shape), atol=1e-4)
  assert want[0] > 5 and want[1] > 5


def test_batch_is_deterministic_and_labelled():
  a = flow.batch(WORLD, 10, 3)
  b = flow.batch(WORLD, 10, 3)
  assert {k: v.shape for k, v in a.items()} == {"image1": (3, 128, 128, 3), "image2": (3, 128, 128, 3),
                                                "flow": (3, 128, 128, 2), "weight": (3, 128, 128)}
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image1"], flow.batch(WORLD, 13, 3)["image1"])


def test_pan_pairs_move_every_pixel_by_their_flow_and_sprite_pairs_balance():
  """A pan pair's image2 at p + flow is image1 at p (an exact integer shift, all pixels); a balanced sprite
  pair's weights sum to 1 with half on the sprite."""
  data = flow.batch(WORLD, 0, 16, pan_fraction=0.5, balance=True)
  pans = [i for i in range(16) if np.all(data["flow"][i] == data["flow"][i, 0, 0]) and data["flow"][i].any()]
  sprites = [i for i in range(16) if i not in pans]
  assert 3 <= len(pans) <= 13 and sprites
  for i in pans:
    fx, fy = (int(v) for v in data["flow"][i, 0, 0])
    assert (fx, fy) != (0, 0) and max(abs(fx), abs(fy)) <= 8
    s = 128 - 8
    ys, xs = slice(8, s), slice(8, s)  # p inside, so that p + flow is too
    np.testing.assert_array_equal(data["image2"][i, 8 + fy:s + fy, 8 + fx:s + fx], data["image1"][i, ys, xs])
    np.testing.assert_allclose(data["weight"][i], 1 / 128 ** 2)
  for i in sprites:
    w, moving = data["weight"][i], np.linalg.norm(data["flow"][i], axis=-1) > 0
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(w[w > w.min()].sum(), 0.5, rtol=1e-4)  # the sprite's share
    assert w.max() > 5 * w.min() and (not moving.any() or (w[moving] == w.max()).mean() > 0.9)
  plain = flow.batch(WORLD, 0, 16)
  assert not any(np.all(plain["flow"][i] == plain["flow"][i, 0, 0]) and plain["flow"][i].any() for i in range(16))


def test_sequence_loss_weights_late_iterations_most():
  rng = np.random.default_rng(0)
  flows, target = rng.normal(size=(3, 2, 8, 8, 2)), rng.normal(size=(2, 8, 8, 2))
  want = sum(0.8 ** (2 - i) * np.abs(flows[i] - target).mean() for i in range(3))
  np.testing.assert_allclose(float(flow.sequence_loss(flows, target)), want, rtol=1e-5)
  weight = rng.random(size=(2, 8, 8))
  weight /= weight.sum(axis=(1, 2), keepdims=True)
  want = sum(0.8 ** (2 - i) * (np.abs(flows[i] - target).mean(-1) * weight).sum((1, 2)).mean() for i in range(3))
  np.testing.assert_allclose(float(flow.sequence_loss(flows, target, weight)), want, rtol=1e-5)


def test_score_clip_of_the_true_flow_and_of_no_flow():
  """The check's scoring: the exact flow scores perfectly; zero flow misses every moving clip's DD."""
  moving = clips_lib.render(WORLD, clips_lib.sample_attributes(WORLD, 1, motion="left", speed="fast"))
  still = clips_lib.render(WORLD, clips_lib.sample_attributes(WORLD, 2, motion="still"))
  rows = []
  for clip in (moving, still):
    true = np.stack([flow.true_flow(clip, t, t + 1) for t in range(15)])
    rows.append(flow.score_clip(WORLD, clip, true))
  assert rows[0]["epe"] == 0 and rows[0]["direction_ok"] == 1 and rows[0]["speed_relative_error"] < 1e-6
  assert rows[0]["moving"] == rows[0]["truly_moving"] == 1  # 0.48 x 128 / 15 = 4.1 px per frame > 2 px
  assert rows[1]["still_sprite_flow"] == 0 and rows[1]["truly_moving"] == 0
  table = flow.summarize(WORLD, rows)
  assert table["dd_agreement"] == 1.0 and table["direction_accuracy"] == 1.0 and table["epe"] == 0
  zero = flow.score_clip(WORLD, moving, np.zeros((15, 128, 128, 2), np.float32))
  assert zero["moving"] == 0 and zero["epe_sprite"] > 3.5
  assert flow.summarize(WORLD, [zero, rows[1]])["dd_agreement"] == 0.5


@pytest.mark.slow  # compiles RAFT's backward pass
def test_training_steps_lower_the_loss_and_the_file_loads(tmp_path):
  """Three steps on one fixed batch lower the sequence loss (the batch-norm statistics stay); the saved file
  (original key names) loads through the eval loader to the same parameters."""
  from flax import nnx

  from vcjax.models.raft import RAFT, RAFTConfig
  from vcjax.weights.eval_models import load_raft

  model = RAFT(RAFTConfig(), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tx = flow.make_optimizer(params, 10, lr=2e-5)  # from random weights 1e-4 overshoots on one batch
  opt_state = tx.init(params)
  data = flow.batch(WORLD, 0, 1)
  stats_before = np.asarray(params["cnet"]["norm1"]["running_var"][...]).copy()
  losses = []
  for _ in range(3):
    params, opt_state, loss, _ = flow._train_step(graphdef, tx, 2, params, opt_state, data)
    losses.append(float(loss))
  assert losses[2] < losses[0]
  np.testing.assert_array_equal(np.asarray(params["cnet"]["norm1"]["running_var"][...]), stats_before)
  nnx.update(model, params)
  path = flow.save_raft(str(tmp_path), model, {"steps": 3})
  from vcjax.models.raft import original_state_dict
  want, got = original_state_dict(model), original_state_dict(load_raft(path))
  assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_cli_errors_in_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit):
    flow.main([])  # neither --out nor --check
  capsys.readouterr()
  assert flow.main(["--check", str(tmp_path / "missing.safetensors")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "missing.safetensors" in err[0]
  assert flow.main(["--out", str(tmp_path / "o"), "--size", "64"]) == 1
  assert "at least 128 px" in capsys.readouterr().err
