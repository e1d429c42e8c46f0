"""Defaults shared by the train configs: the loop's keys, and each built-in task's hyper-parameters.

    from configs.train_common import default_config
    c = default_config("girl")     # then change what the run needs

Where the papers and the authors' code differ, the code is the default (METHODS.md §6) and the paper's
choice is one key away. A task's hyper-parameter keys are the fields of its HParams dataclass
(vcjax/methods/*/training.py), which reads them by name.
"""

import ml_collections

from vcjax import compiler
from vcjax.methods.customcrafter import LORA_TARGETS


def loop_config() -> ml_collections.ConfigDict:
  """The method-free keys every train config has (vcjax/train/loop.py reads them)."""
  c = ml_collections.ConfigDict()
  c.task = ""
  c.model = ""  # a converted vcjax folder (convert/animatediff.py)
  c.seed = 0
  c.num_steps = 10_000
  c.batch_size = 1  # global
  c.resolution = 512
  c.num_frames = 16
  c.dtype = "float32"  # compute dtype of UNet + VAE ("bfloat16" for mixed precision; params stay fp32)
  c.remat = False  # gradient checkpointing per resnet / spatial transformer / motion module
  # Attention kernel of every model: "auto" | "xla" | "chunked" | "cudnn" | "splash", optionally with
  # AttentionConfig fields, e.g. "chunked,chunk_bytes=8388608" (vcjax.nn.attention).
  c.attention = "auto"
  c.beta_schedule, c.beta_start, c.beta_end = "linear", 0.00085, 0.012  # AnimateDiff's DDPM schedule
  c.prediction_type = "epsilon"  # or "v_prediction": the training target; exported with the scheduler config
  # Training timesteps: uniform ("none"), or diffusers' SDXL-trainer bias: "later" / "earlier" multiply the
  # sampling weight of the last / first `portion` of the schedule by `multiplier`, "range" that of [begin, end).
  c.timestep_bias_strategy, c.timestep_bias_multiplier, c.timestep_bias_portion = "none", 1.0, 0.25
  c.timestep_bias_begin, c.timestep_bias_end = 0, 1000
  # scale_lr: learning_rate is per example and multiplied by the global batch_size (the authors' LVDM rule).
  # grad_clip: global norm, <= 0 off. ema_decay > 0: also keep an EMA of the trained parameters (checkpointed
  # with the optimizer) and export it instead of the last values (diffusers' --use_ema); 0: off. export_ema
  # False exports the last values of a run that keeps an EMA (to compare the two from one checkpoint).
  # lr_multipliers: "pattern=factor,..." multiplies the lr of the parameters whose path (e.g.
  # "unet/down_blocks/1/attentions/0/transformer_blocks/0/attn2/to_k/kernel", "text_encoder/...") matches
  # the pattern (re.search, first rule wins); "" = one lr for all. "attentions/.*/attn2/" is the spatial
  # cross-attention (the motion modules' blocks also have an attn2: a temporal self-attention).
  c.optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-5, scale_lr=False, weight_decay=1e-2, b1=0.9,
                                               b2=0.999, eps=1e-8, grad_clip=1.0, warmup_steps=0, ema_decay=0.0,
                                               export_ema=True, lr_multipliers=""))
  c.data = ml_collections.ConfigDict(dict(kind="folder", dir="", dataset="", num_threads=4, worker_count=0,
                                          num_examples=8))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, sequence=1, param_sharding="replicate"))
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))
  c.log_every = 10
  c.tensorboard = True
  c.progress = True
  c.compilation_cache = compiler.DEFAULT_CACHE  # JAX's persistent compilation cache; "" turns it off
  c.stop_after = 0  # > 0: save and exit (code 0) once this many steps are done
  c.debug_nan_at_step = 0  # > 0: feed NaN pixels at that step (tests the NaN guard)
  return c


