"""RAFT trained on the procedural world, and the physical check of vcjax's RAFT: measured flow vs the
world's exact motion.

The parity tests hold vcjax's RAFT to a PyTorch statement of the original on random weights. They cannot
show that the lookups, the pyramid and the convex upsampling measure motion: with random weights the flow
means nothing. The world can, because it knows the motion of every pixel.

Ground truth (`true_flow`): a world sprite is drawn in its own frame (sprites.py), so a pixel centre p of
the sprite at frame t0 lands at c1 + (r1 / r0) R(a1 - a0) (p - c0) at frame t1: centres c, radii r and
angles a are the clip's exact per-frame parameters; this covers translation, spinning and growing alike.
Every other pixel is static background (flow 0). Flow is (x, y) in pixels, as RAFT outputs it.

Training (`train`): RAFT's supervised recipe at a small scale, on frame pairs (t, t + gap), gap 1..3, of
clips drawn at 128 px (RAFT's smallest size, raft.MIN_SIZE) from their own random stream "flow"; every
sprite combination, held-out ones included (RAFT is an evaluator, like the probe). The loss is the
original's sequence loss: sum over the `iters` iterations of gamma^(iters - 1 - i) x the mean L1 error
(gamma 0.8; 6 iterations by default, the original's 12 cost too much here: see below); AdamW (lr 4e-4,
weight decay 1e-4, eps 1e-8), gradients clipped at 1.0, a linear warmup and decay. The context encoder's batch-norm statistics stay at their initial values (as RAFT
freezes them after its first stage); its scales and biases train.

Two departures from the original recipe, both for the budget here (measured): with world pairs alone and the
plain mean L1, 300 steps x 2 pairs collapsed to zero flow (checked: sprite EPE 2.49 px, the zero flow's own;
top-5% flow 0.03 px on every clip; direction accuracy 0.18), because the sprite is a few percent of the pixels
and the background's flow is 0. So half the training pairs are *pans* (one frame seen through two windows an
integer (dx, dy) apart, |d| <= 8 px: every pixel moves, the "known synthetic shifts" of G), and on sprite pairs
the mean L1 puts half its weight on the sprite and half on the background (`balance`).

Check (`check`): pairs of consecutive frames of clips from the stream "flow-check" (never trained on), read
with 20 iterations as VBench and the authors do: end-point error over all pixels and over the sprite; for
translating clips the compass direction and speed of the mean flow over the sprite vs the true ones; and
the authors' dynamic degree (vcjax.eval.metrics) from the measured flow vs from the true flow.

    python -m vcjax.world.flow --out DIR          # DIR/raft-world.safetensors + DIR/config.json, then the check
    python -m vcjax.world.flow --out DIR2 --init DIR/raft-world.safetensors --steps 300   # continue
    python -m vcjax.world.flow --check DIR/raft-world.safetensors --check-clips 16 --json check.json

Cost on the 2-core CPU (measured beside another training run, so about twice the idle time): one step at
RAFT's own batch 4 x 12 iterations takes ~75 s (the update block's convolutions at 1/8 resolution, run
every iteration, are ~3/4 of the ~300 GFLOP), so the defaults are 2 pairs x 6 iterations (~20 s); a check
pair at 20 iterations is ~40 GFLOP, so the check's default is 16 clips (240 pairs).

The weights file has the original checkpoint's key names (`python -m vcjax.eval --raft FILE` reads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vcjax import compiler
from vcjax.eval import metrics
from vcjax.models.raft import MIN_SIZE, RAFT, RAFTConfig, original_state_dict
from vcjax.world import clips as clips_lib
from vcjax.world import motion, splits, truth
from vcjax.world.config import WorldConfig

WEIGHTS = "raft-world.safetensors"
PAN_FRACTION = 0.5  # the share of pan pairs in training (see the module doc)
SIZE = MIN_SIZE  # the smallest frame RAFT's 4-level pyramid takes


def true_flow(clip: clips_lib.Clip, t0: int, t1: int) -> np.ndarray:
  """The exact flow from frame t0 to frame t1 of a rendered clip: `(H, W, 2)` float32 (x, y) pixels; the
  sprite's pixels at t0 (its mask) move with it, the background's do not."""
  h, w = clip.frames.shape[1:3]
  ys, xs = np.mgrid[:h, :w].astype(np.float64) + 0.5  # pixel i covers [i, i + 1)
  (y0, x0), (y1, x1) = clip.centres[t0], clip.centres[t1]
  scale = clip.radii[t1] / clip.radii[t0]
  turn = clip.angles[t1] - clip.angles[t0]  # clockwise on screen (y down), as the renderer rotates
  rx, ry = xs - x0, ys - y0
  nx = x1 + scale * (math.cos(turn) * rx - math.sin(turn) * ry)
  ny = y1 + scale * (math.sin(turn) * rx + math.cos(turn) * ry)
  flow = np.stack([nx - xs, ny - ys], axis=-1)
  return np.where(clip.masks[t0][..., None], flow, 0.0).astype(np.float32)


def world_for_flow(world: WorldConfig, size: int = SIZE) -> WorldConfig:
  return dataclasses.replace(world, size=size)


def _draw(world: WorldConfig, index: int, stream: str) -> clips_lib.ClipAttributes:
  """Clip `index` of `stream`, its combination uniform over every one of the world (held-out included)."""
  combos = splits.combos(world, "train") + splits.combos(world, "heldout")
  rng = np.random.default_rng([int(world.seed) % 2**32, splits.stream_id(stream), index])
  shape, pattern, colour = combos[int(rng.integers(len(combos)))]
  return clips_lib.sample_attributes(world, index, "train", stream=stream, shape=shape, pattern=pattern,
                                     colour=colour)


def batch(world: WorldConfig, start: int, pairs: int, *, max_gap: int = 3, stream: str = "flow",
          pan_fraction: float = 0.0, max_pan: int = 8, balance: bool = False) -> dict[str, np.ndarray]:
  """Pairs start .. start+pairs-1 of `stream`: image1, image2 `(B, S, S, 3)` float32 in [0, 255], their
  true flow `(B, S, S, 2)` and per-pixel loss weights `(B, S, S)` (each pair's sum to 1).

  Pair i is frames (t, t + gap) of clip i, gap uniform in 1..max_gap; or, with probability `pan_fraction`,
  a pan: one frame of clip i seen through two windows `max_pan` px apart at most (integer (dx, dy), not both
  0), so every pixel moves by the same known flow. balance: a sprite pair's weights put half on the sprite
  and half on the background (uniform otherwise)."""
  out = {"image1": [], "image2": [], "flow": [], "weight": []}
  size = world.size
  for i in range(start, start + pairs):
    rng = np.random.default_rng([int(world.seed) % 2**32, splits.stream_id(stream + "-pair"), i])
    gap = int(rng.integers(1, max_gap + 1))
    t0 = int(rng.integers(0, world.frames - gap))
    uniform = np.full((size, size), 1.0 / size ** 2)
    if pan_fraction > 0 and rng.random() < pan_fraction:
      dx, dy = 0, 0
      while dx == 0 and dy == 0:
        dx, dy = (int(v) for v in rng.integers(-max_pan, max_pan + 1, size=2))
      big = clips_lib.render(dataclasses.replace(world, size=size + 2 * max_pan), _draw(world, i, stream),
                             frames=t0 + 1).frames[t0]
      m = max_pan  # image1(p) = big(p + m), image2(q) = big(q + m + d): what is at p moves to p - d
      out["image1"].append(big[m:m + size, m:m + size])
      out["image2"].append(big[m + dy:m + dy + size, m + dx:m + dx + size])
      out["flow"].append(np.broadcast_to(np.array([-dx, -dy], np.float32), (size, size, 2)))
      out["weight"].append(uniform)
      continue
    clip = clips_lib.render(world, _draw(world, i, stream), frames=t0 + gap + 1)
    out["image1"].append(clip.frames[t0])
    out["image2"].append(clip.frames[t0 + gap])
    out["flow"].append(true_flow(clip, t0, t0 + gap))
    sprite = clip.masks[t0]
    if balance and 0 < sprite.sum() < sprite.size:
      out["weight"].append(np.where(sprite, 0.5 / sprite.sum(), 0.5 / (~sprite).sum()))
    else:
      out["weight"].append(uniform)
  return {k: np.stack(v).astype(np.float32) for k, v in out.items()}


# ------------------------------------------------------------------------------------------ training


def sequence_loss(flows, target, weight=None, gamma: float = 0.8):
  """RAFT's loss: flows `(N, B, H, W, 2)` (every iteration's), target `(B, H, W, 2)` -> scalar: the sum over
  iterations of gamma^(N - 1 - i) x the mean L1 error; `weight (B, H, W)` (each pair's summing to 1) weights
  the pixels of that mean (None: uniform, the original's)."""
  n = flows.shape[0]
  weights = gamma ** (n - 1 - jnp.arange(n, dtype=jnp.float32))
  err = jnp.abs(flows - target[None]).mean(-1)  # (N, B, H, W)
  if weight is None:
    per_iteration = err.mean(axis=(1, 2, 3))
  else:
    per_iteration = (err * weight[None]).sum(axis=(2, 3)).mean(axis=1)
  return jnp.sum(weights * per_iteration)


def _labels(params):
  """"frozen" for the batch-norm statistics, "train" for every other parameter."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if "running_" in jax.tree_util.keystr(path) else "train", params)


def make_optimizer(params, steps: int, lr: float = 4e-4) -> optax.GradientTransformation:
  warmup = max(1, min(100, steps // 20))
  schedule = optax.join_schedules([optax.linear_schedule(lr * 0.05, lr, warmup),
                                   optax.linear_schedule(lr, lr * 0.05, max(1, steps - warmup))], [warmup])
  adamw = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4))
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, _labels(params))


@compiler.jit(static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def _train_step(graphdef, tx, iters, params, opt_state, data):
  def loss_fn(p):
    flows = nnx.merge(graphdef, p)(data["image1"], data["image2"], iters=iters, all_iterations=True)
    return (sequence_loss(flows, data["flow"], data["weight"]),
            jnp.abs(flows[-1] - data["flow"]).sum(-1).mean())
  (loss, l1), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, l1


def train(world: WorldConfig, *, steps: int, batch_size: int = 2, iters: int = 6, lr: float = 4e-4,
          seed: int = 0, first_pair: int = 0, init: RAFT | None = None, log_every: int = 50, log=None,
          save=None, save_every: int = 0, pan_fraction: float = PAN_FRACTION,
          balance: bool = True) -> tuple[RAFT, dict]:
  """Train RAFT for `steps` steps of `batch_size` pairs from `init` (or from scratch). save(model, summary)
  is called every `save_every` steps (a long run survives a stop). -> (model, summary)."""
  log = log or (lambda s: print(s, flush=True))
  model = init if init is not None else RAFT(RAFTConfig(), rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  tx = make_optimizer(params, steps, lr)
  opt_state = tx.init(params)
  t0, history = time.time(), []

  def summary(done):
    return {"steps": done, "batch_size": batch_size, "iters": iters, "lr": lr, "seed": seed,
            "world_seed": world.seed, "size": world.size, "stream": "flow", "first_pair": first_pair,
            "pan_fraction": pan_fraction, "balance": balance,
            "pairs_seen": first_pair + done * batch_size, "seconds": round(time.time() - t0, 1),
            "history": history}

  for step in range(steps):
    data = batch(world, first_pair + step * batch_size, batch_size, pan_fraction=pan_fraction, balance=balance)
    params, opt_state, loss, l1 = _train_step(graphdef, tx, iters, params, opt_state, data)
    if (step + 1) % log_every == 0 or step + 1 == steps:
      history.append((step + 1, round(float(loss), 4), round(float(l1), 4)))
      log(f"step {step + 1}/{steps}  loss {history[-1][1]:.4f}  epe {history[-1][2]:.3f}  "
          f"{time.time() - t0:.0f}s")
    if save is not None and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
      nnx.update(model, params)
      save(model, summary(step + 1))
  nnx.update(model, params)
  return model, summary(steps)


# ------------------------------------------------------------------------------------------ files


def save_raft(folder: str, model: RAFT, training: dict | None = None) -> str:
  """The weights under the original checkpoint's names (WEIGHTS) + config.json with the training summary."""
  from vcjax.weights import sources, store
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, WEIGHTS)
  sources.save_safetensors(original_state_dict(model), path)
  store.write_config(folder, {"format": "vcjax-world-raft", "training": training or {}})
  return path


# ------------------------------------------------------------------------------------------ the check


def score_clip(world: WorldConfig, clip: clips_lib.Clip, pred: np.ndarray) -> dict:
  """One clip's row of the check: `pred (F-1, S, S, 2)`, the measured flow of its consecutive pairs."""
  f = clip.frames.shape[0]
  true = np.stack([true_flow(clip, t, t + 1) for t in range(f - 1)])
  err = np.linalg.norm(pred - true, axis=-1)
  sprite = clip.masks[:-1]
  row = {"motion": clip.attrs.motion, "speed": clip.attrs.speed, "epe": float(err.mean()),
         "epe_sprite": float(err[sprite].mean())}
  kind = motion.MOTIONS[clip.attrs.motion].kind
  if kind == "translate":
    mean_pred, mean_true = pred[sprite].mean(0), true[sprite].mean(0)  # (x, y)
    row["direction_ok"] = int(truth.compass(mean_pred[1], mean_pred[0]) == clip.attrs.motion)  # (dy, dx)
    row["speed_relative_error"] = float(abs(np.linalg.norm(mean_pred) / np.linalg.norm(mean_true) - 1))
  elif kind == "still":
    row["still_sprite_flow"] = float(np.linalg.norm(pred[sprite], axis=-1).mean())
  threshold = metrics.dd_threshold(world.size, world.size, kind="authors")
  scores = metrics.top5_mean(np.linalg.norm(pred, axis=-1))
  true_scores = metrics.top5_mean(np.linalg.norm(true, axis=-1))
  row.update(top5=float(scores.mean()), true_top5=float(true_scores.mean()),
             moving=int(metrics.dd_moving(list(scores), f, threshold)),
             truly_moving=int(metrics.dd_moving(list(true_scores), f, threshold)))
  return row


def summarize(world: WorldConfig, rows: Sequence[dict]) -> dict:
  """The check's table: means over the clips' rows (direction / speed over translating clips, still flow
  over still ones, the top-5% error over clips whose true score is above half a pixel)."""
  def mean(key, where=lambda r: True):
    xs = [r[key] for r in rows if key in r and where(r)]
    return float(np.mean(xs)) if xs else None
  return {"clips": len(rows), "pairs": len(rows) * (world.frames - 1), "size": world.size,
          "epe": mean("epe"), "epe_sprite": mean("epe_sprite"),
          "direction_accuracy": mean("direction_ok"), "translating_clips": sum("direction_ok" in r for r in rows),
          "speed_relative_error": mean("speed_relative_error"), "still_sprite_flow": mean("still_sprite_flow"),
          "still_clips": sum("still_sprite_flow" in r for r in rows),
          "dd_threshold": metrics.dd_threshold(world.size, world.size, kind="authors"),
          "dd_agreement": float(np.mean([r["moving"] == r["truly_moving"] for r in rows])) if rows else None,
          "top5_relative_error": float(np.mean([abs(r["top5"] / r["true_top5"] - 1) for r in rows
                                                if r["true_top5"] > 0.5] or [np.nan]))}


def check(model: RAFT, world: WorldConfig, *, clips: int = 16, stream: str = "flow-check", log=None) -> dict:
  """Measured (20 iterations, every local device) vs true flow on every consecutive pair of `clips` clips of
  `stream` (see the module doc): the summary table plus its per-clip rows ("videos")."""
  from vcjax.eval.engine import Runner, raft_flow
  log = log or (lambda s: None)
  runner, rows = Runner(model), []
  for i in range(clips):
    clip = clips_lib.render(world, _draw(world, i, stream))
    rows.append(score_clip(world, clip, runner.map(raft_flow, clip.frames[:-1], clip.frames[1:])))
    r = rows[-1]
    log(f"clip {i + 1}/{clips} {r['motion']:<10} epe {r['epe']:.3f} (sprite {r['epe_sprite']:.2f})  "
        f"top5 {r['top5']:.2f} vs {r['true_top5']:.2f}")
  return dict(summarize(world, rows), iters=20, stream=stream, videos=rows)


# ------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m vcjax.world.flow", description=__doc__.split("\n")[0])
  ap.add_argument("--out", help="folder for raft-world.safetensors + config.json (training)")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch-size", type=int, default=2)
  ap.add_argument("--iters", type=int, default=6, help="RAFT iterations in training (the original: 12)")
  ap.add_argument("--lr", type=float, default=4e-4)
  ap.add_argument("--pan-fraction", type=float, default=PAN_FRACTION, help="share of pan pairs (0: none)")
  ap.add_argument("--no-balance", action="store_true", help="uniform pixel weights on sprite pairs")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--world-seed", type=int, default=0)
  ap.add_argument("--size", type=int, default=SIZE)
  ap.add_argument("--init", help="continue from this weights file (its pairs are skipped)")
  ap.add_argument("--save-every", type=int, default=50)
  ap.add_argument("--log-every", type=int, default=10)
  ap.add_argument("--check", help="only check this weights file (no training)")
  ap.add_argument("--check-clips", type=int, default=16, help="clips of the check after training (0: none)")
  ap.add_argument("--json", help="write the check's result here")
  args = ap.parse_args(argv)
  if not args.out and not args.check:
    ap.error("give --out (train) or --check FILE")
  from vcjax.weights import store
  from vcjax.weights.eval_models import load_raft
  try:
    if args.size < MIN_SIZE or args.size % 8:
      raise ValueError(f"--size {args.size}: RAFT needs frames of at least {MIN_SIZE} px, a multiple of 8")
    world = world_for_flow(WorldConfig(seed=args.world_seed), args.size)
    if args.check or args.init:
      model = load_raft(args.check or args.init)
  except ValueError as e:  # CheckpointError too: a missing or wrong file, a bad size
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  if args.check:
    summary = None
  else:
    previous, first_pair, init = None, 0, None
    if args.init:
      init = model
      previous = store.read_config(os.path.dirname(os.path.abspath(args.init))).get("training", {})
      first_pair = int(previous.get("pairs_seen", 0))
    save = lambda m, s: save_raft(args.out, m, dict(s, previous=previous) if previous else s)
    model, summary = train(world, steps=args.steps, batch_size=args.batch_size, iters=args.iters, lr=args.lr,
                           seed=args.seed, first_pair=first_pair, init=init, log_every=args.log_every,
                           save=save, save_every=args.save_every, pan_fraction=args.pan_fraction,
                           balance=not args.no_balance)
    print(f"-> {save(model, summary)}")
  if args.check or args.check_clips:
    result = check(model, world, clips=args.check_clips, log=print)
    table = {k: v for k, v in result.items() if k != "videos"}
    print(json.dumps(table, indent=1))
    if summary is not None:
      summary["check"] = table
      save_raft(args.out, model, dict(summary, previous=previous) if previous else summary)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
