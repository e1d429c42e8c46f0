"""CustomCrafter dynamic weighted sampling (METHODS.md §4): the subject LoRA's scale is 0.4 for the
first 5 DDIM steps (motion forms) and 0.8 after (appearance returns); DDIM 50 steps, eta 1, CFG 12,
empty unconditional prompt, 16 frames; the authors' LVDM "uniform" timesteps (leading spacing, offset 1)
ending at alpha_bar[0] (set_alpha_to_one False), on AnimateDiff's linear betas.

    python sample.py --config configs/sample_customcrafter.py --config.model=converted/ \
        --config.lora=workdir/lora.safetensors --config.prompt="a <new1> dog swimming in a pool"
"""

from configs import sample_animatediff


def get_config():
  c = sample_animatediff.get_config()
  c.steps = 50
  c.eta = 1.0
  c.guidance_scale = 12.0
  c.negative_prompt = ""
  c.scheduler = sample_animatediff.scheduler_overrides(
      "ddim", **dict(sample_animatediff.ANIMATEDIFF_OVERRIDES, timestep_spacing="leading", set_alpha_to_one=False))
  c.lora = "lora.safetensors"
  c.lora_schedule = "paper"
  c.output = "outputs/customcrafter.mp4"
  return c