def subject_config() -> ml_collections.ConfigDict:
  """CustomCrafter subject LoRA (METHODS.md §4, §6). The paper instead: loss_kind "l2", augment "paper",
  caption_dropout 0, optimizer.scale_lr False."""
  c = loop_config()
  c.task = "subject"
  c.num_frames = 4
  # The authors' LVDM lr rule: base lr x GPUs x per-GPU batch = 3e-5 x 4 x 2 = 2.4e-4; their code clips nothing.
  c.optimizer.update(learning_rate=3e-5, scale_lr=True, grad_clip=0.0)
  c.new_token = "<new1>"
  c.class_word = "dog"
  c.lora_rank = 4
  c.lora_targets = LORA_TARGETS
  c.detach_start_token = True
  c.loss_kind = "l1"  # the authors' code (loss_type l1); the paper says "l2"
  c.prior_loss_weight = 1.0
  c.caption_dropout = 0.2  # instance and class captions -> "" (the authors' uncond_prob)
  c.augment = "authors"  # rescale: "authors" (discrete, black canvas) | "paper" (vcjax/data/customcrafter.py) | "none"
  c.use_captions = False  # subject images' own captions instead of templates of "<new_token> <class_word>"
  return c


def girl_config() -> ml_collections.ConfigDict:
  """VideoMaker GIRL (METHODS.md §3): AdamW lr 1e-5, wd 1e-2, clip 1.0."""
  c = loop_config()
  c.task = "girl"
  c.train_motion = True  # "Update Motion" (the final VideoMaker model)
  c.min_snr_gamma = 5.0  # <= 0 disables Min-SNR weighting
  c.ref_loss_weight = 0.1
  c.remind_divisor = 100  # reference noised at t' = t // 100 = int(0.01 t)
  c.drop_text, c.drop_reference, c.drop_both = 0.05, 0.05, 0.05
  # Folders: each read draws a temporal window from the clip's stored frames (vcjax/data/builders.py):
  # frames frame_stride apart (CelebV-Text, stride 8) or, with sampling "window", evenly over `window`.
  c.data.update(dict(shp="object", frame_stride=8, sampling="stride", window=64))
  return c


def vae_config() -> ml_collections.ConfigDict:
  """An AutoencoderKL from scratch (vcjax/train/objectives/vae.py): L1 + kl_weight x KL, AdamW."""
  c = loop_config()
  c.task = "vae"
  c.tokenizer = ""  # the loaders tokenize captions even when the objective ignores them
  c.vae = ml_collections.ConfigDict(dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
                                         latent_channels=4))
  c.kl_weight = 1e-6
  c.l2_weight = 0.0
  c.subject_weight = 0.0  # + this x the L1 over subject pixels (needs batches with subject_mask) ...
  c.subject_dilation = 3  # ... and this many pixels around them
  c.frames_per_clip = 2
  c.optimizer.update(learning_rate=1e-3, weight_decay=0.0, grad_clip=1.0, warmup_steps=100)
  c.data.update(dict(shp="object", frame_stride=1, sampling="stride", window=64))
  return c


def t2v_config() -> ml_collections.ConfigDict:
  """AnimateDiff's eps objective (vcjax/train/objectives/text_to_video.py): a UNet3D (and optionally its
  text encoder) from scratch over a frozen VAE."""
  c = loop_config()
  c.task = "t2v"
  c.tokenizer = ""  # "" = config.model's tokenizer/
  c.unet = ml_collections.ConfigDict()  # an architecture (UNet3DConfig fields): from scratch; empty: config.model's
  c.text_encoder = ml_collections.ConfigDict()  # likewise (CLIPTextConfig fields; vocab_size from the tokenizer)
  c.vae_model = ""  # a converted folder whose VAE replaces config.model's ("": config.model's), e.g. a better VAE
  c.train_spatial = True
  c.train_motion = True
  c.train_text_encoder = False
  c.uncond_prob = 0.1
  c.min_snr_gamma = 0.0
  c.optimizer.update(learning_rate=2e-4, weight_decay=1e-2, grad_clip=1.0, warmup_steps=200)
  c.data.update(dict(shp="object", frame_stride=1, sampling="stride", window=64))
  return c


CONFIGS = {"subject": subject_config, "girl": girl_config, "vae": vae_config, "t2v": t2v_config}


def default_config(task: str) -> ml_collections.ConfigDict:
  if task not in CONFIGS:
    raise ValueError(f"task must be one of {sorted(CONFIGS)}, got {task!r}")
  return CONFIGS[task]()
