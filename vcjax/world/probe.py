"""The world probe: a small CNN that reads a world frame's content back (what the world metrics score with).

A generated video has no ground truth, so vcjax/world/evaluate.py reads the subject's attributes off its
frames with this probe, trained on rendered world frames (where the truth is known):

    frames `(N, S, S, 3)` uint8 (S = ProbeConfig.size, 64) ->
      shape / pattern / colour / background logits `(N, C)`, log subject diameter `(N,)` (a fraction of the
      side; size is read from it, see below), subject-mask logits `(N, S/2, S/2)` (predict: a bool mask
      `(N, S, S)`), features `(N, D)`.

Architecture (0.30 M parameters, 1.2 MB in float32), two towers of 3x3 convolutions + ReLU:
  frame tower  the space-to-depth frame `(N, S/2, S/2, 12)`, channels ProbeConfig.channels at S/2, S/4, S/8;
               an FPN-style decoder -> subject-mask logits at S/2 (bilinear to S); the background head on
               its mean- and max-pooled coarsest features.
  crop tower   a `(N, C, C, 3)` crop (C = ProbeConfig.crop, 32) about the subject: centred on the mask's
               centroid, CROP_GYRATION x its radius of gyration wide (the ground-truth mask, jittered, in
               training; the predicted one when reading) -> its 4x4 layout and max-pooled coarsest
               features -> shape / pattern / colour / diameter heads.
The crop puts every subject at about one scale and position, so shape and pattern are learnt once, not per
size and place: a single network pooling over the whole frame had learnt neither after 800 steps.

Size is not a class: under "growing" / "shrinking" a sprite's apparent size changes 2x during the clip, so a
per-frame size label would be wrong on most frames. A video's size is the size of WorldConfig.sizes nearest
(in log) to the median over its frames of the diameter the predicted mask's area implies for the read shape
(video_attributes; the middle frame of a grow/shrink clip is at 0.975x its base size). The diameter head
(each frame's true bounding-circle diameter, regressed from the crop) is a training target beside it.

Training data (`batch`): clips rendered on the fly with their own random stream ("probe"), so no training
draw is a clip of the "train"/"heldout" splits' default streams or of evaluate.py's prompts ("eval"). Every
combination of shape x pattern x colour is drawn, the 16 held-out ones included: the probe is an evaluator,
never a generator, and must read held-out subjects (evaluate.py --split heldout) as well as held-in ones.
Light noise and blur augmentation, because generated frames come through a VAE.

    python -m vcjax.world.probe --out DIR --steps 1800     # DIR/probe.safetensors + DIR/config.json
    python -m vcjax.world.probe --out DIR2 --init DIR --steps 600 --lr 1e-3   # continue (later clips)
The shipped probe is vcjax/world/probe_weights/ (load_probe() with no folder): 1800 steps at lr 3e-3, then
with --init 600 at 1e-3, 500 at 5e-4, 1500 at 5e-4, 1500 at 2.5e-4 (16 clips a step from there on) and 1500
at 1.5e-4 with --clips 24 (7400 steps in all, 3250 s of CPU here; its config.json keeps each run's summary).
On 200 ground-truth clips of evaluate.py's "eval" stream it reads colour, pattern, background and motion
1.00, size 0.995, shape 0.955 (the errors left: circles read as hexagons). Shape accuracy after each round:
0.87 (2900 steps), 0.93, 0.94, 0.955: the last rounds at lower learning rates are what fixed it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vcjax import compiler
from vcjax.nn.abstract import abstract_module
from vcjax.world import clips as clips_lib
from vcjax.world import splits
from vcjax.world.config import WorldConfig

HEADS = ("shape", "pattern", "colour", "background")
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe_weights")
FORMAT = "vcjax-world-probe"


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """size: the frame side the probe reads (frames are resized to it). channels: per level (S .. S/8).
  mask_channels: width of the mask decoder. hidden: width of the heads' hidden layer. The name tables fix
  each head's class order; sizes: (name, bounding-circle diameter as a fraction of the side)."""
  size: int = 64
  channels: tuple[int, ...] = (16, 32, 64)
  mask_channels: int = 16
  crop: int = 32
  crop_channels: tuple[int, ...] = (16, 32, 64)
  hidden: int = 128
  shapes: tuple[str, ...] = ()
  patterns: tuple[str, ...] = ()
  colours: tuple[str, ...] = ()
  backgrounds: tuple[str, ...] = ()
  sizes: tuple[tuple[str, float], ...] = ()

  @classmethod
  def for_world(cls, world: WorldConfig, **kw) -> "ProbeConfig":
    return cls(shapes=world.shapes, patterns=world.patterns, colours=world.colours,
               backgrounds=world.backgrounds, sizes=tuple((n, f) for n, _, f in world.sizes), **kw)

  def names(self, head: str) -> tuple[str, ...]:
    return {"shape": self.shapes, "pattern": self.patterns, "colour": self.colours,
            "background": self.backgrounds}[head]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "ProbeConfig":
    d = dict(d)
    for k in ("channels", "crop_channels", "shapes", "patterns", "colours", "backgrounds"):
      d[k] = tuple(d[k])
    d["sizes"] = tuple((str(n), float(f)) for n, f in d["sizes"])
    return cls(**d)


