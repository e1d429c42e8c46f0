"""E2's claim commands (vcjax/world/claims.py): prompts, references and the tables, on a tiny random model."""

import json

import numpy as np
import pytest

from vcjax.world import claims, motion, parse_caption
from vcjax.world.config import WorldConfig

WORLD = WorldConfig()


def test_subject_prompts_pin_the_sprite_and_cycle_the_directions():
  attrs = claims.subject_prompts(WORLD, 9, 10, moving_only=True)
  assert all(a.combo == WORLD.held_out[9] for a in attrs)
  moves = [a.motion for a in attrs]
  assert all(motion.MOTIONS[m].kind == "translate" for m in moves) and len(set(moves[:8])) == 8
  assert claims.subject_prompts(WORLD, 9, 10, moving_only=True) == attrs  # deterministic
  anything = claims.subject_prompts(WORLD, 3, 30)
  assert len({a.motion for a in anything}) > 4 and all(a.combo == WORLD.held_out[3] for a in anything)


def test_prompt_forms_leave_the_appearance_to_the_token_or_the_reference():
  a = claims.subject_prompts(WORLD, 0, 1)[0]
  shape, pattern, colour = WORLD.held_out[0]
  text, token, ref = (claims.prompt_text(WORLD, a, f) for f in ("text", "token", "reference"))
  assert parse_caption(WORLD, text)["colour"] == colour
  assert parse_caption(WORLD, token, placeholder=claims.TOKEN)["subject"] == claims.TOKEN
  assert colour not in ref.split() and parse_caption(WORLD, ref)["shape"] == shape


def test_reference_image_is_the_sprite_on_white():
  ref = claims.reference_image(WORLD, 9, 64)
  assert ref.shape == (64, 64, 3) and ref.dtype == np.float32 and ref.min() >= -1 and ref.max() <= 1
  np.testing.assert_array_equal(ref, claims.reference_image(WORLD, 9, 64))
  white = (ref == 1.0).all(-1)
  assert 0.3 < white.mean() < 0.9  # the sprite cut to its box, the rest white
  assert np.median(ref[~white]) < -0.8  # held-out sprite 9 is a solid black star (its edges blend to white)


@pytest.mark.slow  # samples 16 tiny videos
def test_claim_commands_on_a_tiny_model(converted, tmp_path):
  from tests.test_sample_cli import lora_file
  lora = lora_file(converted, tmp_path / "lora.safetensors")
  common = ["--model", converted, "--subjects", "9,2", "--num-prompts", "1", "--seeds", "0", "--steps", "2",
            "--batch", "2", "--size", "32", "--frames", "4"]
  assert claims.main(["zero-shot", "--girl", converted, "--lora", lora, *common, "--save-videos",
                      "--out", str(tmp_path / "zs")]) == 0
  sidecar = json.loads((tmp_path / "zs_videos" / "row1" / "video_0000.json").read_text())
  assert "<new1> star" in sidecar["prompt"] and "<new1>" not in sidecar["caption"]
  result = json.loads((tmp_path / "zs.json").read_text())
  assert [r["condition"]["form"] for r in result["runs"]] == ["reference", "token", "text"]
  for run in result["runs"]:
    assert run["result"]["num_videos"] == 2 and run["result"]["counts"]["colour_accuracy"] == 2
    for row, subject in zip(run["result"]["videos"], (9, 2)):  # scored against the full caption
      assert (row["target"]["shape"], row["target"]["pattern"], row["target"]["colour"]) == WORLD.held_out[subject]
  table = (tmp_path / "zs.md").read_text()
  assert table.count("\n| ") == 4 and "fidelity" in table and "VideoMaker" in table
  with pytest.raises(SystemExit):
    claims.main(["girl", "--out", str(tmp_path / "g")])  # needs --girl


