"""Conversion: a `Bundle` of PyTorch weights (vcjax.weights.bundle.assemble) -> vcjax modules -> a converted
folder that vcjax.loading reads (what convert/animatediff.py writes).

    bundle = vcjax.weights.bundle.assemble("sd15/", "mm_sd_v15_v2.ckpt")
    vcjax.conversion.save_converted(bundle, "converted/")

It builds modules (loading.from_state_dict), so it sits beside the loaders, above vcjax.weights.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

from vcjax.loading import from_state_dict, with_dtype
from vcjax.weights import store
from vcjax.weights.bundle import Bundle


def save_converted(bundle: Bundle, out: str, *, dtype=None,
                   log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """Convert every model of `bundle` into vcjax modules and write them to `out`."""
  import vcjax
  configs: dict[str, Any] = {"format": "vcjax", "vcjax_version": vcjax.__version__, "info": bundle.info}
  for component, config in (("unet", bundle.unet_config), ("vae", bundle.vae_config),
                            ("text_encoder", bundle.text_config)):
    state = getattr(bundle, component)
    if state is None:
      continue
    setattr(bundle, component, None)  # the PyTorch weights are freed as soon as the module holds them
    config = with_dtype(config, dtype)
    count = len(state)
    module = from_state_dict(component, config, state)
    del state
    path = store.save_component(out, component, module)
    configs[component] = config.to_dict()
    log(f"{component}: {count} tensors -> {path}")
    del module
  if bundle.tokenizer_dir:
    shutil.copytree(bundle.tokenizer_dir, os.path.join(out, "tokenizer"), dirs_exist_ok=True)
  if bundle.scheduler_config is not None:
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
      json.dump(bundle.scheduler_config, f, indent=2)
    log(f"scheduler: {bundle.info.get('scheduler_source', 'the base model')} -> {out}/scheduler/")
  store.write_config(out, configs)
  return configs
