"""The authors' training defaults (METHODS.md §6) and AnimateDiff's motion-module init, measured:

* CustomCrafter: 20% of subject AND class captions dropped to ""; the authors' rescale distribution
  (discrete scales, shrink-and-paste only below 0.6 on a black canvas) and no flip of class images; no
  gradient clipping; L1 loss; lr 3e-5 per example x the global batch; the paper's choices one key away.
* A freshly built MotionModule / UNet3D has proj_out = 0 (kernel and bias); nnx.eval_shape still works.
* Video clips: each read draws its own temporal window (configured stride, in range) from the stored frame
  pool, and one of several stored references; records of the older one-window form still work.
"""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from vcjax.data import captions, customcrafter
from vcjax.models.configs import tiny_unet
from vcjax.models.motion import MotionModule
from vcjax.models.unet3d import UNet3D
from vcjax.train import state
from configs.train_common import default_config
from vcjax.train.loop import optimizer_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTHORS_SCALES = {0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.3, 1.4}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from vcjax.testing import write_tokenizer
  from vcjax.models.tokenizer import load_tokenizer
  folder = str(tmp_path_factory.mktemp("tok"))
  write_tokenizer(folder)
  return load_tokenizer(folder)


# ------------------------------------------------------------------------------------------ CustomCrafter

def test_authors_rescale_distribution_and_paste():
  image = np.full((32, 32, 3), 200, np.uint8)  # a square image: all of it is content
  valid = np.ones((32, 32), bool)
  n, out = 6000, 20
  counts = collections.Counter()
  for seed in range(n):
    px, m, prefix, branch, scale = customcrafter.rescale_augment(image, valid, np.random.default_rng(seed), out,
                                                                 customcrafter.AUTHORS_RESCALE)
    counts[round(scale, 6)] += 1
    canvas = px[..., 0] == -1.0
    if scale < 0.6:  # shrunk and pasted on black; the mask is the pasted square
      side = round(scale * out)
      assert branch == "out" and prefix in captions.FAR_PREFIXES
      assert canvas.sum() == out * out - side * side and m.sum() == side * side
      assert np.all(m[canvas] == 0)
    else:  # 0.6-1.0 fills the frame, > 1 crops an enlargement: no canvas, all-ones mask
      assert not canvas.any() and np.all(m == 1.0)
      assert (prefix in captions.NEAR_PREFIXES) == (scale > 1.0) and (prefix == "") == (scale <= 1.0)
  assert set(counts) == AUTHORS_SCALES
  p_small = sum(c for s, c in counts.items() if s <= 1.0) / n
  per = {s: c / n for s, c in sorted(counts.items())}
  print(f"authors' rescale over {n} draws: P(scale <= 1) = {p_small:.4f} (2/3); per scale {per}")
  assert abs(p_small - 2 / 3) < 0.025
  for s, p in per.items():
    want = (2 / 3) / 8 if s <= 1.0 else (1 / 3) / 3
    assert abs(p - want) < 0.02, (s, p, want)


def _record(rng, caption=""):
  img = rng.integers(0, 255, (32, 32, 3), np.uint8)
  return {"image": img, "box": np.array([0, 0, 32, 32], np.int32), "caption": caption}


def test_caption_dropout_and_class_flip(tokenizer):
  from vcjax.data.loaders import SubjectClipTransform
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (32, 32, 3), np.uint8)
  rec = {"image": image, "box": np.array([0, 0, 32, 32], np.int32), "caption": ""}
  subject = SubjectClipTransform(tokenizer, size=32, num_frames=1, class_word="dog")
  prior = SubjectClipTransform(tokenizer, size=32, num_frames=1, class_word="dog", is_prior=True)
  assert subject.caption_dropout == 0.2 and subject.rescale is customcrafter.AUTHORS_RESCALE
  n = 2000
  rates, flipped = {}, {}
  want = customcrafter.to_unit_range(image)
  for name, tf in (("subject", subject), ("class", prior)):
    out = [tf(rec, np.random.default_rng([7, i])) for i in range(n)]
    rates[name] = np.mean([str(o["caption"]) == "" for o in out])
    kept = {str(o["caption"]) for o in out} - {""}
    assert kept and all(("<new1> dog" in c) == (name == "subject") for c in kept)
    empty_ids = out[[str(o["caption"]) for o in out].index("")]["input_ids"]
    assert (empty_ids == captions_ids(tokenizer, "")).all()
    if name == "class":  # class images: never flipped (nor rescaled)
      assert all(np.array_equal(o["pixels"][0], want) for o in out)
  off = SubjectClipTransform(tokenizer, size=32, num_frames=1, class_word="dog", caption_dropout=0.0)
  assert all(str(off(rec, np.random.default_rng(i))["caption"]) for i in range(200))
  # the paper's preset flips class images half of the time
  paper = SubjectClipTransform(tokenizer, size=32, num_frames=1, is_prior=True, rescale="paper")
  flipped["paper class"] = np.mean([np.array_equal(paper(rec, np.random.default_rng(i))["pixels"][0],
                                                   want[:, ::-1]) for i in range(400)])
  print(f"caption dropout over {n} draws: subject {rates['subject']:.4f}, class {rates['class']:.4f} (0.2); "
        f"class flips: authors 0, paper {flipped['paper class']:.3f}")
  for r in rates.values():
    assert abs(r - 0.2) < 0.03
  assert abs(flipped["paper class"] - 0.5) < 0.08


