"""`python -m vcjax.eval` on written videos and random-weight models equals the metrics computed with
transformers (and the tests' PyTorch RAFT) by the authors' procedure; bad inputs are one-line errors."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from vcjax.testing import randomize_
from vcjax.eval import inputs
from vcjax.eval.__main__ import main
from vcjax.media import write_video

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
raft_torch = pytest.importorskip("tests.raft_torch")

PROMPTS = {"walk": "a bear walking through snow", "beach": "a bear walking along a beach"}


def _moving_frames(rng, n, h, w, speed):
  base = rng.integers(0, 256, (h // 4 + 8, w // 4 + 8 + n * speed, 3), dtype=np.uint8)
  big = np.asarray(Image.fromarray(base).resize((base.shape[1] * 4, base.shape[0] * 4), Image.BICUBIC))
  return np.stack([big[8:8 + h, 8 + 4 * i * speed:8 + 4 * i * speed + w] for i in range(n)])


def write_eval_models(root):
  """Random CLIP (tiny ViT-B/32 architecture) + tokenizer, DINO (tiny ViT) and RAFT (full) under `root`:
  clip/, dino/, raft-things.pth. -> the torch models."""
  from vcjax.testing import write_tokenizer
  # CLIP: ViT-B/32's architecture at tiny sizes, 224-pixel input (what the preprocessing produces).
  torch.manual_seed(0)
  text = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              eos_token_id=2)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                patch_size=56)
  clip = randomize_(transformers.CLIPModel(transformers.CLIPConfig(
      text_config=text, vision_config=vision, projection_dim=16)).eval(), 0)
  clip.save_pretrained(root / "clip", safe_serialization=True)
  write_tokenizer(str(root / "clip"))
  dino = randomize_(transformers.ViTModel(transformers.ViTConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224,
      patch_size=32)).eval(), 1)
  dino.save_pretrained(root / "dino", safe_serialization=True)
  raft = raft_torch.randomized(seed=2)
  raft_torch.save_original_format(raft, root / "raft-things.pth")
  return clip, dino, raft


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  clip, dino, raft = write_eval_models(root)

  videos = root / "videos"
  videos.mkdir()
  rng = np.random.default_rng(0)
  for i, (name, prompt) in enumerate(PROMPTS.items()):
    write_video(str(videos / f"{name}.mp4"), _moving_frames(rng, 3, 128, 128, 2 * i), fps=8)
    ref = root / f"ref_{name}.png"
    Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)).save(ref)
    with open(videos / f"{name}.json", "w") as f:
      json.dump({"config": {"prompt": prompt, "reference": str(ref)}}, f)
  write_video(str(videos / "walk.gif"), _moving_frames(rng, 6, 128, 128, 1), fps=8)  # sample.py's twin: skipped
  (videos / "broken.mp4").write_bytes(b"not a video at all" * 10)
  write_video(str(videos / "still.mp4"), _moving_frames(rng, 1, 128, 128, 0), fps=8)
  write_video(str(videos / "badref.mp4"), _moving_frames(rng, 2, 128, 128, 1), fps=8)
  (root / "notes.txt").write_text("not an image")
  with open(videos / "badref.json", "w") as f:
    json.dump({"config": {"prompt": "x", "reference": str(root / "notes.txt")}}, f)
  return dict(root=root, clip=clip, dino=dino, raft=raft)


def expected(setup, path):
  """The authors' procedure with the PyTorch models, on the frames vcjax decodes."""
  from tests.test_eval_preprocess import clip_processor, dino_processor
  from vcjax.models.tokenizer import load_tokenizer, tokenize
  frames, fps = inputs.read_video(path)
  side = inputs.sidecar(path)
  ref = np.asarray(Image.open(side["config"]["reference"]).convert("RGB"))
  norm = lambda t: (t / t.norm(dim=-1, keepdim=True)).double()
  out = {}
  with torch.no_grad():
    px = torch.from_numpy(clip_processor()(images=list(frames) + [ref], return_tensors="np")["pixel_values"])
    f = norm(getattr(o := setup["clip"].get_image_features(pixel_values=px), "pooler_output", o))
    ids = torch.from_numpy(tokenize(load_tokenizer(str(setup["root"] / "clip")), side["config"]["prompt"],
                                    max_length=77)).long()
    t = norm(getattr(o := setup["clip"].get_text_features(input_ids=ids), "pooler_output", o))
    out["clip_t"] = float(np.mean([torch.cosine_similarity(f[i:i + 1], t).item() for i in range(len(frames))]))
    out["clip_i"] = float(np.mean([torch.cosine_similarity(f[-1:], f[i:i + 1]).item() for i in range(len(frames))]))
    out["t_cons"] = float(np.mean([torch.cosine_similarity(f[i:i + 1], f[i + 1:i + 2]).item()
                                   for i in range(len(frames) - 1)]))
    px = torch.from_numpy(dino_processor()(images=list(frames) + [ref], return_tensors="np")["pixel_values"])
    d = norm(setup["dino"](pixel_values=px).last_hidden_state[:, 0])
    out["dino_i"] = float(np.mean([(d[-1:] @ d[i:i + 1].T).mean().item() for i in range(len(frames))]))
    scores = []
    for a, b in zip(frames[:-1], frames[1:]):
      ta, tb = (torch.from_numpy(x.astype(np.float32).transpose(2, 0, 1))[None] for x in (a, b))
      ta, tb = raft_torch.pad_sintel(ta, tb)
      flo = setup["raft"](ta, tb, iters=20)[0].permute(1, 2, 0).numpy()
      rad = np.sqrt(np.square(flo[..., 0]) + np.square(flo[..., 1])).flatten()
      scores.append(float(np.mean(abs(np.sort(-rad))[:int(rad.size * 0.05)])))
  thres = 4.0 * min(frames.shape[1:3]) / 256.0
  out["flow_top5"] = scores
  out["dd_moving"] = int(sum(s > thres for s in scores) >= round(4 * len(frames) / 16.0))
  return out


