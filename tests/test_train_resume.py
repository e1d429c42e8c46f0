"""Preemption safety of train.py (subprocesses on one CPU device, tiny subject-LoRA config):

  * a run killed with SIGTERM saves, logs and exits 0; resuming it reproduces the uninterrupted run's
    losses BIT-EXACTLY (`==`), and its final weights too;
  * a NaN loss stops the run with exit code 1 and a clear message, and keeps the last good checkpoint,
    from which a restart continues bit-exactly.

The runs share a persistent compilation cache (same program, compiled once) and use XLA's cheapest CPU
optimisation level, which keeps this file fast; bit-exactness is between runs with the same settings.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

pytestmark = pytest.mark.slow  # train.py subprocesses (SIGTERM, NaN)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "train_tiny_subject.py")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  return dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
              JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")


def command(converted, workdir, *overrides):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config", CONFIG, "--workdir", str(workdir),
          f"--config.model={converted}", *overrides]


def run(converted, env, workdir, *overrides):
  p = subprocess.run(command(converted, workdir, *overrides), env=env, cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  return p.returncode, p.stdout, p.stderr


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  assert [r["step"] for r in records] == list(range(1, len(records) + 1))
  return [r["loss"] for r in records]


def checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(converted, env, tmp_path_factory):
  wd = tmp_path_factory.mktemp("uninterrupted")
  code, out, err = run(converted, env, wd)
  assert code == 0, err[-3000:]
  assert "finished 6 steps" in out
  return wd, losses(wd)


def test_sigterm_then_resume_is_bit_exact(converted, env, uninterrupted, tmp_path):
  ref_dir, ref = uninterrupted
  assert len(ref) == 6 and all(np.isfinite(ref))
  # Interrupted run: asks for many steps, gets SIGTERM as soon as the first step has been logged.
  proc = subprocess.Popen(command(converted, tmp_path, "--config.num_steps=1000"), env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().strip()):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "stopping (SIGTERM): saved checkpoint at step" in out
  stopped = checkpoint_steps(tmp_path)[-1]
  assert 1 <= stopped < 6, stopped  # stopped within a step or two of the signal, before the end
  assert not (tmp_path / "final").exists()

  code, out, err = run(converted, env, tmp_path)  # same command, default 6 steps: resumes
  assert code == 0, err[-3000:]
  assert f"resumed from step {stopped}" in out
  got = losses(tmp_path)
  print(f"SIGTERM after step {stopped}; uninterrupted {ref}; resumed {got}")
  assert got == ref  # bit-exact
  a = safetensors.numpy.load_file(str(ref_dir / "final" / "trainable.safetensors"))
  b = safetensors.numpy.load_file(str(tmp_path / "final" / "trainable.safetensors"))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  for name in ("token_embedding.safetensors", "lora.safetensors", "pytorch_lora_weights.safetensors"):
    assert (tmp_path / "final" / name).exists()
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(converted, env, uninterrupted, tmp_path):
  _, ref = uninterrupted
  code, out, err = run(converted, env, tmp_path, "--config.debug_nan_at_step=5")
  assert code == 1, (out[-2000:], err[-2000:])
  assert "loss is nan at step 5" in err
  assert "last good checkpoint is step 3" in err
  assert checkpoint_steps(tmp_path) == [3]
  assert losses(tmp_path) == ref[:4]
  assert not (tmp_path / "final").exists()
  # Restarting resumes from that (periodic, asynchronously written) checkpoint and matches bit for bit.
  code, out, err = run(converted, env, tmp_path)
  assert code == 0, err[-3000:]
  assert "resumed from step 3" in out
  assert losses(tmp_path) == ref
