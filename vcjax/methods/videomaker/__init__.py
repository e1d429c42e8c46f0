"""VideoMaker (zero-shot subject customization, METHODS.md §3), everything of the method in one place:

  reference.py  the reference frame: `encode_reference`, `unet_with_reference` (PISA = the "pisa" attention
                variant of vcjax.nn.attention_variants, set on a clone of the UNet), reference images
  training.py   the GIRL objective (`GirlTask`, train.py task "girl") and its trainable filter
SHP (the reference images of training data) is a data transform: vcjax/data/shp.py.
"""

from vcjax.methods.videomaker.reference import (encode_reference, load_reference_image, pad_to_aspect,
                                                unet_with_reference)

__all__ = ["encode_reference", "load_reference_image", "pad_to_aspect", "unet_with_reference"]
