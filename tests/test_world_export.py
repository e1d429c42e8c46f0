"""The world exported through the tfds builders and read back through the grain loaders (tiny sizes)."""

import json

import numpy as np
import pytest

grain = pytest.importorskip("grain")
tfds = pytest.importorskip("tensorflow_datasets")

from vcjax.data import builders, loaders  # noqa: E402
from vcjax.world import HELD_OUT, WorldConfig, export, parse_caption, sample_clip, still_image  # noqa: E402

CFG = WorldConfig(size=32, frames=4, seed=11)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from vcjax.testing import write_tokenizer
  from vcjax.models.tokenizer import load_tokenizer
  folder = str(tmp_path_factory.mktemp("tok"))
  write_tokenizer(folder)
  return load_tokenizer(folder)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("world_tfds"))
  infos = {
      "t2v": export.export("t2v", out, config=CFG, num=6, start=3),
      "girl": export.export("girl", out, config=CFG, num=4, split="heldout"),
      "subject": export.export("subject", out, config=CFG, num=4, subject=9, num_prior=3),
  }
  return out, infos


def test_t2v_records_equal_the_world(data_dir):
  out, infos = data_dir
  assert infos["t2v"]["dataset"] == "vcjax_video_clips/world_t2v" and infos["t2v"]["splits"] == {"train": 6}
  src = loaders.data_source("vcjax_video_clips/world_t2v", out)
  seen = set()
  for r in (src[i] for i in range(len(src))):
    clip_id = r["clip_id"].decode()
    index = int(clip_id.split("_")[1])
    seen.add(index)
    clip = sample_clip(CFG, index, "train")
    np.testing.assert_array_equal(r["frames"], clip.frames)
    np.testing.assert_array_equal(r["masks"], clip.masks.astype(np.uint8) * 255)
    np.testing.assert_array_equal(r["boxes"], clip.boxes)
    np.testing.assert_array_equal(r["reference"], clip.frames[0])
    np.testing.assert_array_equal(r["reference_mask"] >= 128, clip.masks[0])
    assert r["caption"].decode() == clip.caption and bool(r["has_mask"])
    np.testing.assert_array_equal(r["frame_indices"], np.arange(CFG.frames))
  assert seen == set(range(3, 9))


def test_girl_reference_is_another_render(data_dir):
  out, _ = data_dir
  src = loaders.data_source("vcjax_video_clips/world_girl", out)
  for r in (src[i] for i in range(len(src))):
    index = int(r["clip_id"].decode().split("_")[1])
    clip = sample_clip(CFG, index, "heldout")
    assert clip.attrs.combo in HELD_OUT
    ref = still_image(CFG, index, clip.attrs.combo, "heldout", stream="reference")
    np.testing.assert_array_equal(r["reference"], ref.frames[0])
    np.testing.assert_array_equal(r["reference_mask"] >= 128, ref.masks[0])
    assert not np.array_equal(r["reference"], r["frames"][0])
    assert parse_caption(CFG, ref.caption)["shape"] == clip.attrs.shape


def test_video_transform_carries_the_drawn_frames_subject_masks(data_dir, tokenizer):
  """A with_tracks record's per-frame masks come out as subject_mask for exactly the frames drawn."""
  out, _ = data_dir
  record = loaders.data_source("vcjax_video_clips/world_t2v", out)[2]
  transform = loaders.VideoReferenceTransform(tokenizer, num_frames=3, frame_stride=1)
  got = transform(record, np.random.default_rng(5))
  indices = np.asarray(record.get("frame_indices", np.arange(len(record["frames"]))))
  positions = loaders.window_positions(indices, 3, np.random.default_rng(5), stride=1)
  assert got["subject_mask"].shape == (3, 32, 32, 1) and got["subject_mask"].dtype == np.float32
  np.testing.assert_array_equal(got["subject_mask"][..., 0], record["masks"][positions] > 127)
  np.testing.assert_array_equal(got["pixels"], loaders.to_unit_range(record["frames"][positions]))
  assert got["subject_mask"].sum() > 0
  record = dict(record)
  del record["masks"]  # datasets without tracks (a clip folder's) give no subject_mask
  assert "subject_mask" not in transform(record, np.random.default_rng(5))


def test_videomaker_loader_reads_world(data_dir, tokenizer):
  out, _ = data_dir
  kw = dict(dataset="vcjax_video_clips/world_girl", shard=grain.sharding.NoSharding(), num_threads=1)
  it = loaders.make_loader("videomaker", out, 2, 0, tokenizer, **kw)
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  nxt = next(it)
  b = first[0]
  assert b["pixels"].shape == (2, 4, 32, 32, 3) and b["reference"].shape == (2, 32, 32, 3)
  assert b["input_ids"].shape == (2, 77)
  for batch in first + [nxt]:
    assert -1.0 <= batch["pixels"].min() and batch["pixels"].max() <= 1.0
    for cap in batch["caption"]:
      assert parse_caption(CFG, str(cap))["motion"]  # World captions survive the loader.
  # SHP whitened the textured background around the sprite (a box crop, so a square may fill it).
  white = [np.all(r == 1.0, -1).mean() for batch in first + [nxt] for r in batch["reference"]]
  assert np.mean(np.asarray(white) > 0.05) >= 0.5, white
  fresh = loaders.make_loader("videomaker", out, 2, 0, tokenizer, **kw)
  fresh.set_state(json.loads(json.dumps(state)))
  np.testing.assert_array_equal(next(fresh)["pixels"], nxt["pixels"])


