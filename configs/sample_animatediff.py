"""AnimateDiff text-to-video (METHODS.md §1: DDIM 25 steps, CFG 7.5, 16 frames, 512x512).

    python sample.py --config configs/sample_animatediff.py --config.model=converted/ \
        --config.prompt="a corgi running on the beach" --config.output=outputs/corgi.mp4

The scheduler starts from the model's own (`MODEL/scheduler/scheduler_config.json`, kept by the converter);
`config.scheduler` overrides fields by name, as diffusers' AnimateDiff docs do (linear betas, linspace spacing,
steps_offset 1, no clipping). Any field: `--config.scheduler.set_alpha_to_one=True`; None keeps the model's.
"""

import dataclasses
import typing

import ml_collections
from ml_collections.config_dict import placeholder

from vcjax.diffusion.schedulers import SchedulerConfig

# diffusers' AnimateDiff recommendation, and VideoMaker's four overrides (METHODS.md §1, §6).
ANIMATEDIFF_OVERRIDES = dict(beta_schedule="linear", timestep_spacing="linspace", steps_offset=1,
                             clip_sample=False)


def scheduler_overrides(name: str = "ddim", **fields) -> ml_collections.ConfigDict:
  """`config.scheduler`: the sampler `name` ("ddim" or "dpmsolver++") and every SchedulerConfig field, None
  (the model's value) unless given."""
  types = typing.get_type_hints(SchedulerConfig)  # typed placeholders: `--config.scheduler.KEY=V` can set them
  c = ml_collections.ConfigDict({f.name: placeholder(types[f.name]) for f in dataclasses.fields(SchedulerConfig)})
  c.name = name
  c.update(fields)
  return c


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ""  # a folder written by convert/animatediff.py
  c.prompt = "a corgi running on the beach, best quality"
  c.prompt_file = ""  # instead of prompt: one prompt per line (first column of a .tsv), each num_videos times
  c.negative_prompt = "worst quality, low quality, blurry"
  c.num_frames = 16
  c.height = 512
  c.width = 512
  c.steps = 25
  c.guidance_scale = 7.5
  c.scheduler = scheduler_overrides("ddim", **ANIMATEDIFF_OVERRIDES)  # the original AnimateDiff: "leading"
  c.eta = 0.0  # DDIM's eta
  c.seed = 0
  c.num_videos = 1  # per prompt, seeds seed, seed+1, ...; all videos split across every local device
  c.reference = ""  # VideoMaker: reference image path
  c.lora = ""  # CustomCrafter: LoRA file (vcjax, diffusers/PEFT or kohya)
  c.lora_schedule = ""  # e.g. "paper", "constant:0.8", "linear:0.4:0.8"
  # Learned tokens ("<new1>"): a vcjax token_embedding.safetensors, diffusers learned_embeds or A1111 embedding;
  # "" = the token_embedding.safetensors beside the LoRA if any (train.py writes it there), "none" = never.
  c.token_embedding = ""
  c.init_noise = ""  # .npy initial latents, diffusers layout (B, C, F, H, W)
  c.save_latents = ""  # .npy path for the final latents, same layout
  c.output = "outputs/video.mp4"
  c.gif = True
  c.fps = 8
  c.dtype = ""  # "" keeps the converted dtype; "bfloat16" for speed on accelerators
  # Attention kernel: "auto" | "xla" | "chunked" | "cudnn" | "splash", optionally with fields of
  # vcjax.nn.attention.AttentionConfig: "chunked,chunk_bytes=8388608".
  c.attention = "auto"
  c.compilation_cache = "~/.cache/vcjax/jax"  # JAX's persistent compilation cache; "" turns it off
  c.reference_noise = False  # VideoMaker's optional inference-time reference noising (configs/sample_videomaker.py)
  c.reference_noise_ratio = 0.01
  # FreeInit (README "FreeInit and video-to-video"): diffusers' enable_free_init arguments and defaults.
  c.free_init = ml_collections.ConfigDict(dict(enabled=False, num_iters=3, use_fast_sampling=False,
                                               method="butterworth", order=4, spatial_stop_frequency=0.25,
                                               temporal_stop_frequency=0.25))
  c.init_video = ""  # video-to-video: an .mp4 / .gif / frames folder, its first num_frames resized to height x width
  c.strength = 0.8  # how far the input video is noised: the last int(steps * strength) steps run (diffusers')
  # Long videos (README "Long videos and prompt travel"): FreeNoise's sliding windows, diffusers'
  # enable_free_noise defaults; context_length 0 = the motion module's length. scope "motion": windows in the
  # motion modules (diffusers'); "unet": the whole UNet per window (memory bounded by the window).
  c.free_noise = ml_collections.ConfigDict(dict(enabled=False, context_length=16, context_stride=4,
                                                weighting_scheme="pyramid", noise_type="shuffle_context",
                                                scope="motion"))
  # Prompt travel: frame -> prompt, '{"0": "a cat", "16": "a dog"}' or "0:a cat|16:a dog" (replaces prompt).
  c.prompts = ""
  return c
