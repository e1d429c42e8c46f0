"""CustomCrafter subject LoRA at the paper's settings (METHODS.md §4).

    python train.py --config configs/train_subject_lora.py --workdir runs/subject \
        --config.model=CONVERTED_DIR --config.data.dir=DATA_DIR --config.class_word=dog

Rank-4 LoRA on to_q/to_k/to_v of every spatial attn1/attn2, a new token "<new1>" initialised from the class
word, 4-frame static clips at 512x512, masked L2 loss + prior preservation (weight 1), AdamW lr 3e-5
(the authors' code effectively used 2.4e-4 after its lr scaling: --config.optimizer.learning_rate=2.4e-4;
their loss was L1: --config.loss_kind=l1), weight decay 1e-2, 10k steps. DATA_DIR holds a dataset built with
vcjax.data.builders.prepare_subject_dataset (subject images + a "prior" split of ~200 class images).
"""

from vcjax.train.loop import default_config


def get_config():
  c = default_config("subject")
  c.batch_size = 2  # one subject + one class image
  c.num_steps = 10_000
  c.checkpoint.every = 500
  return c
