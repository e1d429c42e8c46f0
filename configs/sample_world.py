"""The world model shipped in models/world/ (trained by configs/world_vae.py + configs/world_t2v.py on the
procedural world, vcjax/world/): what `python sample.py` with no --config runs.

    python sample.py                                   # the default prompt: 16 frames, 64x64, mp4 + gif
    python sample.py --config configs/sample_world.py \
        --config.prompt="a big striped yellow heart moving up right over water"

Prompts follow the world's grammar (vcjax/world/__init__.py): "a" [size] pattern colour shape motion [speed]
background. The scheduler is the model's own (DDIM over its training betas).
"""

import os

from configs import sample_animatediff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "world")


def get_config():
  c = sample_animatediff.get_config()
  c.model = MODEL
  c.prompt = "a dotted red star moving right over grass"
  c.negative_prompt = ""
  c.num_frames = 16
  c.height = c.width = 64
  c.steps = 25
  c.guidance_scale = 4.0
  c.scheduler = sample_animatediff.scheduler_overrides("ddim")  # every field from the model's scheduler
  c.output = "outputs/world.mp4"
  return c
