"""CustomCrafter on the world: a subject LoRA of one held-out sprite (issue E2), from 6 still images.

    python -m vcjax.world.export --out data/world --kind subject --subject 9 --num 6 --num-prior 50 \
        --placeholder "<new1>" --name subject_9
    python train.py --config configs/world_subject.py --workdir runs/world_subject_9 \
        --config.model=models/world --config.data.dir=data/world \
        --config.data.dataset=vcjax_subject_images/subject_9 --config.class_word=star

Held-out sprite 9 of vcjax/world/config.py is a solid black star (class word: its shape). The images'
captions name it "<new1> star" in the world's grammar ("a <new1> star standing still over grass"); the
class images (other stars of the training split) leave the appearance out, DreamBooth's prior
preservation. Rank-4 LoRA on the spatial q/k/v with the new token, as configs/train_subject_lora.py, but:
the images as they are (no rescale, no flip: "close up" is not a world word and a flip changes a
crescent), and a learning rate sized to a run of minutes: 1e-3 for 1000 steps (~8 min here). Measured on
sprite 9 (8 moving prompts x seeds 0-1, LoRA scale 1): lr 1e-4 x 400 steps draws its colour in 2 of 16
videos, lr 1e-3 x 1000 steps in 12 of 16.

    python sample.py --config configs/sample_customcrafter.py --config.model=models/world \
        --config.lora=runs/world_subject_9/final/lora.safetensors --config.height=64 --config.width=64 \
        --config.prompt="a <new1> star moving left over grass"
"""

from configs.train_common import default_config
from configs.world_t2v import WORLD_BETAS, WORLD_PREDICTION


def get_config():
  c = default_config("subject")
  c.model = "models/world"
  c.beta_start, c.beta_end = WORLD_BETAS  # the base's schedule and target (models/world/scheduler)
  c.prediction_type = WORLD_PREDICTION
  c.resolution = 64
  c.num_frames = 4
  c.batch_size = 4  # subject and class images alternate: 2 + 2
  c.num_steps = 1000
  c.optimizer.update(learning_rate=1e-3, scale_lr=False, warmup_steps=20)
  c.class_word = "star"
  c.augment = "none"
  c.use_captions = True
  c.caption_dropout = 0.1
  c.data.update(dict(kind="folder", dataset="vcjax_subject_images/subject_9"))
  c.checkpoint.every = 100
  c.log_every = 10
  return c