def _conv(cin, cout, rngs, stride=1, k=3):
  return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding="SAME", rngs=rngs)


def _up(x, factor: int):
  """Nearest-neighbour upsampling `(N, h, w, C)` -> `(N, h*f, w*f, C)`."""
  return jnp.repeat(jnp.repeat(x, factor, 1), factor, 2)


def _pool(x, factor: int):
  """Average pooling `(N, H, W, C)` -> `(N, H/f, W/f, C)`."""
  n, h, w, c = x.shape
  return x.reshape(n, h // factor, factor, w // factor, factor, c).mean((2, 4))


class _Tower(nnx.Module):
  """Levels of two 3x3 convolutions + ReLU, each level after the first at half the resolution."""

  def __init__(self, cin: int, channels: Sequence[int], rngs: nnx.Rngs):
    self.levels = nnx.List()
    for i, c in enumerate(channels):
      self.levels.append(nnx.List([_conv(cin, c, rngs, stride=1 if i == 0 else 2), _conv(c, c, rngs)]))
      cin = c

  def __call__(self, x) -> list:
    feats = []
    for a, b in self.levels:
      x = jax.nn.relu(b(jax.nn.relu(a(x))))
      feats.append(x)
    return feats


def crop_window(masks, side: int):
  """Subject masks `(N, S, S)` (0/1) -> crop centres `(N, 2)` (y, x) in pixel-index coordinates and crop
  sides `(N,)` px: the mask centroid (the sprite's centre: sprites are centroid-normalised) and CROP_GYRATION
  x the mask's radius of gyration (which fits every shape: a star's is ~0.45 of its bounding radius, a
  disc's 0.71). An empty mask gives the whole frame."""
  m = masks.astype(jnp.float32)
  area = m.sum((1, 2))
  grid = jnp.arange(side, dtype=jnp.float32)
  cy = (m.sum(2) * grid).sum(1) / jnp.maximum(area, 1)
  cx = (m.sum(1) * grid).sum(1) / jnp.maximum(area, 1)
  d2 = (m * ((grid[None, :, None] - cy[:, None, None]) ** 2 + (grid[None, None, :] - cx[:, None, None]) ** 2))
  rg = jnp.sqrt(d2.sum((1, 2)) / jnp.maximum(area, 1))
  empty = area < 1
  centre = jnp.where(empty[:, None], (side - 1) / 2, jnp.stack([cy, cx], 1))
  return centre, jnp.where(empty, float(side), jnp.maximum(CROP_GYRATION * rg, 6.0))


CROP_GYRATION = 4.5


def crop(x, centre, side, size: int):
  """Bilinear crops `(N, size, size, C)` of frames x `(N, S, S, C)`: squares of `side` px about `centre`
  (edges repeated outside the frame)."""
  t = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size - 0.5  # (size,) in units of the side

  def one(img, c, s):
    ys, xs = c[0] + t * s, c[1] + t * s
    yy, xx = jnp.meshgrid(ys, xs, indexing="ij")
    return jax.vmap(lambda ch: jax.scipy.ndimage.map_coordinates(ch, [yy, xx], order=1, mode="nearest"),
                    in_axes=-1, out_axes=-1)(img)
  return jax.vmap(one)(x, centre, side)


class Probe(nnx.Module):
  """The probe network (module doc). __call__: frames `(N, S, S, 3)` in [-1, 1] (+ optional masks
  `(N, S, S)` to crop the subject with, and a key to jitter the crop: training) -> dict of outputs; "mask"
  logits are at half resolution `(N, S/2, S/2)` (upsample_mask takes them to S)."""

  def __init__(self, config: ProbeConfig, *, rngs: nnx.Rngs):
    self.config = config
    ch, cc = config.channels, config.crop_channels
    if config.size % 2 ** len(ch) or config.crop % 2 ** (len(cc) - 1):
      raise ValueError(f"probe size {config.size} / crop {config.crop} do not divide by the levels' strides")
    # Frame tower on the space-to-depth frame: lossless, and 4x fewer positions for the first convolutions.
    self.frame = _Tower(12, ch, rngs)
    m = config.mask_channels
    self.lateral = nnx.List([_conv(c, m, rngs, k=1) for c in ch])
    self.mask_conv = _conv(m, m, rngs)
    self.mask_out = _conv(m, 1, rngs, k=1)
    self.back = nnx.Linear(2 * ch[-1], config.hidden // 2, rngs=rngs)
    self.crop_tower = _Tower(3, cc, rngs)
    # The crop is centred, so where a feature sits says which shape it is: its 4x4 layout, not just a pool.
    self.subject = nnx.Linear(17 * cc[-1], config.hidden, rngs=rngs)
    self.heads = nnx.Dict({h: nnx.Linear(config.hidden // 2 if h == "background" else config.hidden,
                                         len(config.names(h)), rngs=rngs) for h in HEADS})
    self.diameter = nnx.Linear(config.hidden, 1, rngs=rngs)
    # The sprite's diameter is about half the crop side: start the ratio there.
    self.diameter.bias.set_value(jnp.full((1,), math.log(0.5), jnp.float32))

  def __call__(self, x, masks=None, key=None):
    n, s = x.shape[0], x.shape[1]
    feats = self.frame(x.reshape(n, s // 2, 2, s // 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, s // 2, s // 2, 12))
    # Mask decoder: coarse to fine, each level's lateral projection added to the upsampled coarser one.
    y = self.lateral[-1](feats[-1])
    for lat, f in zip(self.lateral[-2::-1], feats[-2::-1]):
      y = _up(y, 2) + lat(f)
    mask = self.mask_out(jax.nn.relu(self.mask_conv(jax.nn.relu(y))))[..., 0]  # (N, S/2, S/2) logits
    hb = jax.nn.relu(self.back(jnp.concatenate([feats[-1].mean((1, 2)), feats[-1].max((1, 2))], -1)))
    # The subject's heads read a crop about the subject, scaled to its extent: shape and pattern at a fixed
    # scale, whatever the size and position (the crop comes from the predicted mask unless one is given).
    if masks is None:
      masks = upsample_mask(mask) > 0
    centre, side = crop_window(jax.lax.stop_gradient(masks), s)
    if key is not None:  # jitter (what a predicted mask's error does to the window)
      kc, ks = jax.random.split(key)
      centre = centre + jax.random.uniform(kc, centre.shape, minval=-0.08, maxval=0.08) * side[:, None]
      side = side * jnp.exp(jax.random.uniform(ks, side.shape, minval=-0.15, maxval=0.15))
    cf = self.crop_tower(crop(x, centre, side, self.config.crop))[-1]
    layout = _pool(cf, cf.shape[1] // 4).reshape(n, -1)
    hs = jax.nn.relu(self.subject(jnp.concatenate([layout, cf.max((1, 2))], -1)))
    out = {h: self.heads[h](hb if h == "background" else hs) for h in HEADS}
    out["log_diameter"] = self.diameter(hs)[..., 0] + jnp.log(side / s)
    out["mask"] = mask
    out["features"] = jnp.concatenate([hs, hb], -1)
    return out


def upsample_mask(logits):
  """`(N, S/2, S/2)` mask logits -> `(N, S, S)` (bilinear: a sub-pixel edge, not blocks)."""
  n, h, w = logits.shape
  return jax.image.resize(logits, (n, 2 * h, 2 * w), "linear")


# ------------------------------------------------------------------------------------------ data


def _all_combos(world: WorldConfig) -> tuple[splits.Combo, ...]:
  return splits.combos(world, "train") + splits.combos(world, "heldout")


def batch(world: WorldConfig, config: ProbeConfig, start: int, clips: int, frames_per_clip: int,
          stream: str = "probe") -> dict[str, np.ndarray]:
  """Frames of clips start .. start+clips-1 of `stream` (combination uniform over all of them) and labels:
  frames `(B, S, S, 3)` uint8, mask `(B, S, S)` float32, diameter `(B,)` (fraction of the side), and each
  head's class index `(B,)` int32; B = clips * frames_per_clip."""
  combos = _all_combos(world)
  index = {h: {n: i for i, n in enumerate(config.names(h))} for h in HEADS}
  out = {k: [] for k in ("frames", "mask", "diameter", *HEADS)}
  for i in range(start, start + clips):
    rng = np.random.default_rng([int(world.seed) % 2**32, splits.stream_id(stream), i])
    shape, pattern, colour = combos[int(rng.integers(len(combos)))]
    attrs = clips_lib.sample_attributes(world, i, "train", stream=stream, shape=shape, pattern=pattern,
                                        colour=colour)
    clip = clips_lib.render(world, attrs)
    f = rng.choice(world.frames, size=min(frames_per_clip, world.frames), replace=False)
    frames, masks = clip.frames[f], clip.masks[f]
    if world.size != config.size:
      frames, masks = resize_frames(frames, config.size), resize_masks(masks, config.size)
    out["frames"].append(frames)
    out["mask"].append(masks.astype(np.float32))
    out["diameter"].append(2 * clip.radii[f] / world.size)
    for h, name in zip(HEADS, (shape, pattern, colour, attrs.background)):
      out[h].append(np.full(len(f), index[h][name], np.int32))
  return {k: np.concatenate(v) for k, v in out.items()}


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
  """`(F, H, W, 3)` uint8 -> `(F, size, size, 3)` uint8 (bilinear; the probe reads square frames)."""
  if frames.shape[1:3] == (size, size):
    return frames
  out = jax.image.resize(jnp.asarray(frames, jnp.float32), (len(frames), size, size, 3), "linear",
                         antialias=True)
  return np.asarray(jnp.clip(jnp.round(out), 0, 255)).astype(np.uint8)


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
  out = jax.image.resize(jnp.asarray(masks, jnp.float32), (len(masks), size, size), "linear", antialias=True)
  return np.asarray(out) >= 0.5


# ------------------------------------------------------------------------------------------ training


def _augment(x, key):
  """Per-frame Gaussian noise (std up to 0.04 of the range) and a random amount of 3x3 binomial blur: the
  softness and grain of VAE-decoded frames. x `(B, S, S, 3)` in [-1, 1]."""
  kb, kn, ks, ka = jax.random.split(key, 4)
  pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  rows = (pad[:, :-2] + 2 * pad[:, 1:-1] + pad[:, 2:]) / 4
  blur = (rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]) / 4
  amount = jax.random.uniform(kb, (x.shape[0], 1, 1, 1)) * (jax.random.uniform(ks, (x.shape[0], 1, 1, 1)) < 0.5)
  x = x + (blur - x) * amount
  std = jax.random.uniform(ka, (x.shape[0], 1, 1, 1), maxval=0.08)
  return x + std * jax.random.normal(kn, x.shape)


def losses(out, labels) -> dict:
  """Per-head losses (mean over the batch): cross-entropy, squared error of the log diameter (x10: its
  range is ~0.6 in log), per-pixel binary cross-entropy of the mask (x4, so thin edges matter)."""
  d = {h: optax.softmax_cross_entropy_with_integer_labels(out[h], labels[h]).mean() for h in HEADS}
  d["diameter"] = 10 * ((out["log_diameter"] - jnp.log(labels["diameter"])) ** 2).mean()
  target = _pool(labels["mask"][..., None], 2)[..., 0]  # coverage at the mask head's half resolution
  d["mask"] = 4 * optax.sigmoid_binary_cross_entropy(out["mask"], target).mean()
  return d


def to_input(frames):
  return jnp.asarray(frames, jnp.float32) / 127.5 - 1


@compiler.jit(static_argnums=(0, 1), donate_argnums=(2, 3))
def _train_step(graphdef, tx, params, opt_state, data, key):
  def loss_fn(p):
    ka, kc = jax.random.split(key)
    parts = losses(nnx.merge(graphdef, p)(_augment(to_input(data["frames"]), ka), data["mask"], kc), data)
    return sum(parts.values()), parts
  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, parts


@compiler.jit(static_argnums=(0,))
def _loss(graphdef, params, data):
  parts = losses(nnx.merge(graphdef, params)(to_input(data["frames"]), data["mask"]), data)
  return sum(parts.values())


def make_optimizer(steps: int, lr: float = 3e-3) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, max(1, steps // 10)), max(steps, 2), lr * 0.02)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def train(config: ProbeConfig, world: WorldConfig, *, steps: int, clips: int = 16, frames_per_clip: int = 4,
          lr: float = 3e-3, seed: int = 0, log_every: int = 100, log=None, init: Probe | None = None,
          first_clip: int = 0) -> tuple[Probe, dict]:
  """Train a probe for `steps` steps of `clips * frames_per_clip` frames, from `init` (continued training:
  pass first_clip past the clips it saw) or from scratch. -> (probe, summary)."""
  log = log or (lambda s: print(s, flush=True))
  model = init if init is not None else Probe(config, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  tx = make_optimizer(steps, lr)
  opt_state = tx.init(params)
  key = jax.random.key(seed)
  t0, history = time.time(), []
  for step in range(steps):
    data = batch(world, config, first_clip + step * clips, clips, frames_per_clip)
    params, opt_state, loss, parts = _train_step(graphdef, tx, params, opt_state, data,
                                                 jax.random.fold_in(key, step))
    if (step + 1) % log_every == 0 or step + 1 == steps:
      loss = float(loss)
      history.append((step + 1, loss))
      log(f"step {step + 1}/{steps}  loss {loss:.4f}  " +
          " ".join(f"{k} {float(v):.3f}" for k, v in parts.items()) + f"  {time.time() - t0:.0f}s")
  nnx.update(model, params)
  return model, {"steps": steps, "clips_per_step": clips, "frames_per_clip": frames_per_clip, "lr": lr,
                 "seed": seed, "world_seed": world.seed, "stream": "probe", "first_clip": first_clip,
                 "clips_seen": first_clip + steps * clips, "seconds": round(time.time() - t0, 1),
                 "final_loss": history[-1][1] if history else None}


# ------------------------------------------------------------------------------------------ files


def save_probe(folder: str, model: Probe, training: dict | None = None) -> str:
  from vcjax.weights import store
  path = store.save_component(folder, "probe", model)
  store.write_config(folder, {"format": FORMAT, "probe": model.config.to_dict(), "training": training or {}})
  return path


def load_probe(folder: str | None = None) -> Probe:
  """The probe saved in `folder` (save_probe / the CLI); None: the shipped one (vcjax/world/probe_weights)."""
  from vcjax.weights import store
  folder = folder or SHIPPED
  info = store.read_config(folder)
  if info.get("format") != FORMAT:
    raise ValueError(f"{folder}: not a world probe (config format {info.get('format')!r})")
  config = ProbeConfig.from_dict(info["probe"])
  model = abstract_module(lambda rngs: Probe(config, rngs=rngs))
  return store.set_params(model, store.read_component(folder, "probe"), what=f"{folder} probe")


# ------------------------------------------------------------------------------------------ reading


@compiler.jit(static_argnums=(0,))
def _forward(graphdef, params, frames):
  out = nnx.merge(graphdef, params)(to_input(frames))
  probs = {h: jax.nn.log_softmax(out[h]) for h in HEADS}
  return dict(probs, log_diameter=out["log_diameter"], mask=upsample_mask(out["mask"]) > 0, features=out["features"])


def predict(model: Probe, frames: np.ndarray, chunk: int = 64) -> dict[str, np.ndarray]:
  """`(N, H, W, 3)` uint8 frames (resized to the probe's side) -> per-frame numpy outputs: each head's
  log-probabilities `(N, C)`, log_diameter `(N,)`, mask `(N, S, S)` bool, features `(N, D)`. Frames go
  through in fixed chunks (the last one padded) so one program serves every call."""
  frames = resize_frames(np.asarray(frames, np.uint8), model.config.size)
  graphdef, params = nnx.split(model)
  parts = []
  for i in range(0, len(frames), chunk):
    x = frames[i:i + chunk]
    pad = chunk - len(x)
    x = np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
    parts.append(jax.tree.map(lambda a, n=len(x) - pad: np.asarray(a)[:n], _forward(graphdef, params, x)))
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@functools.cache
def shape_fill(name: str) -> float:
  """The area of shape `name` over its bounding circle's (1 for a circle; rotation-invariant)."""
  from vcjax.world import sprites
  g = np.linspace(-1, 1, 801)
  u, v = np.meshgrid(g, g)
  return float(sprites.shape_inside(name, u, v).mean() * 4 / math.pi)


def video_attributes(config: ProbeConfig, out: dict[str, np.ndarray]) -> dict[str, str]:
  """One video's per-frame outputs (predict) -> {head: name} (the highest mean log-probability over the
  frames) and "size": the size nearest (in log) to the median over frames of the diameter implied by the
  predicted mask's area and the read shape's fill (diameter = 2 sqrt(area / (pi fill))). On ground truth
  that is right more often than the diameter head's regression (0.96 vs 0.91 of 200 clips, an earlier
  checkpoint), which stays a training target."""
  res = {h: config.names(h)[int(np.argmax(out[h].mean(0)))] for h in HEADS}
  side = out["mask"].shape[-1]
  area = out["mask"].sum((1, 2)).astype(np.float64)
  with np.errstate(divide="ignore"):
    d = np.log(2 * np.sqrt(area / (math.pi * shape_fill(res["shape"]))) / side)
  d = d[np.isfinite(d)]
  d = float(np.median(d)) if len(d) else float(np.median(out["log_diameter"]))
  res["size"] = min(config.sizes, key=lambda s: abs(math.log(s[1]) - d))[0]
  return res


def frame_accuracy(model: Probe, data: dict[str, np.ndarray]) -> dict[str, float]:
  """Per-frame accuracies of a `batch` (sizes: nearest diameter to the true one's nearest) and mask IoU."""
  out = predict(model, data["frames"])
  acc = {h: float((out[h].argmax(1) == data[h]).mean()) for h in HEADS}
  sizes = np.log([f for _, f in model.config.sizes])
  nearest = lambda logd: np.abs(np.asarray(logd)[:, None] - sizes[None]).argmin(1)
  acc["size"] = float((nearest(out["log_diameter"]) == nearest(np.log(data["diameter"]))).mean())
  m, t = out["mask"], data["mask"] > 0.5
  acc["mask_iou"] = float(((m & t).sum((1, 2)) / np.maximum((m | t).sum((1, 2)), 1)).mean())
  return acc


def parameter_count(model: Probe) -> int:
  return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _clips_seen(training: dict) -> int:
  return int(training.get("clips_seen", training.get("steps", 0) * training.get("clips_per_step", 0)))


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m vcjax.world.probe", description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="folder for probe.safetensors + config.json")
  ap.add_argument("--steps", type=int, default=3000)
  ap.add_argument("--clips", type=int, default=16, help="clips rendered per step")
  ap.add_argument("--frames-per-clip", type=int, default=4)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--size", type=int, default=64, help="the probe's frame side")
  ap.add_argument("--channels", default="16,32,64")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--world-seed", type=int, default=0)
  ap.add_argument("--log-every", type=int, default=100)
  ap.add_argument("--init", help="continue training this probe folder (its config; clips after the ones it saw)")
  ap.add_argument("--check-clips", type=int, default=64, help="held-out clips for the final frame accuracy")
  args = ap.parse_args(argv)
  world = WorldConfig(seed=args.world_seed)
  config = ProbeConfig.for_world(world, size=args.size, channels=tuple(int(c) for c in args.channels.split(",")))
  init, previous = None, None
  if args.init:
    from vcjax.weights import store
    init, previous = load_probe(args.init), store.read_config(args.init).get("training", {})
    config = init.config
  cpu0 = time.process_time()
  model, summary = train(config, world, steps=args.steps, clips=args.clips, frames_per_clip=args.frames_per_clip,
                         lr=args.lr, seed=args.seed, log_every=args.log_every, init=init,
                         first_clip=_clips_seen(previous or {}))
  summary["cpu_seconds"] = round(time.process_time() - cpu0, 1)
  if previous is not None:
    summary["previous"] = previous
  summary["parameters"] = parameter_count(model)
  if args.check_clips:
    acc = frame_accuracy(model, batch(world, config, 0, args.check_clips, 4, stream="probe-check"))
    summary["check_frame_accuracy"] = acc
    print("frame accuracy on held-out draws:", json.dumps({k: round(v, 4) for k, v in acc.items()}))
  path = save_probe(args.out, model, summary)
  print(f"{summary['parameters']} parameters, {summary['seconds']}s ({summary['cpu_seconds']}s CPU) -> {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
