"""The LoRA scale as a function of the denoising step (CustomCrafter's dynamic weighted sampling, METHODS.md §4).

`lora_scales(spec, num_steps)` gives one float32 scale per sampler step (step 0 = the noisiest); a sampling
loop indexes it with its (traced) step counter and feeds `vcjax.nn.lora.with_lora_scale(state, scales[i])`
to the UNet, so the whole schedule runs inside one compiled loop.

Specs (a string, a number, a dict, or a sequence of num_steps numbers):
  "paper"                     0.4 for the first K = 5 steps, then 0.8 (the paper's rule).
  "paper:K:LOW:HIGH"          the same with other numbers ("paper:5", "paper:5:0.4:0.8").
  "authors[:K:LOW:HIGH]"      the authors' code (see below).
  "constant:S" or S           S at every step (a bare number, e.g. "0.8" or 0.8, is a constant).
  "linear:START:END"          a straight ramp, START at the first step and END at the last.
  "piecewise:N1@V1,N2@V2,...,VLAST"
                              V1 for steps [0, N1), V2 for [N1, N2), ..., VLAST for the rest; N are step
                              indices, strictly increasing ("piecewise:5@0.4,0.8" == "paper").
  {"kind": "paper", "k": 5, "low": 0.4, "high": 0.8}, {"kind": "constant", "value": 0.8},
  {"kind": "linear", "start": 0.2, "end": 1.0}, {"kind": "piecewise", "boundaries": [5], "values": [0.4, 0.8]},
  {"kind": "authors", ...} -- dict forms of the same.

The authors' variant. CustomCrafter's released inference script samples twice: a first DDIM run at the low
scale is stopped when its step counter reaches K (so it runs K steps), but the latent it keeps is the one
after K-1 steps (its list of intermediates starts with x_T); the second run, at the high scale, resumes
from that latent with the N-K lowest timesteps only (50 steps, K=5: t_44 ... t_0). So K-1 steps run at the
low scale, step K-1 (the (K)th timestep) is never applied -- the latent that is at that step's noise level
is treated as if it were at the next step's -- and N-K steps run at the high scale: for N=50, K=5, "4 steps
at 0.4, one step skipped, 45 at 0.8". `lora_scales("authors", n)` gives LOW for steps [0, K-1) and HIGH
from step K-1 on, and `skipped_steps("authors", n)` marks step K-1: a sampler that wants the authors'
numbers exactly leaves x unchanged at a skipped step (DDIM: the next step then starts from the same x).
Every other spec skips nothing.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

PAPER = dict(k=5, low=0.4, high=0.8)  # METHODS.md §4
KINDS = ("paper", "authors", "constant", "linear", "piecewise")


class ScheduleError(ValueError):
  """A LoRA schedule spec that cannot be parsed (the message is one line)."""


def _num(text: str, spec, what: str) -> float:
  try:
    value = float(text)
  except (TypeError, ValueError):
    raise ScheduleError(f"bad LoRA schedule {spec!r}: {what} must be a number, got {text!r}") from None
  if not np.isfinite(value):
    raise ScheduleError(f"bad LoRA schedule {spec!r}: {what} must be finite, got {text!r}")
  return value


def _int(text, spec, what: str) -> int:
  value = _num(text, spec, what)
  if value != int(value) or value < 0:
    raise ScheduleError(f"bad LoRA schedule {spec!r}: {what} must be a step count >= 0, got {text!r}")
  return int(value)


def parse(spec: Any) -> dict[str, Any]:
  """Normalise a spec (see the module docstring) into a dict with a "kind" key. Raises ScheduleError."""
  if isinstance(spec, Mapping):
    return _from_dict(spec)
  if isinstance(spec, (int, float, np.number)) and not isinstance(spec, bool):
    return dict(kind="constant", value=_num(spec, spec, "the scale"))
  if not isinstance(spec, str):
    if isinstance(spec, (Sequence, np.ndarray)):
      values = [_num(v, "<sequence>", "every scale") for v in spec]
      if not values:
        raise ScheduleError("bad LoRA schedule: an explicit list of scales is empty")
      return dict(kind="explicit", values=values)
    raise ScheduleError(f"bad LoRA schedule {spec!r}: expected a string, a number, a dict or a list")
  text = spec.strip()
  kind, _, rest = text.partition(":")
  kind = kind.strip().lower()
  args = [a.strip() for a in rest.split(":")] if rest else []
  if kind not in KINDS:
    try:
      return dict(kind="constant", value=_num(text, spec, "the scale"))
    except ScheduleError:
      raise ScheduleError(f"bad LoRA schedule {spec!r}: unknown kind {kind!r}; expected one of "
                          f"{', '.join(KINDS)} or a number") from None
  if kind in ("paper", "authors"):
    if len(args) > 3:
      raise ScheduleError(f"bad LoRA schedule {spec!r}: expected {kind}[:K[:LOW:HIGH]]")
    if len(args) == 2:
      raise ScheduleError(f"bad LoRA schedule {spec!r}: give both LOW and HIGH ({kind}:K:LOW:HIGH)")
    out = dict(kind=kind, **PAPER)
    if args:
      out["k"] = _int(args[0], spec, "K")
    if len(args) == 3:
      out["low"], out["high"] = _num(args[1], spec, "LOW"), _num(args[2], spec, "HIGH")
    return out
  if kind == "constant":
    if len(args) != 1:
      raise ScheduleError(f"bad LoRA schedule {spec!r}: expected constant:SCALE")
    return dict(kind="constant", value=_num(args[0], spec, "SCALE"))
  if kind == "linear":
    if len(args) != 2:
      raise ScheduleError(f"bad LoRA schedule {spec!r}: expected linear:START:END")
    return dict(kind="linear", start=_num(args[0], spec, "START"), end=_num(args[1], spec, "END"))
  # piecewise
  if len(args) != 1 or not args[0]:
    raise ScheduleError(f"bad LoRA schedule {spec!r}: expected piecewise:N1@V1,...,VLAST")
  boundaries, values = [], []
  items = [i.strip() for i in args[0].split(",")]
  for j, item in enumerate(items):
    n, at, v = item.partition("@")
    if at:
      if j == len(items) - 1:
        raise ScheduleError(f"bad LoRA schedule {spec!r}: the last piece must be a bare scale (the value for "
                            "the remaining steps)")
      boundaries.append(_int(n.strip(), spec, "a piece's end step"))
      values.append(_num(v.strip(), spec, "a piece's scale"))
    else:
      if j != len(items) - 1:
        raise ScheduleError(f"bad LoRA schedule {spec!r}: piece {item!r} needs an end step (N@SCALE); only "
                            "the last piece is bare")
      values.append(_num(n.strip(), spec, "the last scale"))
  return _checked_piecewise(dict(kind="piecewise", boundaries=boundaries, values=values), spec)


def _checked_piecewise(d: dict, spec) -> dict:
  b = d["boundaries"]
  if len(d["values"]) != len(b) + 1:
    raise ScheduleError(f"bad LoRA schedule {spec!r}: piecewise needs one more value than boundaries")
  if any(x >= y for x, y in zip(b, b[1:])):
    raise ScheduleError(f"bad LoRA schedule {spec!r}: piece end steps must increase strictly, got {b}")
  return d


def _from_dict(spec: Mapping) -> dict[str, Any]:
  kind = str(spec.get("kind", "")).lower()
  allowed = {"paper": ("k", "low", "high"), "authors": ("k", "low", "high"), "constant": ("value",),
             "linear": ("start", "end"), "piecewise": ("boundaries", "values")}
  if kind not in allowed:
    raise ScheduleError(f"bad LoRA schedule {dict(spec)!r}: 'kind' must be one of {', '.join(KINDS)}")
  extra = sorted(set(spec) - set(allowed[kind]) - {"kind"})
  if extra:
    raise ScheduleError(f"bad LoRA schedule {dict(spec)!r}: unknown keys {extra} for kind {kind!r}")
  out: dict[str, Any] = dict(kind=kind)
  if kind in ("paper", "authors"):
    out.update(PAPER)
    if "k" in spec:
      out["k"] = _int(spec["k"], dict(spec), "k")
    for f in ("low", "high"):
      if f in spec:
        out[f] = _num(spec[f], dict(spec), f)
    return out
  missing = [f for f in allowed[kind] if f not in spec]
  if missing:
    raise ScheduleError(f"bad LoRA schedule {dict(spec)!r}: kind {kind!r} needs {missing}")
  if kind == "piecewise":
    try:
      b = [_int(x, dict(spec), "a boundary") for x in spec["boundaries"]]
      v = [_num(x, dict(spec), "a value") for x in spec["values"]]
    except TypeError:
      raise ScheduleError(f"bad LoRA schedule {dict(spec)!r}: boundaries and values must be lists") from None
    return _checked_piecewise(dict(kind=kind, boundaries=b, values=v), dict(spec))
  out.update({f: _num(spec[f], dict(spec), f) for f in allowed[kind]})
  return out


def lora_scales(spec: Any, num_steps: int) -> np.ndarray:
  """The LoRA scale of every sampler step, `(num_steps,)` float32; index 0 is the first (noisiest) step."""
  if num_steps < 1:
    raise ScheduleError(f"num_steps must be >= 1, got {num_steps}")
  d = parse(spec)
  kind, steps = d["kind"], np.arange(num_steps)
  if kind == "paper":
    out = np.where(steps < d["k"], d["low"], d["high"])
  elif kind == "authors":
    out = np.where(steps < d["k"] - 1, d["low"], d["high"])
  elif kind == "constant":
    out = np.full(num_steps, d["value"])
  elif kind == "linear":
    frac = steps / (num_steps - 1) if num_steps > 1 else np.zeros(1)
    out = d["start"] + (d["end"] - d["start"]) * frac
  elif kind == "piecewise":
    out = np.asarray(d["values"])[np.searchsorted(np.asarray(d["boundaries"], np.int64), steps, side="right")]
  else:  # explicit
    if len(d["values"]) != num_steps:
      raise ScheduleError(f"bad LoRA schedule: {len(d['values'])} explicit scales for {num_steps} steps")
    out = np.asarray(d["values"])
  return np.asarray(out, np.float32)


def skipped_steps(spec: Any, num_steps: int) -> np.ndarray:
  """`(num_steps,)` bool: the steps a sampler must not apply to reproduce the spec (only "authors" has one:
  step K-1, when K >= 1 and K-1 < num_steps)."""
  d = parse(spec)
  out = np.zeros(num_steps, bool)
  if d["kind"] == "authors" and 1 <= d["k"] <= num_steps:
    out[d["k"] - 1] = True
  return out


def describe(spec: Any, num_steps: int) -> str:
  """One line saying what the schedule does over `num_steps` steps, e.g. '5 steps at 0.4, 45 at 0.8'."""
  scales, skip = lora_scales(spec, num_steps), skipped_steps(spec, num_steps)
  runs: list[list] = []
  for s, k in zip(scales.tolist(), skip.tolist()):
    label = "skipped" if k else f"{s:.4g}"
    if runs and runs[-1][0] == label:
      runs[-1][1] += 1
    else:
      runs.append([label, 1])
  if len(runs) > 6:
    return f"{num_steps} steps from {scales[0]:.4g} to {scales[-1]:.4g}"
  return ", ".join(f"{n} step{'s' if n > 1 else ''} " + ("skipped" if lab == "skipped" else f"at {lab}")
                   for lab, n in runs)
