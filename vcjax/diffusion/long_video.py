"""Long videos (FreeNoise) and prompt travel: the sampler-side pieces, as diffusers' `AnimateDiffFreeNoiseMixin`.

FreeNoise itself runs inside the motion modules (`vcjax.models.free_noise`); here: its initial noise
(`initial_noise`: "shuffle_context" re-uses the first `context_length` frames' noise, shuffled within
`context_stride` groups, "repeat_context" tiles it, "random" draws every frame), and prompt travel
(`frame_prompts`): a dict frame -> prompt whose text embeddings are interpolated linearly between the key
frames (diffusers' `_encode_prompt_free_noise` with its default `_lerp`), giving each frame its own
`(T, D)` conditioning.

    pipe.enable_free_noise(context_length=16, context_stride=4)
    out = pipe.generate([{0: "a cat", 32: "a dog"}], seeds=[0], num_frames=64)
"""

from __future__ import annotations

import json
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vcjax.models.free_noise import FreeNoiseConfig


# ---------------------------------------------------------------------------------------------- noise
def shuffle_steps(num_frames: int, config: FreeNoiseConfig) -> list[tuple[int, int, int]]:
  """diffusers' "shuffle_context" loop: (source start, target start, count) per step, in order; step j
  copies a permutation of frames [source, source + stride) onto [target, target + count)."""
  length, stride = config.context_length, config.context_stride
  steps = []
  for i in range(length, num_frames, stride):
    start = max(0, i - length)
    end = min(num_frames, start + stride)
    if end == start:
      break
    steps.append((start, i, min(num_frames, i + end - start) - i))
  return steps


def shuffle_noise(noise: np.ndarray, config: FreeNoiseConfig, permutations: Sequence[np.ndarray]) -> np.ndarray:
  """Apply "shuffle_context" to one video's noise `(F, h, w, C)` (frames from `context_length` on are
  overwritten), with permutations[j] the order of step j's `context_stride` source frames. Sequential, as
  diffusers: a later step may copy frames an earlier one wrote."""
  noise = np.array(noise, copy=True)
  for (start, target, count), perm in zip(shuffle_steps(noise.shape[0], config), permutations, strict=True):
    noise[target:target + count] = noise[start + np.asarray(perm)[:count]]
  return noise


def permutations(key, num_frames: int, config: FreeNoiseConfig) -> list[np.ndarray]:
  """One video's shuffle permutations, each from fold_in(key, step)."""
  n = len(shuffle_steps(num_frames, config))
  return [np.asarray(jax.random.permutation(jax.random.fold_in(key, j), config.context_stride)) for j in range(n)]


def initial_noise(keys, shape: tuple[int, ...], config: FreeNoiseConfig | None, noise=None) -> jax.Array:
  """`(B, F, h, w, C)` initial noise for FreeNoise; shape = (F, h, w, C); keys: `(B,)` per-video keys (the
  noise from normal(key), the shuffles from fold_in(key, 1)), so a video's noise depends on its seed alone.

  noise: given initial latents instead: `(B, F, ...)` are used as they are (as diffusers uses given
  latents); `(B, context_length, ...)` are extended by the noise type ("random" cannot be)."""
  f = shape[0]
  if noise is None:
    if config is None or config.noise_type == "random":
      return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
    frames = f if config.noise_type == "shuffle_context" else config.context_length
    base = np.asarray(jax.vmap(lambda k: jax.random.normal(k, (frames, *shape[1:])))(keys))
  else:
    base = np.asarray(noise, np.float32)
    if base.shape[1] == f or config is None:
      return jnp.asarray(base)
    if base.shape[1] != config.context_length or config.noise_type == "random":
      raise ValueError(f"initial noise of {base.shape[1]} frames for a {f}-frame video: give {f} frames"
                       + ("" if config.noise_type == "random" else f" or context_length {config.context_length}"))
  if config.noise_type == "repeat_context":
    reps = -(-f // base.shape[1])
    return jnp.asarray(np.concatenate([base] * reps, axis=1)[:, :f])
  if base.shape[1] < f:  # given context_length frames: the rest is overwritten by the shuffles
    base = np.concatenate([base, np.zeros((base.shape[0], f - base.shape[1], *base.shape[2:]), base.dtype)], 1)
  out = [shuffle_noise(base[b], config, permutations(jax.random.fold_in(keys[b], 1), f, config))
         for b in range(base.shape[0])]
  return jnp.asarray(np.stack(out))


# ------------------------------------------------------------------------------------------- prompts
def parse_prompts(spec: str | Mapping) -> dict[int, str]:
  """A frame -> prompt dict from a dict, JSON ('{"0": "a cat", "8": "a dog"}') or 'frame:prompt|frame:prompt'
  ("0:a cat|8:a dog"). Raises ValueError on bad syntax."""
  if isinstance(spec, Mapping):
    items = list(spec.items())
  else:
    text = str(spec).strip()
    if text.startswith("{"):
      try:
        items = list(json.loads(text).items())
      except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"prompts: not a JSON object of frame -> prompt: {e}") from None
    else:
      items = []
      for part in text.split("|"):
        frame, sep, prompt = part.partition(":")
        if not sep:
          raise ValueError(f"prompts: {part.strip()!r} is not frame:prompt (write 'frame:prompt|frame:prompt' "
                           f"or JSON)")
        items.append((frame.strip(), prompt.strip()))
  out = {}
  for frame, prompt in items:
    try:
      index = int(frame)
    except (TypeError, ValueError):
      raise ValueError(f"prompts: frame index {frame!r} is not an integer") from None
    if not isinstance(prompt, str) or not prompt:
      raise ValueError(f"prompts: frame {index} needs a non-empty prompt string, got {prompt!r}")
    if index in out:
      raise ValueError(f"prompts: frame {index} given twice")
    out[index] = prompt
  if not out:
    raise ValueError("prompts: no frame:prompt given")
  return out


