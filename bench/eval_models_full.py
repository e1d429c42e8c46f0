"""The evaluation models at their real sizes vs their PyTorch references, on random weights (not in CI).

    python bench/eval_models_full.py [--only clip,dino,raft] [--raft-size 256]

CLIP ViT-B/32 (transformers CLIPModel with openai/clip-vit-base-patch32's config), DINO ViT-S/16
(transformers ViTModel with facebook/dino-vits16's config) and RAFT (tests/raft_torch.py, the full model)
are saved in their real file formats, loaded torch-free, run on the same inputs, and compared by relative
L2 error; timings are the vcjax forward after compilation (vcjax.compiler.jit) and the torch forward.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.reference import rel_err  # noqa: E402
from vcjax.testing import randomize_  # noqa: E402


def timed(fn, repeat=3):
  out = fn()
  times = []
  for _ in range(repeat):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return out, float(np.median(times))


def check_clip(tmp):
  import jax
  import jax.numpy as jnp
  import torch
  import transformers
  from flax import nnx

  from vcjax import compiler
  from vcjax.weights.eval_models import load_clip
  text = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=8, eos_token_id=2)
  vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=32)
  ref = randomize_(transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                                  projection_dim=512)).eval(), 0)
  ref.save_pretrained(tmp, safe_serialization=True)
  model = load_clip(tmp)
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((16, 3, 224, 224)).astype(np.float32)
  ids = np.full((4, 77), 49407, np.int64)
  ids[:, 0] = 49406
  ids[:, 1:12] = rng.integers(0, 49000, (4, 11))
  with torch.no_grad():
    (want_i, t_torch) = timed(lambda: ref.get_image_features(pixel_values=torch.from_numpy(pixels)))
    want_t = ref.get_text_features(input_ids=torch.from_numpy(ids))
  want_i = getattr(want_i, "pooler_output", want_i).numpy()
  want_t = getattr(want_t, "pooler_output", want_t).numpy()
  gd, st = nnx.split(model)
  img = compiler.jit(lambda s, x: nnx.merge(gd, s).get_image_features(x))
  txt = compiler.jit(lambda s, x: nnx.merge(gd, s).get_text_features(x))
  px = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  got_i, t_jax = timed(lambda: jax.block_until_ready(img(st, px)))
  got_t = txt(st, jnp.asarray(ids, jnp.int32))
  print(f"CLIP ViT-B/32 image features (16 x 224^2): rel err {rel_err(got_i, want_i):.2e}; "
        f"vcjax {t_jax * 1e3:.0f} ms, torch {t_torch * 1e3:.0f} ms")
  print(f"CLIP ViT-B/32 text features (4 x 77):      rel err {rel_err(got_t, want_t):.2e}")


def check_dino(tmp):
  import jax
  import jax.numpy as jnp
  import torch
  import transformers
  from flax import nnx

  from vcjax import compiler
  from vcjax.weights.eval_models import load_dino
  cfg = transformers.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                               intermediate_size=1536, image_size=224, patch_size=16)
  ref = randomize_(transformers.ViTModel(cfg).eval(), 1)
  ref.save_pretrained(tmp, safe_serialization=True)
  model = load_dino(tmp)
  pixels = np.random.default_rng(1).standard_normal((16, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    want, t_torch = timed(lambda: ref(pixel_values=torch.from_numpy(pixels)).last_hidden_state[:, 0].numpy())
  gd, st = nnx.split(model)
  fn = compiler.jit(lambda s, x: nnx.merge(gd, s).cls(x))
  px = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  got, t_jax = timed(lambda: jax.block_until_ready(fn(st, px)))
  print(f"DINO ViT-S/16 CLS (16 x 224^2): rel err {rel_err(got, want):.2e}; "
        f"vcjax {t_jax * 1e3:.0f} ms, torch {t_torch * 1e3:.0f} ms")


def check_raft(tmp, size):
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  from tests import raft_torch
  from vcjax import compiler
  from vcjax.weights.eval_models import load_raft
  ref = raft_torch.randomized(0)
  path = os.path.join(tmp, "raft-things.pth")
  raft_torch.save_original_format(ref, path)
  model = load_raft(path)
  rng = np.random.default_rng(2)
  a = rng.uniform(0, 255, (2, size, size, 3)).astype(np.float32)
  b = np.roll(a, (3, -2), axis=(1, 2))
  t = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    want, t_torch = timed(lambda: ref(t(a), t(b), iters=20).numpy().transpose(0, 2, 3, 1), repeat=1)
  gd, st = nnx.split(model)
  fn = compiler.jit(lambda s, x, y: nnx.merge(gd, s)(x, y, iters=20))
  got, t_jax = timed(lambda: jax.block_until_ready(fn(st, jnp.asarray(a), jnp.asarray(b))), repeat=1)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"RAFT ({n / 1e6:.2f}M params, 2 pairs x {size}^2, 20 iters): rel err {rel_err(got, want):.2e}, "
        f"max abs {np.abs(got - want).max():.2e} px; vcjax {t_jax:.2f} s, torch {t_torch:.2f} s")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", default="clip,dino,raft")
  p.add_argument("--raft-size", type=int, default=256)
  args = p.parse_args()
  only = set(args.only.split(","))
  with tempfile.TemporaryDirectory() as tmp:
    if "clip" in only:
      check_clip(os.path.join(tmp, "clip"))
    if "dino" in only:
      check_dino(os.path.join(tmp, "dino"))
    if "raft" in only:
      check_raft(tmp, args.raft_size)


if __name__ == "__main__":
  main()