def captions_ids(tokenizer, text):
  from vcjax.models.tokenizer import tokenize
  return tokenize(tokenizer, [text])[0]


def test_subject_defaults_and_no_grad_clip():
  c = default_config("subject")
  assert (c.loss_kind, c.caption_dropout, c.augment, c.optimizer.grad_clip) == ("l1", 0.2, "authors", 0.0)
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", "train_subject_lora.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  full = mod.get_config()
  opt = optimizer_config(full)
  assert opt.learning_rate == pytest.approx(2.4e-4) and opt.grad_clip == 0.0 and full.batch_size == 8
  assert optimizer_config(default_config("girl")).grad_clip == 1.0  # VideoMaker clips at 1.0
  # No clipping in the optax chain: updates equal plain AdamW's even for a huge gradient; clip 1.0 differs.
  params = {"w": jnp.ones((3,))}
  grads = [{"w": jnp.array([1.0, -2.0, 0.5])}, {"w": jnp.array([3e3, 1e3, -2e3])}]

  def updates(tx):
    s, out = tx.init(params), []
    for g in grads:
      u, s = tx.update(g, s, params)
      out.append(np.asarray(u["w"]))
    return np.stack(out)

  plain = updates(optax.adamw(opt.learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2))
  ours = updates(state.make_optimizer(opt))
  clipped = updates(state.make_optimizer(state.OptimizerConfig(learning_rate=opt.learning_rate, grad_clip=1.0)))
  np.testing.assert_array_equal(ours, plain)
  diff = float(np.abs(clipped[1] - plain[1]).max() / np.abs(plain[1]).max())
  print(f"AdamW step 2 with a 3.7e3-norm gradient: clip 1.0 moves the update by {diff:.3f} (relative)")
  assert diff > 0.05


# ------------------------------------------------------------------------------------------ motion init

@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_fresh_motion_module_proj_out_is_zero():
  mm = MotionModule(8, 2, groups=2, rngs=nnx.Rngs(0))
  assert np.all(np.asarray(mm.proj_out.kernel.get_value()) == 0) and np.all(np.asarray(mm.proj_out.bias.get_value()) == 0)
  assert np.abs(np.asarray(mm.proj_in.kernel.get_value())).max() > 0
  x = jax.random.normal(jax.random.key(0), (1, 3, 2, 2, 8))
  np.testing.assert_array_equal(np.asarray(mm(x)), np.asarray(x))  # the identity until trained
  rnd = MotionModule(8, 2, groups=2, zero_init_out=False, rngs=nnx.Rngs(0))
  assert np.abs(np.asarray(rnd.proj_out.kernel.get_value())).max() > 0
  unet = UNet3D(tiny_unet(), rngs=nnx.Rngs(0))
  found = [(p, m) for p, m in nnx.iter_modules(unet) if isinstance(m, MotionModule)]
  assert len(found) == 10  # 2 down blocks x 2 + 2 up blocks x 3
  for _, m in found:
    assert not np.any(np.asarray(m.proj_out.kernel.get_value())) and not np.any(np.asarray(m.proj_out.bias.get_value()))
  abstract = nnx.eval_shape(lambda: UNet3D(tiny_unet(), rngs=nnx.Rngs(0)))  # loading's path: shapes only
  assert abstract.down_blocks[0].motion_modules[0].proj_out.kernel.get_value().shape == (32, 32)