def check_prompts(prompts: Mapping[int, str], num_frames: int) -> None:
  """diffusers' rules: integer frames, the first 0, every one < num_frames."""
  frames = sorted(prompts)
  if frames[0] != 0:
    raise ValueError(f"prompts: the first key frame must be 0 (a starting prompt), got {frames[0]}")
  if frames[-1] >= num_frames:
    raise ValueError(f"prompts: frame index {frames[-1]} out of range for {num_frames} frames (0-based)")


def lerp(start: int, end: int, a, b):
  """diffusers' `_lerp`: frames start..end (inclusive) from `(T, D)` embeddings a to b, alpha = i / n."""
  n = end - start + 1
  alphas = [i / (n - 1) for i in range(n)]  # Python floats, as diffusers; each product in float32
  return jnp.stack([jnp.float32(1 - al) * a + jnp.float32(al) * b for al in alphas])


def interpolate(embeds, frames: Sequence[int], num_frames: int,
                interpolation: Callable = lerp) -> jax.Array:
  """Key-frame embeddings `(K, T, D)` at sorted `frames` (the first 0) -> `(num_frames, T, D)`. The last key
  frame's embedding holds to the end (diffusers adds it as key frame num_frames - 1); each segment's end
  frame is overwritten by the next segment's start, which is the same embedding."""
  embeds = jnp.asarray(embeds, jnp.float32)
  frames = list(frames)
  if frames[-1] != num_frames - 1:
    frames, embeds = frames + [num_frames - 1], jnp.concatenate([embeds, embeds[-1:]])
  out = jnp.zeros((num_frames, *embeds.shape[1:]), jnp.float32)
  for i in range(len(frames) - 1):
    out = out.at[frames[i]:frames[i + 1] + 1].set(interpolation(frames[i], frames[i + 1], embeds[i], embeds[i + 1]))
  return out


def frame_prompts(encode: Callable, prompts: Sequence[str | Mapping[int, str]], num_frames: int) -> jax.Array:
  """Text conditioning for a batch whose prompts may be frame -> prompt dicts. encode: list of prompts ->
  `(K, T, D)`. -> `(B, T, D)` when every prompt is a string, else `(B, F, T, D)` (strings held on every
  frame)."""
  if all(isinstance(p, str) for p in prompts):
    return encode(list(prompts))
  rows = []
  for p in prompts:
    p = {0: p} if isinstance(p, str) else parse_prompts(p)
    check_prompts(p, num_frames)
    frames = sorted(p)
    rows.append(interpolate(encode([p[k] for k in frames]), frames, num_frames))
  return jnp.stack(rows)


def per_frame(uncond, cond):
  """The negative prompt's `(B, T, D)` on every frame when `cond` is per frame `(B, F, T, D)`."""
  if cond.ndim == 4 and uncond.ndim == 3:
    return jnp.broadcast_to(uncond[:, None], (uncond.shape[0], cond.shape[1], *uncond.shape[1:]))
  return uncond


def with_reference_frame(context):
  """Per-frame context `(B, F, T, D)` -> `(B, F + 1, T, D)` for VideoMaker's extra last frame, which gets
  frame 0's (the starting prompt's) embedding; shared context `(B, T, D)` unchanged."""
  return jnp.concatenate([context, context[:, :1]], axis=1) if context.ndim == 4 else context


def enable_from_settings(pipe, settings: Mapping | None) -> None:
  """sample.py's `config.free_noise` (enabled, context_length (0: the motion module's), context_stride,
  weighting_scheme, noise_type, scope) onto a VideoPipeline; nothing when absent or not enabled."""
  settings = dict(settings or {})
  if not settings.pop("enabled", False):
    return
  unknown = sorted(set(settings) - {"context_length", "context_stride", "weighting_scheme", "noise_type", "scope"})
  if unknown:
    raise ValueError(f"unknown free_noise setting(s) {unknown}")
  settings["context_length"] = settings.get("context_length") or None
  pipe.enable_free_noise(**settings)
