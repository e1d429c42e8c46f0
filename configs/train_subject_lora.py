"""CustomCrafter subject LoRA as the authors' training code runs it (METHODS.md §4, §6).

    python train.py --config configs/train_subject_lora.py --workdir runs/subject \
        --config.model=CONVERTED_DIR --config.data.dir=DATA_DIR --config.class_word=dog

Rank-4 LoRA on to_q/to_k/to_v of every spatial attn1/attn2, a new token "<new1>" initialised from the class
word, 4-frame static clips at 512x512, prior preservation (weight 1), AdamW weight decay 1e-2, 10k steps.
The authors' code, where it differs from the paper: masked L1 loss, lr 3e-5 per example x the global
batch of 8 (their 4 GPUs x one subject + one class image) = 2.4e-4, no gradient clipping, 20% of subject
and class captions dropped to "", discrete rescale (0.3..1.0 / 1.2..1.4 in steps of 0.1, pasting only
below 0.6, black canvas) and no flip of class images. The paper's choices instead:
--config.loss_kind=l2 --config.augment=paper --config.caption_dropout=0 (lr: --config.optimizer.scale_lr=False
--config.optimizer.learning_rate=3e-5). Fewer devices: --config.batch_size=2 (lr then 6e-5, same rule).
DATA_DIR holds a dataset built with vcjax.data.builders.prepare_subject_dataset (subject images + a "prior"
split of ~200 class images).
"""

from configs.train_common import default_config


def get_config():
  c = default_config("subject")
  c.batch_size = 8  # subject and class images alternate: 4 + 4
  c.num_steps = 10_000
  c.checkpoint.every = 500
  return c
