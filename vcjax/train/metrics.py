"""Training metrics: one JSON object per logged step in `workdir/metrics.jsonl` and TensorBoard event
files in `workdir/tensorboard/`. Only process 0 writes. On resume, JSONL records after the restored step
are dropped first, so the file reads as one run (TensorBoard shows the newest value of a repeated step).

The event files are written by `EventWriter` below: TFRecord framing around hand-encoded `Event` /
`Summary` protocol buffers with scalar values (the only kind used), so neither TensorFlow nor
tensorboardX (which imports torch when it is installed) is needed.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Any

import jax


def _crc32c_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  key = _varint((number << 3) | wire)
  return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def _event(step: int, *, file_version: str | None = None, scalars: dict[str, float] | None = None) -> bytes:
  """Serialized tensorboard Event: wall_time (1, double), step (2, int64), file_version (3, string),
  summary (5) { value (1) { tag (1, string), simple_value (2, float) } }."""
  msg = _field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(step))
  if file_version is not None:
    msg += _field(3, 2, file_version.encode())
  if scalars:
    values = b"".join(_field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
                      for tag, value in scalars.items())
    msg += _field(5, 2, values)
  return msg


class EventWriter:
  """Minimal TensorBoard event-file writer for scalars (a new file per writer, as TensorBoard expects)."""

  _count = 0

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    EventWriter._count += 1
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{EventWriter._count}"
    self._f = open(os.path.join(logdir, name), "xb")
    self._record(_event(0, file_version="brain.Event:2"))

  def _record(self, data: bytes) -> None:
    header = struct.pack("<Q", len(data))
    self._f.write(header + struct.pack("<I", _masked_crc32c(header)) + data
                  + struct.pack("<I", _masked_crc32c(data)))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._record(_event(step, scalars=values))
    self._f.flush()

  def close(self) -> None:
    self._f.close()


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
      self.tb = EventWriter(os.path.join(workdir, "tensorboard"))

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
      self.tb.scalars(int(step), {f"train/{k}": float(v) for k, v in metrics.items()})

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
      self.tb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
