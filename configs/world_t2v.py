"""World model, stage 2: the UNet3D (spatial + motion modules) and a CLIP text encoder, trained jointly
from scratch for text-to-video with the v-prediction objective, over the frozen stage-1 VAE.

    python train.py --config configs/world_t2v.py --workdir runs/world_t2v \
        --config.model=runs/world_vae/final/model --config.data.dir=data/world

Writes runs/world_t2v/final/model/: the complete converted model (sample.py --config.model=...).
Re-running the command resumes from the newest checkpoint.

Continuing from a converted folder instead (the UNet and text encoder of config.model, a fresh optimizer;
e.g. the snapshot a working day ended with, see models/snapshots/README.md):

    python train.py --config configs/world_t2v.py:continue --workdir runs/world_t2v_b \
        --config.model=SNAPSHOT --config.num_steps=STEPS_LEFT [--config.vae_model=NEWER_VAE_FOLDER]

AnimateDiff's two stages instead of joint training (the comparison of E1): `:images` trains the image
model (spatial layers + text encoder) on single frames, as many frames a step as a joint step has; then
`:motion` trains only the motion modules on clips, over the frozen stage-1 model:

    python train.py --config configs/world_t2v.py:images --workdir runs/world_t2v_images \
        --config.model=models/snapshots/world_vae --config.data.dir=data/world --config.num_steps=N1
    python train.py --config configs/world_t2v.py:motion --workdir runs/world_t2v_motion \
        --config.model=runs/world_t2v_images/final/model --config.data.dir=data/world --config.num_steps=N2
"""

import ml_collections

from configs.train_common import t2v_config

# 16x16 latents (64x64 frames, 4x VAE); cross-attention at the 8x8 and 4x4 levels, motion modules everywhere.
# Chosen by XLA's cost analysis of one batch-4 x 16-frame step (fwd + bwd): channels 64/128/128 with attention
# on all three levels 205 GFLOP (8.4M parameters), 64/128/128 without level-0 attention 186, 48/96/128 120,
# 32/64/128 (this) 71 GFLOP at 5.7M parameters: ~3x more clips in the time budget, and 11 MB in float16.
UNET = dict(block_out_channels=(32, 64, 128), layers_per_block=1,
            down_block_types=("DownBlock", "CrossAttnDownBlock", "CrossAttnDownBlock"),
            up_block_types=("CrossAttnUpBlock", "CrossAttnUpBlock", "UpBlock"),
            num_attention_heads=4, cross_attention_dim=128, norm_num_groups=16, motion_num_heads=4,
            motion_max_seq_length=32, resnet_norm_across_frames=False, out_norm_across_frames=False,
            motion_norm_across_frames=True)  # diffusers' GroupNorm semantics
# A small CLIP text transformer over the world tokenizer (24 positions); vocab_size comes from the tokenizer.
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=24, hidden_act="quick_gelu")


# The world model's training schedule; the GIRL and subject configs fine-tune it with the same (train.py refuses
# a fine-tune whose betas or target differ from the base folder's scheduler config).
WORLD_BETAS = (0.0001, 0.02)
WORLD_PREDICTION = "v_prediction"

VARIANTS = ("", "continue", "images", "motion")


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise ValueError(f"configs/world_t2v.py takes no argument or one of "
                     f"{', '.join(':' + v for v in VARIANTS if v)}, got {variant!r}")
  c = t2v_config()
  # DDPM's linear betas, not SD's (0.00085..0.012): at 16x16 latents SD's schedule leaves 4% of the signal
  # at t = T, and the per-frame mean of the noise then decides each frame's background. Measured on the
  # SD-betas run at step 1400 (16 prompts): sampled from noise with each frame's mean removed, background
  # accuracy 0.5 -> 1.0 and the scene stopped changing from frame to frame. Here alpha_bar_T is 4e-5
  # (0.6% of the signal); the exported scheduler config carries these betas to the sampler.
  c.beta_start, c.beta_end = WORLD_BETAS
  # v-prediction, not eps: eps's loss gives the x0 error at high noise (where background, colour and layout are
  # decided) almost no weight. Measured (session 8, 16 prompts): eps after 4400 steps, at chance (background
  # 0.06, its x0 error at t >= 750 worse than predicting zero); the same model after 400 more steps with v,
  # background 0.69, colour 0.44, temporal consistency 0.914 -> 0.962.
  c.prediction_type = WORLD_PREDICTION
  c.resolution = 64
  c.num_frames = 16
  fresh = variant in ("", "images")  # continue / motion: both from config.model (empty = load)
  c.unet = ml_collections.ConfigDict(UNET if fresh else {})
  c.text_encoder = ml_collections.ConfigDict(TEXT if fresh else {})
  c.train_text_encoder = variant != "motion"
  c.batch_size = 4
  c.num_steps = 6000
  c.data.kind = "folder"
  c.data.dataset = "vcjax_video_clips/train"
  c.checkpoint.every = 200
  c.log_every = 20
  # The exported model is the weights' EMA (horizon ~1000 steps once warm). Measured (session 11, one checkpoint,
  # 16 prompts): colour 0.81 -> 1.00, shape 0.125 -> 0.25, size 0.31 -> 0.50 over the last values.
  c.optimizer.ema_decay = 0.999
  # 2/3 of the timestep draws from t >= 600, where a clip's path is decided (video-to-video from real clips keeps
  # their direction from strength 0.5, loses it from 0.85). Session 12 trained the shipped model so, together
  # with the centred paths of WorldConfig.path_spread; the two were not measured apart.
  c.timestep_bias_strategy, c.timestep_bias_portion, c.timestep_bias_multiplier = "later", 0.4, 3.0
  if variant == "images":  # stage 1: the image model, on 64 single frames a step (a joint step's 4 x 16)
    c.num_frames, c.batch_size = 1, 64
    c.train_motion = False
  elif variant == "motion":  # stage 2: the motion modules alone, on clips
    c.train_spatial = False
  return c
