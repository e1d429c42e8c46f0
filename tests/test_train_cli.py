"""The README's training commands on tiny real data: prepare a video dataset from a folder, train GIRL
with train.py, and load the exported UNet in diffusers (round trip of the export)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # prepare + train.py subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_clips(src, n=2, frames=6, size=32):
  rng = np.random.default_rng(0)
  for i in range(n):
    clip = src / f"clip{i}"
    os.makedirs(clip / "frames")
    for f in range(frames):
      Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(clip / "frames" / f"{f:03d}.png")
    (clip / "caption.txt").write_text(f"a video of thing {i}\n")


def test_prepare_train_girl_and_export_round_trip(converted, tmp_path):
  from vcjax.data.prepare import main as prepare
  write_clips(tmp_path / "clips")
  assert prepare(["videos", "--src", str(tmp_path / "clips"), "--data-dir", str(tmp_path / "data"),
                  "--frames", "3", "--stride", "2", "--size", "32", "--image-size", "32"]) == 0
  work = tmp_path / "run"
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/train_tiny_girl.py"),
         "--workdir", str(work), f"--config.model={converted}", "--config.num_steps=2", "--config.batch_size=2",
         "--config.optimizer.lr_multipliers=attn1/to_[qkv]=2,motion_modules=0.5",
         "--config.timestep_bias_strategy=later", "--config.timestep_bias_multiplier=3", "--config.data.kind=folder", f"--config.data.dir={tmp_path / 'data'}", "--config.data.num_threads=1"]
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device: the tiny batch of 2 is not split 8 ways
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)

  # The exported UNet loads in diffusers and computes what vcjax computes with the trained weights.
  from diffusers import UNetMotionModel
  from tests.reference import rel_err, run_both
  from vcjax.loading import load_unet
  from vcjax.weights import sources, store
  ref = UNetMotionModel.from_pretrained(str(work / "final" / "unet_diffusers")).eval()
  unet = load_unet(converted)
  params = store.flat_params(unet)
  trained = sources.read_state_dict(str(work / "final" / "trainable.safetensors"))
  for key, value in trained.items():
    name = key.removeprefix("unet.").removesuffix(".value")
    assert name in params, key
    assert not np.array_equal(params[name], value)  # it did train
    params[name] = value
  store.set_params(unet, params)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 4, 2, 8, 8)).astype(np.float32)
  ctx = rng.standard_normal((1, 77, 32)).astype(np.float32)
  assert rel_err(*run_both(ref, unet, x, np.array([50]), ctx)) <= 1e-5
  # final/model: the base folder with the trained UNet, what sample.py --config.model= reads.
  exported = store.flat_params(load_unet(str(work / "final" / "model")))
  assert exported.keys() == params.keys()
  assert all(np.array_equal(exported[k], params[k]) for k in params)
  base_vae = open(os.path.join(converted, "vae.safetensors"), "rb").read()
  assert open(work / "final" / "model" / "vae.safetensors", "rb").read() == base_vae