@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_command_equals_the_authors_procedure(setup, capsys):
  root = setup["root"]
  out = root / "results.json"
  rc = main(["--videos", str(root / "videos"), "--clip", str(root / "clip"), "--dino", str(root / "dino"),
             "--raft", str(root / "raft-things.pth"), "--raft-batch-per-device", "1", "--out", str(out)])
  captured = capsys.readouterr()
  assert rc == 1  # some inputs were bad
  errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
  assert len(errors) == 3, captured.err
  assert any("broken.mp4" in e and "cannot decode" in e for e in errors)
  assert any("still.mp4" in e and "1 frame" in e for e in errors)
  assert any("notes.txt" in e and "not a readable image" in e for e in errors)
  assert "mean" in captured.out and "walk.mp4" in captured.out

  result = json.loads(out.read_text())
  assert set(result) == {"videos", "mean"}
  rows = {os.path.basename(r["path"]): r for r in result["videos"]}
  assert sorted(rows) == ["beach.mp4", "walk.mp4"]
  for name, row in rows.items():
    want = expected(setup, row["path"])
    assert set(row) == {"path", "clip_t", "clip_i", "dino_i", "t_cons", "dd_moving", "flow_top5"}
    for k in ("clip_t", "clip_i", "dino_i", "t_cons"):
      assert abs(row[k] - want[k]) < 1e-4, (name, k, row[k], want[k])
    assert len(row["flow_top5"]) == 2
    np.testing.assert_allclose(row["flow_top5"], want["flow_top5"], rtol=1e-4, atol=1e-4)
    assert row["dd_moving"] == want["dd_moving"]
  mean = result["mean"]
  for k in ("clip_t", "clip_i", "dino_i", "t_cons"):
    assert mean[k] == pytest.approx(np.mean([r[k] for r in rows.values()]), abs=1e-12)
  assert mean["dd"] == np.mean([r["dd_moving"] for r in rows.values()])


def test_missing_models_and_inputs_leave_metrics_out(setup, tmp_path):
  root = setup["root"]
  videos = tmp_path / "videos"
  videos.mkdir()
  os.link(root / "videos" / "walk.mp4", videos / "walk.mp4")  # no sidecar: no prompt, no reference
  prompts = tmp_path / "prompts.tsv"
  prompts.write_text("walk\ta bear walking through snow\n")
  out = tmp_path / "r.json"
  assert main(["--videos", str(videos), "--clip", str(root / "clip"), "--out", str(out)]) == 0
  row = json.loads(out.read_text())["videos"][0]
  assert set(row) == {"path", "t_cons"}
  assert main(["--videos", str(videos), "--clip", str(root / "clip"), "--prompts", str(prompts),
               "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert set(result["videos"][0]) == {"path", "clip_t", "t_cons"}
  assert set(result["mean"]) == {"clip_t", "t_cons"}


def test_wrong_model_folder_is_one_line(setup, tmp_path, capsys):
  root = setup["root"]
  rc = main(["--videos", str(root / "videos"), "--clip", str(root / "dino"), "--out", str(tmp_path / "r.json")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1
  assert str(root / "dino") in err[0] and "not a CLIP model" in err[0]
  rc = main(["--videos", str(root / "videos"), "--raft", str(root / "clip" / "model.safetensors"),
             "--out", str(tmp_path / "r.json")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "not a RAFT checkpoint" in err[0]
