"""sample.py end to end: VideoMaker reference + CustomCrafter LoRA schedule, mp4/gif/JSON outputs,
init_noise/save_latents in diffusers layout, and one-line errors."""

import json
import os
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lora_file(converted, path):
  from flax import nnx
  import jax
  from vcjax.loading import load_unet
  from vcjax.nn.lora import add_lora, lora_modules
  from vcjax.weights.lora_files import save_lora
  unet = load_unet(converted)
  add_lora(unet, rank=4, rngs=nnx.Rngs(0))
  for i, m in enumerate(lora_modules(unet).values()):  # non-zero up: the LoRA must change the output
    m.lora_up.set_value(0.1 * jax.random.normal(jax.random.key(i), m.lora_up.get_value().shape))
  return save_lora(unet, str(path))


@pytest.mark.slow  # a sample.py subprocess
def test_sample_cli_with_reference_and_lora(converted, tmp_path):
  Image.fromarray(np.full((40, 64, 3), 30, np.uint8)).save(tmp_path / "ref.png")
  lora = lora_file(converted, tmp_path / "subject.safetensors")
  noise = np.random.default_rng(0).standard_normal((2, 4, 3, 8, 8)).astype(np.float32)
  np.save(tmp_path / "noise.npy", noise)
  out = tmp_path / "v.mp4"
  cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--config", os.path.join(ROOT, "configs/sample_customcrafter.py"),
         f"--config.model={converted}", "--config.height=64", "--config.width=64", "--config.num_frames=3",
         "--config.steps=6", "--config.num_videos=2", f"--config.reference={tmp_path / 'ref.png'}",
         f"--config.lora={lora}", "--config.lora_schedule=paper:2", f"--config.init_noise={tmp_path / 'noise.npy'}",
         f"--config.save_latents={tmp_path / 'final.npy'}", f"--config.output={out}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for i in range(2):
    frames = imageio.mimread(tmp_path / f"v_{i}.mp4")
    assert len(frames) == 3 and frames[0].shape == (64, 64, 3)
    assert len(imageio.mimread(tmp_path / f"v_{i}.gif")) == 3
    sidecar = json.load(open(tmp_path / f"v_{i}.json"))
    assert sidecar["seed"] == i and sidecar["config"]["lora_schedule"] == "paper:2" and "jax" in sidecar["versions"]
  final = np.load(tmp_path / "final.npy")
  assert final.shape == noise.shape and np.isfinite(final).all()
  assert np.abs(final - noise).mean() > 1e-3


@pytest.fixture(scope="module")
def base_config(converted):
  from configs.sample_animatediff import get_config
  cfg = get_config()
  cfg.model, cfg.height, cfg.width, cfg.num_frames, cfg.steps = converted, 64, 64, 2, 2
  return cfg


@pytest.mark.parametrize("change,message", [
    (dict(model="/no/such/model"), "model folder not found"),
    (dict(height=60), "divisible by 8"),
    (dict(num_frames=99), "positional-encoding length"),
    (dict(reference="/no/such.png"), "reference image not found"),
])
def test_clear_errors(base_config, change, message):
  import sample
  cfg = base_config.copy_and_resolve_references()
  cfg.update(change)
  with pytest.raises(ValueError, match=message):
    sample.run(cfg)


def test_unreadable_image_is_one_line(base_config, tmp_path):
  import sample
  (tmp_path / "bad.png").write_bytes(b"not an image")
  cfg = base_config.copy_and_resolve_references()
  cfg.reference = str(tmp_path / "bad.png")
  with pytest.raises(ValueError) as e:
    sample.run(cfg)
  assert "bad.png" in str(e.value) and "\n" not in str(e.value)


def test_scheduler_fields_override_by_name_and_unsupported_ones_fail(base_config, tmp_path):
  """The model's scheduler config is the start; a field vcjax does not implement fails loudly, whether the
  model's config or an override asks for it."""
  import json
  import shutil
  import sample
  model = tmp_path / "model"
  shutil.copytree(base_config.model, model)
  with open(model / "scheduler" / "scheduler_config.json") as f:
    settings = json.load(f)
  assert settings["beta_schedule"] == "scaled_linear" and settings["set_alpha_to_one"] is False  # SD1.5-like
  with open(model / "scheduler" / "scheduler_config.json", "w") as f:
    json.dump(dict(settings, thresholding=True), f)
  cfg = base_config.copy_and_resolve_references()
  cfg.model = str(model)
  with pytest.raises(ValueError, match="thresholding=True is not supported"):
    sample.run(cfg)
  cfg = base_config.copy_and_resolve_references()
  cfg.scheduler.timestep_spacing = "sideways"
  with pytest.raises(ValueError, match="timestep_spacing='sideways' is not supported"):
    sample.run(cfg)


@pytest.mark.slow  # two sample.py subprocesses
def test_repeat_run_loads_every_program_from_the_compilation_cache(converted, tmp_path):
  cache = tmp_path / "cache"
  cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--config", os.path.join(ROOT, "configs/sample_animatediff.py"),
         f"--config.model={converted}", "--config.height=32", "--config.width=48", "--config.num_frames=3",
         "--config.steps=2", f"--config.output={tmp_path / 'v.mp4'}", f"--config.compilation_cache={cache}"]
  # The programs that cost the compile time. (Small eager ops are cached too when their compile happens to
  # pass the 0.2 s threshold, which depends on the machine's load: not asserted.)
  programs = lambda: sorted(e for e in os.listdir(cache) if e.startswith(("jit_denoise_step", "jit__decode",
                                                                          "jit__encode_text")))
  for run in range(2):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if run == 0:
      first = programs()
      assert len(first) == 3  # the text encoder, the sampler step and the VAE decode
  assert programs() == first  # the second run compiled none of them: they came from the cache
  proc = subprocess.run(cmd[:-1] + ["--config.compilation_cache="], capture_output=True, text=True, timeout=600,
                        cwd=ROOT)
  assert proc.returncode == 0 and programs() == first


def test_every_scheduler_field_can_be_set_from_the_command_line():
  """Fields a sample config leaves to the model (None) still take `--config.scheduler.KEY=VALUE`."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["sample.py", "--config", os.path.join(ROOT, "configs/sample_customcrafter.py"),
          "--config.scheduler.set_alpha_to_one=True", "--config.scheduler.use_karras_sigmas=True",
          "--config.scheduler.num_train_timesteps=500", "--config.scheduler.name=euler"]
  fv = flags.FlagValues()  # config_flags finds the override flags in the argv it is given
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  s = fv.config.scheduler
  assert (s.set_alpha_to_one, s.use_karras_sigmas, s.num_train_timesteps, s.name) == (True, True, 500, "euler")
  assert s.beta_start is None and s.timestep_spacing == "leading"  # unset: the model's; the config's own kept
