"""`python -m vcjax.eval.protocol` end to end on the tiny random AnimateDiff model: samples the VideoMaker
evaluation prompts for each reference with sample.py, then scores them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vcjax.eval.protocol import read_prompt_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prompt_sets():
  human, objects = read_prompt_set("human"), read_prompt_set("object")
  assert len(human) == 25 and len(objects) == 90
  assert human[3] == "A person wearing a Superman outfit."
  bears = read_prompt_set("object", category="bear")
  assert len(bears) == 10 and bears[0] == "A bear walking through a snowy landscape."
  assert read_prompt_set("human", limit=2) == human[:2]
  with pytest.raises(ValueError, match="no prompts of category"):
    read_prompt_set("object", category="unicorn")


@pytest.mark.slow  # sample + score subprocess
def test_protocol_end_to_end(converted, tmp_path):
  pytest.importorskip("torch")
  from tests.test_eval_command import write_eval_models
  write_eval_models(tmp_path)
  refs = tmp_path / "refs"
  refs.mkdir()
  rng = np.random.default_rng(0)
  for name in ("alice",):
    Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)).save(refs / f"{name}.png")
  out = tmp_path / "run"
  cmd = [sys.executable, "-m", "vcjax.eval.protocol", "--config", os.path.join(ROOT, "configs/sample_videomaker.py"),
         f"--config.model={converted}", "--config.height=128", "--config.width=128", "--config.num_frames=3",
         "--config.steps=2", f"--references={refs}", "--prompts=human", "--limit=2",
         f"--clip={tmp_path / 'clip'}", f"--dino={tmp_path / 'dino'}", f"--raft={tmp_path / 'raft-things.pth'}",
         f"--out={out}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")  # still split, less overhead
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.load(open(out / "results.json"))
  names = sorted(os.path.basename(r["path"]) for r in result["videos"])
  assert names == ["alice_0.mp4", "alice_1.mp4"]
  prompts = read_prompt_set("human", limit=2)
  for row in result["videos"]:
    assert set(row) == {"path", "clip_t", "clip_i", "dino_i", "t_cons", "dd_moving", "flow_top5"}
    assert all(np.isfinite(row[k]) for k in ("clip_t", "clip_i", "dino_i", "t_cons"))
    assert len(row["flow_top5"]) == 2
    side = json.load(open(os.path.splitext(row["path"])[0] + ".json"))
    stem = os.path.basename(row["path"]).split("_")[0]
    assert side["config"]["reference"] == str(refs / f"{stem}.png")  # VideoMaker samples from the reference
    assert side["prompt"] == prompts[int(os.path.basename(row["path"])[-5])]
  assert set(result["mean"]) == {"clip_t", "clip_i", "dino_i", "t_cons", "dd"}
