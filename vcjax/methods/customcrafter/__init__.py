"""CustomCrafter (few-image subject customization, METHODS.md §4), everything of the method in one place:

  schedule.py   dynamic weighted sampling: the LoRA scale per denoising step (`lora_scales`, "paper",
                "authors", ...) and the authors' skipped step
  training.py   the subject-LoRA objective (`SubjectTask`, train.py task "subject")
and LORA_TARGETS, the layers the subject LoRA adapts.
The LoRA layers themselves are generic (vcjax.nn.lora); the subject-image augmentation is a data
transform (vcjax/data/customcrafter.py).
"""

from vcjax.methods.customcrafter.schedule import lora_scales, skipped_steps
from vcjax.nn.lora import SPATIAL_QKV

# The subject LoRA's targets (a regex on module paths): q/k/v of attn1 and attn2 in the spatial transformers
# only; not to_out, not the feed-forward, not the motion modules.
LORA_TARGETS = SPATIAL_QKV

__all__ = ["LORA_TARGETS", "lora_scales", "skipped_steps"]
