"""VideoMaker zero-shot customization (METHODS.md §3): the reference image is the last frame, PISA in
every spatial self-attention; DDIM 30 steps, CFG 8, 16 frames, 512x512. The model is AnimateDiff v3
converted with VideoMaker's UNet weights on top (`convert/animatediff.py ... --unet-weights human.bin`).

    python sample.py --config configs/sample_videomaker.py --config.model=converted_videomaker/ \
        --config.reference=person.png --config.prompt="A person wearing a Superman outfit."
"""

from configs import sample_animatediff


def get_config():
  c = sample_animatediff.get_config()
  c.steps = 30
  c.guidance_scale = 8.0
  c.negative_prompt = ""
  c.reference = "reference.png"
  c.output = "outputs/videomaker.mp4"
  return c
