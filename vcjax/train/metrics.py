"""Training metrics: one JSON object per logged step in `workdir/metrics.jsonl` and TensorBoard event
files (tensorboardX: writes event files without TensorFlow) in `workdir/tensorboard/`. Only process 0
writes. On resume, records after the restored step are dropped first, so the file reads as one run."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax


def _clean(v):
  v = float(v)
  return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf


class MetricsWriter:
  def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate(resume_step or 0)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)
      except ImportError:  # optional dependency: JSONL still works
        self.tb = None

  def _truncate(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(self.path, "w") as f:
      f.writelines(keep)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(f"train/{k}", float(v), int(step))

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
      self.tb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