def test_subject_export_and_customcrafter_loader(data_dir, tokenizer):
  out, infos = data_dir
  info = infos["subject"]
  assert info["combo"] == list(HELD_OUT[9]) and info["splits"] == {"train": 4, "prior": 3}
  shape = HELD_OUT[9][0]
  src = loaders.data_source("vcjax_subject_images/world_subject", out, "train")
  for r in (src[i] for i in range(len(src))):
    attrs = parse_caption(CFG, r["caption"].decode())
    assert (attrs["shape"], attrs["pattern"], attrs["colour"]) == HELD_OUT[9] and attrs["motion"] == "still"
    assert bool(r["has_mask"]) and r["mask"].max() == 255 and r["image"].shape == (32, 32, 3)
  prior = loaders.data_source("vcjax_subject_images/world_subject", out, "prior")
  for r in (prior[i] for i in range(len(prior))):
    attrs = parse_caption(CFG, r["caption"].decode())
    assert attrs["shape"] == shape and (attrs["shape"], attrs["pattern"], attrs["colour"]) not in HELD_OUT
  it = loaders.make_loader("customcrafter", out, 2, 0, tokenizer, dataset="vcjax_subject_images/world_subject",
                            shard=grain.sharding.NoSharding(), size=32, class_word=shape, num_threads=1)
  b = next(it)
  assert b["pixels"].shape == (2, 4, 32, 32, 3) and b["is_prior"].tolist() == [False, True]
  assert f"<new1> {shape}" in str(b["caption"][0])


def test_customization_captions_and_unaugmented_subject_loader(tmp_path, tokenizer):
  """--placeholder: the subject named by its token, the class images without appearance; --captions bare
  for GIRL clips. The loader with use_captions and rescale "none" gives each record's caption and pixels."""
  out = str(tmp_path)
  export.export("subject", out, config=CFG, num=3, subject=2, num_prior=2, name="tok", placeholder="<new1>")
  export.export("girl", out, config=CFG, num=2, name="bare", bare_captions=True)
  shape = HELD_OUT[2][0]
  src = loaders.data_source("vcjax_subject_images/tok", out, "train")
  for r in (src[i] for i in range(len(src))):
    attrs = parse_caption(CFG, r["caption"].decode(), placeholder="<new1>")
    assert attrs["subject"] == "<new1>" and attrs["shape"] == shape and attrs["pattern"] is None
  prior = loaders.data_source("vcjax_subject_images/tok", out, "prior")
  assert all(parse_caption(CFG, prior[i]["caption"].decode())["colour"] is None for i in range(2))
  clip = loaders.data_source("vcjax_video_clips/bare", out)[1]
  want = sample_clip(CFG, 1)
  assert clip["caption"].decode() == export.captions.caption(CFG, want.attrs, subject="")
  it = loaders.make_loader("customcrafter", out, 2, 0, tokenizer, dataset="vcjax_subject_images/tok",
                            shard=grain.sharding.NoSharding(), size=32, class_word=shape, num_threads=1,
                            rescale="none", use_captions=True, caption_dropout=0.0)
  b = next(it)
  records = {r["caption"].decode(): r["image"] for r in (src[i] for i in range(3))}
  records.update({r["caption"].decode(): r["image"] for r in (prior[i] for i in range(2))})
  for caption, pixels in zip(b["caption"], b["pixels"]):
    image = records[str(caption)]  # the record's own caption, no prefix
    np.testing.assert_allclose(pixels[0], image / 127.5 - 1, atol=1e-6)  # no rescale, no flip


def test_cli_and_builder_defaults(tmp_path, capsys):
  out = str(tmp_path / "d")
  assert export.main(["--out", out, "--kind", "t2v", "--num", "2", "--size", "16", "--frames", "3",
                      "--name", "cli", "--split", "heldout"]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # tfds prints before it.
  assert printed["dataset"] == "vcjax_video_clips/cli" and printed["splits"] == {"train": 2}
  r = loaders.data_source("vcjax_video_clips/cli", out)[0]
  assert r["frames"].shape == (3, 16, 16, 3) and r["masks"].shape == (3, 16, 16)
  assert export.main(["--out", out, "--kind", "subject", "--subject", "star,dotted"]) == 1
  # Folder datasets cannot carry tracks; the builders' folder defaults are unchanged (no tracks).
  with pytest.raises(ValueError, match="with_tracks"):
    builders.prepare_video_dataset(str(tmp_path), out, "x", with_tracks=True)
  assert not builders.VideoClipsConfig(name="x").with_tracks
  assert builders.VideoClipsConfig(name="x").encoding == "none"


def test_export_past_tfds_memory_buffer_needs_no_tensorflow(tmp_path, monkeypatch):
  """tfds spills a split larger than its in-memory shuffle buffer (1 GB) to files through tf.io.gfile, i.e.
  TensorFlow, which vcjax does not install (a 20k-clip world failed so). With the buffer shrunk to 1 byte,
  a small export must still succeed and read back in full."""
  from tensorflow_datasets.core import shuffle
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1)
  info = export.export("t2v", str(tmp_path), config=CFG, num=3, encoding="zlib")
  assert info["splits"] == {"train": 3} and shuffle.MAX_MEM_BUFFER_SIZE == 1
  src = loaders.data_source(info["dataset"], str(tmp_path))
  assert sorted(int(np.asarray(r["frames"]).shape[0]) for r in src) == [4, 4, 4]
