import os

# Multi-device code is tested on 8 simulated CPU devices; this must happen before JAX starts.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def random_pipeline(tmp_path_factory):
  """A tiny random AnimateDiff pipeline (v2 motion module) in every PyTorch file format."""
  from convert.make_random_pipeline import write_pipeline
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
