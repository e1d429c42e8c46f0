"""Pieces the base objectives share: models built from a config's dict (a from-scratch run) or loaded from
a converted folder (a continued one), and writing the result as a converted folder that
`VideoPipeline.from_pretrained` reads.
"""

from __future__ import annotations

import json
import os
import shutil

from flax import nnx

from vcjax import loading
from vcjax.models.configs import CLIPTextConfig, UNet3DConfig, VAEConfig
from vcjax.train.models import load_component
from vcjax.weights import store

CONFIG_TYPES = {"unet": UNet3DConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}


def fresh_or_loaded(cfg, component: str, *, rngs: nnx.Rngs, compute_dtype: str = "float32", arch=None):
  """A freshly initialised module (float32 parameters) of the architecture `arch` (default cfg[component]: a
  dict of the component config's fields), or, when that is empty, `component` from the converted folder
  cfg.model."""
  arch = cfg.get(component) if arch is None else arch
  arch = dict(arch) if arch else {}
  if not arch:
    if not cfg.model:
      raise ValueError(f"no {component}: set config.{component} (an architecture) or config.model (a folder)")
    return load_component(cfg.model, component, compute_dtype)
  config = CONFIG_TYPES[component].from_dict(dict(arch, dtype=compute_dtype, param_dtype="float32"))
  cls = type(loading.abstract(component, config))
  return cls(config, rngs=rngs)


def write_converted(out: str, modules: dict, *, tokenizer_dir: str | None = None, scheduler: dict | None = None,
                    base: str | None = None, info: dict | None = None) -> None:
  """A converted folder in `out`: each of `modules` ({component: module}) with its config, plus the other
  components of `base` (a converted folder) copied as they are, the tokenizer folder and the scheduler
  config. Parameters are written in float32, configs with dtype float32."""
  import vcjax
  os.makedirs(out, exist_ok=True)
  configs = {"format": "vcjax", "vcjax_version": vcjax.__version__, "info": dict(info or {})}
  if base:
    base_configs = store.read_config(base)
    for component in CONFIG_TYPES:
      if component in base_configs and component not in modules:
        shutil.copy2(os.path.join(base, f"{component}.safetensors"), os.path.join(out, f"{component}.safetensors"))
        configs[component] = base_configs[component]
    if tokenizer_dir is None and os.path.isdir(os.path.join(base, "tokenizer")):
      tokenizer_dir = os.path.join(base, "tokenizer")
    if scheduler is None and os.path.isfile(os.path.join(base, "scheduler", "scheduler_config.json")):
      with open(os.path.join(base, "scheduler", "scheduler_config.json")) as f:
        scheduler = json.load(f)
  for component, module in modules.items():
    store.save_component(out, component, module)
    configs[component] = dict(module.config.to_dict(), dtype="float32", param_dtype="float32")
  if tokenizer_dir and os.path.abspath(tokenizer_dir) != os.path.abspath(os.path.join(out, "tokenizer")):
    shutil.copytree(tokenizer_dir, os.path.join(out, "tokenizer"), dirs_exist_ok=True)
  if scheduler is not None:
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
      json.dump(scheduler, f, indent=2)
  store.write_config(out, configs)
