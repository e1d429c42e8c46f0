"""The networks a training objective holds, loaded from a converted folder with float32 parameters.

    model = load_models("converted/", compute_dtype="bfloat16")   # TrainModel: unet, vae, text_encoder
    model, tokenizer = load_for_training(cfg)                    # + the config's attention / remat

A `TrainModel` is a plain container: its attribute names are the first element of every parameter path
(unet.*, vae.*, text_encoder.*, or whatever a task puts in it), which trainable filters match on.
"""

from __future__ import annotations

from flax import nnx

from vcjax import loading
from vcjax.models.configs import CLIPTextConfig, UNet3DConfig, VAEConfig, reconfigure
from vcjax.models.tokenizer import check_length, load_tokenizer
from vcjax.weights import store


class TrainModel(nnx.Module):
  """The models one objective needs, under fixed names (parameter paths start with them)."""

  def __init__(self, **components):
    for name, module in components.items():
      setattr(self, name, module)


_CONFIGS = {"unet": UNet3DConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}


def load_component(folder: str, component: str, compute_dtype: str = "float32"):
  """A converted component with float32 parameters computing in `compute_dtype` (e.g. bfloat16)."""
  cfg = dict(store.read_config(folder)[component], dtype=compute_dtype, param_dtype="float32")
  module = loading.abstract(component, _CONFIGS[component].from_dict(cfg))
  return store.set_params(module, store.read_component(folder, component), what=f"{folder} {component}")


def load_models(folder: str, compute_dtype: str = "float32") -> TrainModel:
  """UNet and VAE compute in `compute_dtype`; the text encoder stays float32 (small, and trained rows)."""
  return TrainModel(unet=load_component(folder, "unet", compute_dtype),
                    vae=load_component(folder, "vae", compute_dtype),
                    text_encoder=load_component(folder, "text_encoder", "float32"))


def configure(model: TrainModel, attention: str = "auto", remat: bool = False) -> TrainModel:
  """Set how the models run (static config fields: part of the compiled step's cache key). Call before a
  task installs attention variants, LoRA or new tokens, which a rebuild would not carry over."""
  for name in ("unet", "vae", "text_encoder"):
    module = getattr(model, name, None)
    if module is not None:
      fields = dict(attention=attention, remat=remat) if name == "unet" else dict(attention=attention)
      setattr(model, name, reconfigure(module, **fields))
  return model


def load_for_training(cfg):
  """-> (TrainModel, tokenizer) of a train config: cfg.model (a converted folder), cfg.dtype,
  cfg.attention, cfg.remat; checks the tokenizer fits the text encoder's positions."""
  model = configure(load_models(cfg.model, cfg.dtype), cfg.get("attention", "auto"), cfg.get("remat", False))
  tokenizer = load_tokenizer(cfg.model)
  check_length(tokenizer, model.text_encoder.config.max_position_embeddings)
  return model, tokenizer


def count_remat_blocks(unet) -> int:
  return sum(1 for _, m in nnx.iter_graph(unet) if getattr(m, "remat", False) is True)
