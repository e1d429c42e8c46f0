"""World model, stage 1: the VAE (4x downsampling, 4 latent channels) on world frames.

    python -m vcjax.world.export --out data/world --kind t2v --num 20000 --name train --workers 2
    python -m vcjax.world.tokenizer --out runs/world/tokenizer
    python train.py --config configs/world_vae.py --workdir runs/world_vae \
        --config.data.dir=data/world --config.tokenizer=runs/world/tokenizer

Writes runs/world_vae/final/model/: a converted folder with the VAE (scaling factor measured) and the
tokenizer, which stage 2 (configs/world_t2v.py) starts from. Re-running the command resumes.
"""

from configs.train_common import vae_config


def get_config():
  c = vae_config()
  c.resolution = 64
  c.num_frames = 16  # frames read per clip; frames_per_clip of them train
  c.frames_per_clip = 2
  c.batch_size = 8  # clips: 16 frames per step
  c.num_steps = 2000
  c.data.kind = "folder"
  c.data.dataset = "vcjax_video_clips/train"
  c.checkpoint.every = 250
  c.log_every = 25
  return c
