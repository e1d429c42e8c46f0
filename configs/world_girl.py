"""VideoMaker on the world: GIRL training of the world model (issue E2), PISA with one reference image.

    python -m vcjax.world.export --out data/world --kind girl --num 8000 --name girl_bare --captions bare \
        --workers 2 --encoding zlib
    python train.py --config configs/world_girl.py --workdir runs/world_girl \
        --config.model=models/world --config.data.dir=data/world

The clips' captions leave the sprite's pattern and colour out ("a big star moving left over grass"), so
the reference (a separate still render of the same sprite, SHP-cut onto white) is the only place they are
shown: what GIRL must learn to read. Everything else is the paper's objective (configs/train_girl.py):
PISA + remind noise, Min-SNR(5) loss + 0.1 x reference loss, 5% / 5% / 5% condition dropout, trainable
attn1 and the motion modules ("Update Motion": --config.train_motion=False turns it off), with the world
model's betas and v-prediction target instead of SD's eps. The learning rate is 10x the paper's: a
6M-parameter model and a run of minutes, not SD1.5 and 100k steps.
"""

from configs.train_common import default_config
from configs.world_t2v import WORLD_BETAS, WORLD_PREDICTION


def get_config():
  c = default_config("girl")
  c.model = "models/world"
  c.beta_start, c.beta_end = WORLD_BETAS  # the base's schedule and target (models/world/scheduler)
  c.prediction_type = WORLD_PREDICTION
  c.resolution = 64
  c.num_frames = 16
  c.batch_size = 4
  c.num_steps = 1500
  c.optimizer.update(learning_rate=1e-4, warmup_steps=100)
  c.data.update(dict(kind="folder", dataset="vcjax_video_clips/girl_bare", shp="object", frame_stride=1))
  c.checkpoint.every = 250
  c.log_every = 20
  return c
