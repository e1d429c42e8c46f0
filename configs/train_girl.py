"""VideoMaker GIRL training at the paper's settings (METHODS.md §3).

    python train.py --config configs/train_girl.py --workdir runs/girl \
        --config.model=CONVERTED_DIR --config.data.dir=DATA_DIR

Trainable: spatial attn1 q/k/v/out outside the motion modules + all motion-module parameters; PISA with the
reference as an extra frame; Min-SNR(5) eps loss on 16 frames + 0.1 x reference loss (reference noised at
int(0.01 t)); 5% / 5% / 5% text / reference / both dropout; AdamW lr 1e-5, wd 1e-2, clip 1.0; batch 1 per
device (the paper: 4-8 GPUs), bf16 compute and gradient checkpointing, 100k+ steps. On several devices:
--config.batch_size=8 (data parallel) and --config.mesh.fsdp=8 --config.mesh.param_sharding=fsdp to shard
parameters and optimizer state. DATA_DIR: vcjax.data.builders.prepare_video_dataset output.
"""

from configs.train_common import default_config


def get_config():
  c = default_config("girl")
  c.batch_size = 8
  c.num_steps = 150_000
  c.dtype = "bfloat16"
  c.remat = True
  c.data.shp = "human"
  c.checkpoint.every = 1000
  c.log_every = 50
  return c