# ------------------------------------------------------------------------------------------ video windows

COLORS = {"red": (220, 20, 20), "green": (20, 220, 20), "blue": (20, 20, 220)}


@pytest.fixture(scope="module")
def pooled_clip(tmp_path_factory):
  """A 40-frame clip (frame i a flat gray 5 + 6 i) with three references, prepared with a frame pool."""
  pytest.importorskip("grain")
  from vcjax.data import builders, loaders
  src = tmp_path_factory.mktemp("pool_src")
  os.makedirs(src / "clip" / "frames")
  for i in range(40):
    Image.fromarray(np.full((16, 16, 3), 5 + 6 * i, np.uint8)).save(src / "clip" / "frames" / f"{i:03d}.png")
  for stem, color in zip(("reference", "reference_1", "reference_2"), COLORS.values()):
    Image.fromarray(np.full((20, 20, 3), color, np.uint8)).save(src / "clip" / f"{stem}.png")
  (src / "clip" / "caption.txt").write_text("a gray clip")
  data_dir = str(tmp_path_factory.mktemp("pool_tfds"))
  info = builders.prepare_video_dataset(str(src), data_dir, "pooled", num_frames=4, frame_stride=3,
                                        size=(16, 16), reference_size=16, num_workers=1)
  return loaders.data_source(info["dataset"], data_dir)[0]


def _color(ref):
  px = ref.reshape(-1, 3)
  px = px[(px < 0.9).any(1)]  # non-white
  return list(COLORS)[int(np.argmax(px.mean(0)))]


def test_each_read_draws_a_window_and_a_reference(pooled_clip, tokenizer):
  from vcjax.data.loaders import VideoReferenceTransform
  from vcjax.data.shp import SHPConfig
  rec = pooled_clip
  # the pool: 2 x 4 frames, stride 3, centred in 40 frames: 9, 12, ..., 30; three references stored
  assert rec["frame_indices"].tolist() == list(range(9, 31, 3)) and rec["frames"].shape == (8, 16, 16, 3)
  assert rec["more_references"].shape == (2, 16, 16, 3)
  still = SHPConfig(cut=(0.0, 0.0), scale=(1.0, 1.0), flip_prob=0.0)
  tf = VideoReferenceTransform(tokenizer, still, num_frames=4, frame_stride=3)
  starts, colors = collections.Counter(), collections.Counter()
  n = 600
  for i in range(n):
    out = tf(rec, np.random.default_rng([3, i]))
    levels = (out["pixels"].reshape(4, -1).mean(1) + 1) * 127.5
    idx = np.round((levels - 5) / 6).astype(int)
    assert np.all(np.diff(idx) == 3) and 0 <= idx[0] and idx[-1] < 40  # the configured stride, in range
    starts[int(idx[0])] += 1
    colors[_color(out["reference"])] += 1
  print(f"{n} reads of one clip: window starts {dict(sorted(starts.items()))}; references drawn {dict(colors)}")
  assert set(starts) == {9, 12, 15, 18, 21}  # every window of 4 strided frames inside the pool
  assert all(abs(c / n - 1 / 5) < 0.06 for c in starts.values())
  assert set(colors) == set(COLORS) and all(abs(c / n - 1 / 3) < 0.07 for c in colors.values())
  a, b = (tf(rec, np.random.default_rng(s))["pixels"] for s in (0, 1))
  assert not np.array_equal(a, b)
  # an older record (one fixed window of 4 frames, one reference, no pool fields) still reads
  old = {k: v for k, v in rec.items() if not k.startswith("more_")}
  old["frames"], old["frame_indices"] = rec["frames"][2:6], rec["frame_indices"][2:6]
  for s in range(5):
    out = tf(old, np.random.default_rng(s))
    np.testing.assert_array_equal(out["pixels"], customcrafter.to_unit_range(old["frames"]))
    assert _color(out["reference"]) == "red"
  # a stride the pool does not hold (a dataset stored at another stride): 4 consecutive stored frames
  other = VideoReferenceTransform(tokenizer, still, num_frames=4, frame_stride=5)
  out = other(rec, np.random.default_rng(0))
  idx = np.round(((out["pixels"].reshape(4, -1).mean(1) + 1) * 127.5 - 5) / 6).astype(int)
  assert np.all(np.diff(idx) == 3)
