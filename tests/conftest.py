import os

# Multi-device code is tested on 8 simulated CPU devices; this must happen before JAX starts.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

# Building the tiny random PyTorch pipeline and converting it takes ~30 s per worker, and what a test does
# with it (a diffusers run, a compiled UNet) takes longer: every test that asks for one of these models is
# `slow`, so that `pytest -m "not slow"` is the quick unit tests. The README's test command runs all.
HEAVY_FIXTURES = {"random_pipeline", "converted", "odd_model"}


def pytest_collection_modifyitems(config, items):
  for item in items:
    if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def random_pipeline(tmp_path_factory):
  """A tiny random AnimateDiff pipeline (v2 motion module) in every PyTorch file format."""
  from vcjax.testing import write_pipeline
  out = tmp_path_factory.mktemp("random_pipeline")
  paths = write_pipeline(str(out), size="tiny", version="v2", seed=0)
  return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="session")
def converted(random_pipeline, tmp_path_factory):
  """The random pipeline converted with diffusers norm semantics (so diffusers is the reference)."""
  from convert.animatediff import main
  out = str(tmp_path_factory.mktemp("converted"))
  assert main(["--base", random_pipeline["base"], "--motion-module", random_pipeline["motion_diffusers"],
               "--out", out]) == 0
  return out


# A model of shapes no tuned default shares (tests/test_sample_parity.py, tests/test_text_length.py): text
# encoder and tokenizer of 16 positions, a 4-head original-format motion module, and its own scheduler config.
ODD_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                 "beta_end": 0.012, "beta_schedule": "linear", "timestep_spacing": "leading",
                 "steps_offset": 0, "clip_sample": True, "set_alpha_to_one": False}


@pytest.fixture(scope="session")
def odd_model(tmp_path_factory):
  """-> dict(base, ldm, motion_original, motion_diffusers, converted) for that model (diffusers semantics)."""
  from convert.animatediff import main
  from vcjax.testing import write_pipeline
  root = tmp_path_factory.mktemp("odd_model")
  paths = write_pipeline(str(root / "torch"), size="tiny", version="v2", seed=5, text_positions=16,
                         motion_heads=4, scheduler=ODD_SCHEDULER)
  out = str(root / "converted")
  assert main(["--base", paths["base"], "--motion-module", paths["motion_original"], "--motion-heads", "4",
               "--norm-semantics", "diffusers", "--out", out]) == 0
  return dict(paths, converted=out)
