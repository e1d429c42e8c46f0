"""VideoMaker zero-shot customization (METHODS.md §3, §6): the reference image is the last frame, PISA in
every spatial self-attention; the authors' inference defaults: DDIM 30 steps, CFG 8, 16 frames, 512x512,
seed 42, their negative prompt, the base model's scheduler with their four overrides (clip_sample False,
linspace spacing, linear betas, steps_offset 1; every other field, e.g. set_alpha_to_one, is the base's).
The model is AnimateDiff v3 converted with VideoMaker's UNet weights on top
(`convert/animatediff.py ... --unet-weights human.bin`). `--config.reference_noise=True` turns on the
authors' optional inference-time reference noising (off in their code by default).

    python sample.py --config configs/sample_videomaker.py --config.model=converted_videomaker/ \
        --config.reference=person.png --config.prompt="A person wearing a Superman outfit."
"""

from configs import sample_animatediff

# WuTao-CS/VideoMaker inference.py's negative prompt.
NEGATIVE_PROMPT = (
    "semi-realistic, cgi, 3d, render, sketch, cartoon, drawing, anime, text, close up, cropped, out of frame, "
    "worst quality, low quality, jpeg artifacts, ugly, duplicate, morbid, mutilated, extra fingers, mutated "
    "hands, poorly drawn hands, poorly drawn face, mutation, deformed, blurry, dehydrated, bad anatomy, bad "
    "proportions, extra limbs, cloned face, disfigured, gross proportions, malformed limbs, missing arms, "
    "missing legs, extra arms, extra legs, fused fingers, too many fingers, long neck")


def get_config():
  c = sample_animatediff.get_config()
  c.steps = 30
  c.guidance_scale = 8.0
  c.seed = 42
  c.negative_prompt = NEGATIVE_PROMPT
  c.scheduler = sample_animatediff.scheduler_overrides("ddim", **sample_animatediff.ANIMATEDIFF_OVERRIDES)
  c.reference_noise = False  # the authors' `reference_image_noisy`
  c.reference_noise_ratio = 0.01  # their `ref_noisy_ratio`: the reference is noised at int(ratio * t)
  c.reference = "reference.png"
  c.output = "outputs/videomaker.mp4"
  return c
