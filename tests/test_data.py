"""Data: tfds builders (array_record, no TensorFlow), SHP, CustomCrafter augmentation, grain loaders."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

grain = pytest.importorskip("grain")
tfds = pytest.importorskip("tensorflow_datasets")

from vcjax.data import builders, captions, customcrafter, loaders, shp  # noqa: E402

PLACEHOLDER, CLASS_WORD = "<new1>", "dog"


# ------------------------------------------------------------------------------------------ fixtures

def _shape_image(rng, h, w):
  """A random colored background with a random ellipse; returns (image, mask of the ellipse)."""
  bg = tuple(int(v) for v in rng.integers(0, 200, 3))
  fg = tuple(int(v) for v in rng.integers(0, 200, 3))
  img, mask = Image.new("RGB", (w, h), bg), Image.new("L", (w, h), 0)
  x0, y0 = int(rng.integers(2, w // 3)), int(rng.integers(2, h // 3))
  x1, y1 = int(rng.integers(2 * w // 3, w - 2)), int(rng.integers(2 * h // 3, h - 2))
  ImageDraw.Draw(img).ellipse((x0, y0, x1, y1), fill=fg)
  ImageDraw.Draw(mask).ellipse((x0, y0, x1, y1), fill=255)
  return img, mask


def _write_video(path, frames):
  import imageio_ffmpeg
  h, w = frames.shape[1:3]
  writer = imageio_ffmpeg.write_frames(path, (w, h), fps=8, quality=10, macro_block_size=16)
  writer.send(None)
  for f in frames:
    writer.send(np.ascontiguousarray(f))
  writer.close()


def _level_frames(n, h, w):
  """Frame i is a flat gray of level 20 + 10 i (so a decoded frame tells its index), with a dark box."""
  frames = np.empty((n, h, w, 3), np.uint8)
  for i in range(n):
    frames[i] = 20 + 10 * i
  return frames


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from vcjax.testing import write_tokenizer
  from vcjax.models.tokenizer import load_tokenizer
  folder = str(tmp_path_factory.mktemp("tok"))
  write_tokenizer(folder)
  return load_tokenizer(folder)


@pytest.fixture(scope="module")
def subject_data(tmp_path_factory):
  rng = np.random.default_rng(0)
  src = tmp_path_factory.mktemp("subject_src")
  os.makedirs(src / "masks")
  os.makedirs(src / "class")
  for i, (h, w) in enumerate([(60, 80), (96, 64), (70, 70), (50, 90)]):
    img, mask = _shape_image(rng, h, w)
    img.save(src / f"img{i}.{'png' if i % 2 else 'jpg'}", quality=95)
    if i != 3:  # img3 has no mask.
      mask.save(src / "masks" / f"img{i}.png")
  (src / "img0.txt").write_text("a photo of my dog\n")
  buf = io.BytesIO()
  _shape_image(rng, 64, 64)[0].save(buf, format="JPEG")
  (src / "corrupt.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 7 // 10])  # Truncated JPEG.
  (src / "empty.png").write_bytes(b"")
  for i in range(3):
    _shape_image(rng, 64, 48)[0].save(src / "class" / f"c{i}.jpg")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  info = builders.prepare_subject_dataset(str(src), data_dir, name="dog", image_size=64)
  return {"src": src, "data_dir": data_dir, "info": info}


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
  src = tmp_path_factory.mktemp("video_src")
  rng = np.random.default_rng(1)
  os.makedirs(src / "clip_a")
  _write_video(str(src / "clip_a" / "video.mp4"), _level_frames(20, 64, 64))
  (src / "clip_a" / "caption.txt").write_text("a man talks\na man smiles\n")
  mask = np.zeros((64, 64), np.uint8)
  mask[16:48, 20:44] = 255
  Image.fromarray(mask).save(src / "clip_a" / "mask.png")
  os.makedirs(src / "clip_b" / "frames")
  for i, f in enumerate(_level_frames(12, 48, 64)):
    Image.fromarray(f).save(src / "clip_b" / "frames" / f"{i:04d}.png")
  img, m = _shape_image(rng, 80, 60)
  img.save(src / "clip_b" / "reference.png")
  m.save(src / "clip_b" / "mask.png")
  (src / "clip_b" / "caption.txt").write_text("a red ball")
  os.makedirs(src / "clip_short")
  _write_video(str(src / "clip_short" / "video.mp4"), _level_frames(3, 64, 64))
  os.makedirs(src / "clip_bad")
  (src / "clip_bad" / "video.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(rng.integers(0, 256, 500,
                                                                                               dtype=np.uint8)))
  os.makedirs(src / "clip_empty")
  data_dir = str(tmp_path_factory.mktemp("tfds_video"))
  # The default name: it must not clash with the builder's registered config.
  # pool_frames=4: one fixed centre window per clip (the builder's only form before frame pools).
  info = builders.prepare_video_dataset(str(src), data_dir, num_frames=4, frame_stride=3,
                                        size=(32, 48), reference_size=40, num_workers=2, pool_frames=4)
  return {"src": src, "data_dir": data_dir, "info": info}


# ------------------------------------------------------------------------------------------ builders

def test_subject_builder_counts_shapes(subject_data):
  info = subject_data["info"]
  assert info["dataset"] == "vcjax_subject_images/dog"
  assert info["splits"] == {"train": 4, "prior": 3}
  train = info["stats"]["train"]
  assert train["kept"] == 4 and train["skipped"] == 2 and train["reasons"] == {"image": 2}
  assert sorted(f.split(":")[0] for f in train["skipped_files"]) == ["corrupt.jpg", "empty.png"]
  # The counts are also saved with the dataset (metadata.json), and reading back needs no TensorFlow.
  again = builders.prepare_subject_dataset(str(subject_data["src"]), subject_data["data_dir"], name="dog",
                                           image_size=64)
  assert again["stats"]["train"]["skipped"] == 2
  src = loaders.data_source("vcjax_subject_images/dog", subject_data["data_dir"], "train")
  recs = {captions.decode_text(src[i]["name"]): src[i] for i in range(len(src))}
  assert sorted(recs) == ["img0.jpg", "img1.png", "img2.jpg", "img3.png"]
  for name, r in recs.items():
    assert r["image"].shape == (64, 64, 3) and r["image"].dtype == np.uint8
    assert r["mask"].shape == (64, 64) and r["mask"].dtype == np.uint8
    y0, x0, y1, x1 = r["box"]
    assert max(y1 - y0, x1 - x0) == 64
    outside = np.ones((64, 64), bool)
    outside[y0:y1, x0:x1] = False
    assert np.all(r["image"][outside] == 255) and np.all(r["mask"][outside] == 0)
  assert recs["img1.png"]["box"].tolist() == [0, 10, 64, 53]  # 96x64 -> 64x43, left (64 - 43) // 2.
  # img3 (90x50, no mask file): the whole image is the subject -> 255 on its box [14, 50) x [0, 64).
  assert not recs["img3.png"]["has_mask"] and recs["img3.png"]["box"].tolist() == [14, 0, 50, 64]
  assert np.all(recs["img3.png"]["mask"][14:50] == 255) and np.all(recs["img3.png"]["mask"][:14] == 0)
  assert recs["img0.jpg"]["has_mask"] and 0.2 < (recs["img0.jpg"]["mask"] > 127).mean() < 0.6
  assert captions.decode_text(recs["img0.jpg"]["caption"]) == "a photo of my dog"
  prior = loaders.data_source("vcjax_subject_images/dog", subject_data["data_dir"], "prior")
  assert len(prior) == 3 and prior[0]["image"].shape == (64, 64, 3)


def test_video_builder_counts_shapes(video_data):
  info = video_data["info"]
  assert info["dataset"] == "vcjax_video_clips/videos" and info["splits"] == {"train": 2}
  st = info["stats"]["train"]
  assert st["kept"] == 2 and st["skipped"] == 3
  assert st["reasons"] == {"video": 1, "too_short": 1, "missing": 1}
  src = loaders.data_source(info["dataset"], video_data["data_dir"])
  recs = {captions.decode_text(src[i]["clip_id"]): src[i] for i in range(len(src))}
  a, b = recs["clip_a"], recs["clip_b"]
  for r in (a, b):
    assert r["frames"].shape == (4, 32, 48, 3) and r["frames"].dtype == np.uint8
    assert r["reference"].shape == (40, 40, 3) and r["reference_mask"].shape == (40, 40)
    assert r["has_mask"]
  # 20 frames, stride 3 -> span 10 centered: frames 5, 8, 11, 14 (each frame's gray level tells its index).
  assert a["frame_indices"].tolist() == [5, 8, 11, 14]
  levels = a["frames"].reshape(4, -1).mean(1)
  np.testing.assert_allclose(levels, 20 + 10 * np.array([5, 8, 11, 14]), atol=4)
  # 12 frames: the stride shrinks to 3 -> (12 - 10) // 2 = 1.
  assert b["frame_indices"].tolist() == [1, 4, 7, 10]
  np.testing.assert_allclose(b["frames"].reshape(4, -1).mean(1), 20 + 10 * np.array([1, 4, 7, 10]), atol=1)
  # clip_a has no reference.png: the reference is its first stored frame, mask as given (centered square).
  assert abs(float(a["reference"][20, 20].mean()) - 70) < 5
  assert a["reference_mask"][20, 20] == 255 and a["reference_mask"][2, 2] == 0
  assert b["reference_box"].tolist() == [0, 5, 40, 35]  # 80x60 reference -> 40x30 centered.
  assert captions.decode_text(a["caption"]) == "a man talks\na man smiles"


def test_sample_frame_indices():
  f = builders.sample_frame_indices
  assert f(200, 16, stride=8).tolist() == list(range(39, 160, 8))  # span 121, start (200 - 121) // 2.
  np.testing.assert_array_equal(f(100, 16, sampling="window", window=64),
                                18 + np.round(np.linspace(0, 63, 16)).astype(int))
  assert f(16, 16, stride=8).tolist() == list(range(16))
  with pytest.raises(ValueError):
    f(15, 16)


# ------------------------------------------------------------------------------------------ SHP

def _shp_input():
  rng = np.random.default_rng(3)
  img, mask = _shape_image(rng, 90, 70)
  return np.asarray(img), np.asarray(mask)


def _dilate(mask, r):
  m = mask > 0
  out = m.copy()
  for dy in range(-r, r + 1):
    for dx in range(-r, r + 1):
      out |= np.roll(np.roll(m, dy, 0), dx, 1)
  return out


@pytest.mark.parametrize("preset", ["object", "human"])
def test_shp_properties(preset):
  image, mask = _shp_input()
  cfg = shp.SHP_PRESETS[preset]
  out, out_mask = shp.subject_highlight(image, mask, np.random.default_rng(7), 48, cfg)
  assert out.shape == (48, 48, 3) and out.dtype == np.uint8 and out_mask.shape == (48, 48)
  assert np.all(out[out_mask == 0] == 255)  # Everything outside the (transformed) subject is white.
  assert np.all(out[~_dilate(out_mask, 1)] == 255)
  assert 0.05 < (out_mask > 127).mean() < 0.95 and (out < 250).any()
  same, _ = shp.subject_highlight(image, mask, np.random.default_rng(7), 48, cfg)
  other, _ = shp.subject_highlight(image, mask, np.random.default_rng(8), 48, cfg)
  np.testing.assert_array_equal(out, same)
  assert np.abs(out.astype(int) - other.astype(int)).mean() > 1.0


def test_shp_box_crop_and_cut():
  image, mask = _shp_input()
  box = shp.subject_box(mask)
  still = shp.SHPConfig(cut=(0.0, 0.0), scale=(1.0, 1.0), flip_prob=0.0)
  out, out_mask = shp.subject_highlight(image, mask, np.random.default_rng(0), 64, still)
  # The subject box fills the square along its longer side.
  h, w = box[2] - box[0], box[3] - box[1]
  rows = np.flatnonzero((out_mask > 127).any(1))
  cols = np.flatnonzero((out_mask > 127).any(0))
  long_extent = (rows[-1] - rows[0] + 1) if h >= w else (cols[-1] - cols[0] + 1)
  assert long_extent >= 62
  # A 10-20% cut removes that much of one side.
  rng = np.random.default_rng(5)
  cut = shp.cut_one_side(box, rng, (0.1, 0.2))
  dh, dw = (box[2] - box[0]) - (cut[2] - cut[0]), (box[3] - box[1]) - (cut[3] - cut[1])
  assert (dh == 0) != (dw == 0)
  frac = max(dh / h, dw / w)
  assert 0.08 <= frac <= 0.2
  # Without a mask the whole valid area is the subject: nothing is whitened inside it.
  full, _ = shp.subject_highlight(image, None, np.random.default_rng(0), 64, still)
  assert (full < 250).mean() > 0.5


# ------------------------------------------------------------------------------------------ CustomCrafter

def test_rescale_augment_prefix_and_mask():
  image = np.full((64, 64, 3), 255, np.uint8)
  image[:, 8:56] = 200  # Stored with white padding at left/right: valid box x in [8, 56).
  valid = np.zeros((64, 64), bool)
  valid[:, 8:56] = True
  cfg = customcrafter.RescaleConfig()
  seen = set()
  for seed in range(60):
    px, m, prefix, branch, scale = customcrafter.rescale_augment(image, valid, np.random.default_rng(seed), 32,
                                                                 cfg)
    assert px.shape == (32, 32, 3) and px.dtype == np.float32 and m.shape == (32, 32)
    assert -1.0 <= px.min() and px.max() <= 1.0 and set(np.unique(m)) <= {0.0, 1.0}
    if branch == "out":
      assert 0.3 <= scale <= 1.0
      assert (prefix in captions.FAR_PREFIXES) == (scale < 0.6) and (prefix == "") == (scale >= 0.6)
      side = round(scale * 32)
      assert abs(m.sum() - side * side * 0.75) <= 2 * side  # 3/4 of the pasted square is real content.
      # The paste canvas (pad_value 0) covers exactly the rest of the output.
      assert (px[..., 0] == 0.0).sum() == 32 * 32 - side * side
    else:
      assert branch == "in" and 1.2 <= scale <= 1.4 and prefix in captions.NEAR_PREFIXES
      assert not (px[..., 0] == 0.0).any()
    # Outside the loss mask: canvas (0) or the stored white padding (~1), never content mistaken for padding.
    off = px[m == 0][:, 0]
    assert np.all((off == 0.0) | (off > 0.55))
    # Where the mask is on (away from its edge, which resampling blends), pixels are content: 200 -> 0.5686.
    inner = ~_dilate(m == 0, 2)
    np.testing.assert_allclose(px[inner], 200 / 127.5 - 1, atol=0.02)
    assert inner.sum() >= 0.3 * m.sum() - 4 * 32
    seen.add((branch, prefix != ""))
  assert seen == {("out", True), ("out", False), ("in", True)}
  m = np.zeros((2, 4, 16, 16, 1), np.float32)
  m[..., 3:13, 0:8, :] = 1
  lat = customcrafter.downsample_mask(m, 8)
  assert lat.shape == (2, 4, 2, 2, 1) and lat[0, 0, :, :, 0].tolist() == [[0, 0], [0, 0]]
  assert customcrafter.downsample_mask(m, 8, "any")[0, 0, :, :, 0].tolist() == [[1, 0], [1, 0]]
  np.testing.assert_allclose(customcrafter.downsample_mask(m, 8, "mean")[0, 0, :, 0, 0], [5 / 8, 5 / 8])
  px0 = customcrafter.rescale_augment(image, valid, np.random.default_rng(1), 32, cfg)
  px1 = customcrafter.rescale_augment(image, valid, np.random.default_rng(1), 32, cfg)
  np.testing.assert_array_equal(px0[0], px1[0])


# ------------------------------------------------------------------------------------------ loaders

def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_customcrafter_loader_batches_and_resume(subject_data, tokenizer):
  # The paper's rescale and no caption dropout (the defaults before the authors' became them).
  kw = dict(dataset="vcjax_subject_images/dog", shard=grain.sharding.NoSharding(), size=32,
            class_word=CLASS_WORD, placeholder=PLACEHOLDER, num_threads=2, rescale="paper", caption_dropout=0.0)
  it = loaders.make_loader("customcrafter", subject_data["data_dir"], 2, 42, tokenizer, **kw)
  first = _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  b = first[0]
  assert b["pixels"].shape == (2, 4, 32, 32, 3) and b["pixels"].dtype == np.float32
  assert b["mask"].shape == (2, 4, 32, 32, 1) and b["mask"].dtype == np.float32
  assert b["input_ids"].shape == (2, 77) and b["input_ids"].dtype == np.int32
  for batch in first + expected:
    assert batch["is_prior"].tolist() == [False, True]  # Subject and class images alternate.
    assert -1.0 <= batch["pixels"].min() and batch["pixels"].max() <= 1.0
    subj = str(batch["caption"][0])
    assert f"{PLACEHOLDER} {CLASS_WORD}" in subj and PLACEHOLDER not in str(batch["caption"][1])
    assert np.all(batch["pixels"][:, 0] == batch["pixels"][:, 3])  # Static clips.
  # Resume: a fresh loader set to the saved state yields the same batches, bit-exactly.
  fresh = loaders.make_loader("customcrafter", subject_data["data_dir"], 2, 42, tokenizer, **kw)
  fresh.set_state(json.loads(json.dumps(state)))  # The state is plain JSON (saved with checkpoints).
  _assert_batches_equal(_take(fresh, 2), expected)
  other = loaders.make_loader("customcrafter", subject_data["data_dir"], 2, 43, tokenizer, **kw)
  assert not np.array_equal(next(other)["pixels"], first[0]["pixels"])


def test_videomaker_loader_batches_and_resume(video_data, tokenizer):
  kw = dict(dataset="vcjax_video_clips/videos", shard=grain.sharding.NoSharding(), num_threads=1)
  it = loaders.make_loader("videomaker", video_data["data_dir"], 1, 0, tokenizer, **kw)
  first = _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  b = first[0]
  assert b["pixels"].shape == (1, 4, 32, 48, 3) and b["mask"].shape == (1, 4, 32, 48, 1)
  assert b["reference"].shape == (1, 32, 48, 3) and b["input_ids"].shape == (1, 77)
  for batch in first + expected:
    assert -1.0 <= batch["reference"].min() and batch["reference"].max() <= 1.0
    assert np.all(batch["reference"][:, :, :8] == 1.0)  # Letterbox + background: white.
    assert str(batch["caption"][0]) in ("a man talks", "a man smiles", "a red ball")
  fresh = loaders.make_loader("videomaker", video_data["data_dir"], 1, 0, tokenizer, **kw)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 2), expected)


def test_sharding_disjoint(subject_data, video_data):
  src = loaders.data_source("vcjax_subject_images/dog", subject_data["data_dir"], "train")
  for epoch_len, n in ((2, 4),):
    shards = []
    for i in range(2):
      ds = loaders.sharded_records(src, 5, grain.sharding.ShardOptions(i, 2, drop_remainder=True))
      names = [captions.decode_text(ds[k]["name"]) for k in range(3 * epoch_len)]
      shards.append([names[e * epoch_len:(e + 1) * epoch_len] for e in range(3)])
    for e in range(3):  # Each epoch: the two processes read disjoint records covering the split.
      a, b = set(shards[0][e]), set(shards[1][e])
      assert not a & b and len(a | b) == n
    assert len({tuple(s) for s in shards[0]}) > 1  # A new permutation each epoch.
  vsrc = loaders.data_source("vcjax_video_clips/videos", video_data["data_dir"])
  ids = [captions.decode_text(loaders.sharded_records(vsrc, 0, grain.sharding.ShardOptions(i, 2))[0]["clip_id"])
         for i in range(2)]
  assert len(set(ids)) == 2
