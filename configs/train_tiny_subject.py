"""Tiny subject-LoRA run for tests and smoke checks (random tiny pipeline, synthetic or tiny data; CPU).

    python -m vcjax.testing --size tiny --out /tmp/rnd
    python convert/animatediff.py --base /tmp/rnd/base --motion-module /tmp/rnd/motion_adapter --out /tmp/tiny
    python train.py --config configs/train_tiny_subject.py --workdir /tmp/run_subject --config.model=/tmp/tiny

Real tiny data instead of synthetic: --config.data.kind=folder --config.data.dir=DIR.
"""

from configs.train_common import default_config


def get_config():
  c = default_config("subject")
  c.model = "/tmp/tiny"
  c.resolution = 32
  c.num_frames = 2
  c.batch_size = 2
  c.num_steps = 6
  c.optimizer.learning_rate = 1e-3
  c.optimizer.scale_lr = False  # 1e-3 per step, as before the authors' lr rule became the default
  c.data.kind = "synthetic"
  c.checkpoint.every = 3
  c.checkpoint.async_save = True
  c.log_every = 1
  c.progress = False
  return c