def test_the_tables_rows():
  """Each claim's conditions (the slow test samples one table; the others differ only in these rows)."""
  import argparse
  args = argparse.Namespace(model="base", lora="lora.safetensors", girl="girl", girl_fixed_motion="fixed")
  rows, moving = claims.conditions_for("dynamic-weighting", args)
  assert moving and [r.schedule for r in rows] == ["paper", "authors", "constant:0.4", "constant:0.8",
                                                   "constant:1.0"]
  assert all((r.model, r.form, r.lora) == ("base", "token", "lora.safetensors") for r in rows)
  rows, moving = claims.conditions_for("girl", args)
  assert not moving and [(r.model, r.form) for r in rows] == [("base", "reference"), ("girl", "reference"),
                                                              ("fixed", "reference")]
  with pytest.raises(ValueError, match="needs a subject LoRA"):
    claims.Condition("x", "base", "token")


def test_lora_files_one_for_all_or_one_per_subject():
  assert claims.lora_files("a.safetensors", [9, 0]) == {9: "a.safetensors", 0: "a.safetensors"}
  assert claims.lora_files("9=runs/a.safetensors, 0=b.safetensors", [9, 0]) == {9: "runs/a.safetensors",
                                                                                0: "b.safetensors"}
  with pytest.raises(ValueError, match=r"subjects \[0\] have no LoRA"):
    claims.lora_files("9=a.safetensors", [9, 0])
  with pytest.raises(ValueError, match=r"subjects \[12\], which --subjects does not list"):
    claims.lora_files("9=a,0=b,12=c", [9, 0])
  with pytest.raises(ValueError, match="SUBJECT=FILE"):
    claims.lora_files("nine=a", [9])
  assert claims.main(["dynamic-weighting", "--lora", "9=a", "--subjects", "9,0", "--out", "x"]) == 1


def test_each_subject_is_sampled_through_its_own_lora(monkeypatch):
  """run_condition with "SUBJECT=FILE,...": subject s's prompts go to the pipeline that loaded s's file,
  are scored against s's full caption, and a second condition reuses the loaded pipelines."""
  from vcjax import pipeline
  from vcjax.world import evaluate, probe
  world = WorldConfig(size=32, frames=4)
  loaded, calls = [], []

  class FakePipe:
    def __init__(self):
      self.lora = None

    def load_lora(self, path):
      self.lora = path
      loaded.append(path)

  def fake_videos(pipe, prompts, seeds, **kw):
    calls.append((pipe.lora, list(prompts), kw["lora_scales"]))
    for s in seeds:
      for i, p in enumerate(prompts):
        yield dict(prompt=p, seed=s, index=i, frames=np.zeros((4, 32, 32, 3), np.uint8))

  monkeypatch.setattr(pipeline.VideoPipeline, "from_pretrained", staticmethod(lambda path: FakePipe()))
  monkeypatch.setattr(evaluate, "generated_videos", fake_videos)
  kw = dict(num_prompts=2, seeds=[0, 1], steps=10, guidance_scale=4.0, batch=2, probe_model=probe.load_probe(),
            moving_only=True, log=lambda s: None)
  pipes = {}
  runs = [claims.run_condition(claims.Condition("x", "base", "token", "9=a.st,2=b.st", spec), world, [9, 2],
                               pipes=pipes, **kw) for spec in ("paper", "constant:0.4")]
  assert loaded == ["a.st", "b.st"] and set(pipes) == {("base", "a.st"), ("base", "b.st")}
  assert [(lora, len(prompts)) for lora, prompts, _ in calls] == [("a.st", 2), ("b.st", 2)] * 2
  assert all(claims.TOKEN in p for _, prompts, _ in calls for p in prompts)
  np.testing.assert_allclose(calls[0][2][:5], 0.4) and np.testing.assert_allclose(calls[2][2], 0.4)
  rows = runs[0]["result"]["videos"]
  assert [r["seed"] for r in rows] == [0, 0, 1, 1] * 2
  for row, subject in zip(rows, [9] * 4 + [2] * 4):
    assert (row["target"]["shape"], row["target"]["pattern"], row["target"]["colour"]) == WORLD.held_out[subject]
