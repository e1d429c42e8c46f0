"""World model, stage 1: the VAE (4x downsampling, 4 latent channels) on world frames.

    python -m vcjax.world.export --out data/world --kind t2v --num 20000 --name train --workers 2
    python -m vcjax.world.tokenizer --out runs/world/tokenizer
    python train.py --config configs/world_vae.py --workdir runs/world_vae \
        --config.data.dir=data/world --config.tokenizer=runs/world/tokenizer

Writes runs/world_vae/final/model/: a converted folder with the VAE (scaling factor measured) and the
tokenizer, which stage 2 (configs/world_t2v.py) starts from. Re-running the command resumes.

Continuing from a converted folder instead (its VAE and tokenizer, a fresh optimizer; e.g. the snapshot a
working day ended with, see models/snapshots/README.md):

    python train.py --config configs/world_vae.py:continue --workdir runs/world_vae_b \
        --config.model=SNAPSHOT --config.tokenizer=SNAPSHOT/tokenizer --config.data.dir=data/world \
        --config.num_steps=STEPS
"""

import ml_collections

from configs.train_common import vae_config


def get_config(variant: str = ""):
  if variant not in ("", "continue"):
    raise ValueError(f"configs/world_vae.py takes no argument or ':continue', got {variant!r}")
  c = vae_config()
  if variant == "continue":
    c.vae = ml_collections.ConfigDict()  # empty: config.model's VAE
  c.resolution = 64
  c.num_frames = 16  # frames read per clip; frames_per_clip of them train
  c.frames_per_clip = 2
  c.batch_size = 8  # clips: 16 frames per step
  c.num_steps = 2000
  # The sprite is ~1/10 of a frame: without this term its hue is lost to the backgrounds' textures
  # (vcjax/train/objectives/vae.py). The world's export stores the per-frame masks it needs.
  c.subject_weight = 1.0
  c.data.kind = "folder"
  c.data.dataset = "vcjax_video_clips/train"
  c.checkpoint.every = 250
  c.log_every = 25
  return c
