"""AnimateDiff text-to-video (METHODS.md §1: DDIM 25 steps, CFG 7.5, 16 frames, 512x512).

    python sample.py --config configs/sample_animatediff.py --config.model=converted/ \
        --config.prompt="a corgi running on the beach" --config.output=outputs/corgi.mp4
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ""  # a folder written by convert/animatediff.py
  c.prompt = "a corgi running on the beach, best quality"
  c.negative_prompt = "worst quality, low quality, blurry"
  c.num_frames = 16
  c.height = 512
  c.width = 512
  c.steps = 25
  c.guidance_scale = 7.5
  c.scheduler = "ddim"  # or "dpmsolver++"
  c.eta = 0.0
  c.timestep_spacing = "linspace"  # diffusers' recommendation; the original AnimateDiff used "leading"
  c.seed = 0
  c.num_videos = 1  # seeds seed, seed+1, ...; split across every local device
  c.reference = ""  # VideoMaker: reference image path
  c.lora = ""  # CustomCrafter: LoRA file (vcjax, diffusers/PEFT or kohya)
  c.lora_schedule = ""  # e.g. "paper", "constant:0.8", "linear:0.4:0.8"
  c.init_noise = ""  # .npy initial latents, diffusers layout (B, C, F, H, W)
  c.save_latents = ""  # .npy path for the final latents, same layout
  c.output = "outputs/video.mp4"
  c.gif = True
  c.fps = 8
  c.dtype = ""  # "" keeps the converted dtype; "bfloat16" for speed on accelerators
  return c
