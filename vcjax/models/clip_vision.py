"""CLIP's vision tower and the two-tower CLIP model (transformers' `CLIPModel` naming), for CLIP-T / CLIP-I /
T.Cons.

The text tower is vcjax's `CLIPTextModel` (the one SD uses), held at `text` so that its parameters sit at
`text.text_model.*`; `vcjax.weights.eval_models.clip_state_dict` renames the checkpoint's `text_model.*`
keys there. Everything else keeps the checkpoint's names (`vision_model.embeddings.patch_embedding`,
`vision_model.pre_layrnorm`, `visual_projection`, `text_projection`, ...). The vision encoder layers are
the text tower's pre-LN layers without the causal mask.

Vision: patches + CLS + positions -> pre-LN -> encoder -> post-LN of the CLS token -> visual_projection.
Text: the text tower's pooled output (end-of-text token) -> text_projection.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vcjax.models.clip_text import CLIPEncoder, CLIPTextModel
from vcjax.models.configs import CLIPTextConfig, _parse_attention
from vcjax.models.vit import PatchEmbed
from vcjax.nn.attention import AttentionConfig
from vcjax.nn.layers import LayerNorm, Linear

# transformers' CLIPTextConfig defaults (ViT-B/32's text tower), for config.json files that omit a field.
HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5, eos_token_id=2)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """transformers' CLIPVisionConfig fields that change the computation; defaults are transformers' (B/32)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: AttentionConfig = AttentionConfig()  # the encoder layers' kernel (shared with the text tower)

  def __post_init__(self):
    _parse_attention(self)

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPVisionConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: CLIPTextConfig
  vision: CLIPVisionConfig
  projection_dim: int = 512

  def to_dict(self) -> dict[str, Any]:
    return dict(text_config=self.text.to_dict(), vision_config=self.vision.to_dict(),
                projection_dim=self.projection_dim)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    """From a transformers `CLIPModel` config.json (`text_config`, `vision_config`, `projection_dim`)."""
    text = CLIPTextConfig.from_dict(dict(HF_TEXT_DEFAULTS, **(d.get("text_config") or {})))
    vision = CLIPVisionConfig.from_dict(d.get("vision_config") or {})
    return cls(text=text, vision=vision, projection_dim=int(d.get("projection_dim", 512)))


def tiny_clip(**vision_overrides) -> CLIPConfig:
  """A CLIP of a few hundred kB (32-pixel images in 8-pixel patches), for tests."""
  text = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, eos_token_id=2)
  vision = CLIPVisionConfig(**dict(dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8),
                                   **vision_overrides))
  return CLIPConfig(text=text, vision=vision, projection_dim=24)


class CLIPVisionEmbeddings(nnx.Module):
  """pixels `(B, S, S, C)` -> `(B, 1 + P, D)`: class embedding, bias-free patch conv, learned positions."""

  def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    d = config.hidden_size
    self.image_size = config.image_size
    self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), param_dtype))
    self.patch_embedding = PatchEmbed(config.num_channels, d, config.patch_size, use_bias=False, rngs=rngs,
                                      dtype=dtype, param_dtype=param_dtype)
    self.position_embedding = nnx.Embed(config.num_positions, d, rngs=rngs, dtype=dtype,
                                        param_dtype=param_dtype)

  def __call__(self, pixels):
    if pixels.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"CLIP expects {self.image_size}x{self.image_size} pixels, got {pixels.shape[1:3]}")
    x = self.patch_embedding(pixels)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    return x + self.position_embedding(jnp.arange(x.shape[1]))


class CLIPVisionTransformer(nnx.Module):
  """pixels `(B, S, S, C)` -> (last hidden state `(B, 1 + P, D)`, pooled `(B, D)`: post-LN'ed CLS)."""

  def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    d, eps = config.hidden_size, config.layer_norm_eps
    self.embeddings = CLIPVisionEmbeddings(config, **kw)
    self.pre_layrnorm = LayerNorm(d, epsilon=eps, param_dtype=param_dtype)  # (sic: the checkpoint's name)
    self.encoder = CLIPEncoder(config, **kw)  # same layers as the text tower; config fields match
    self.post_layernorm = LayerNorm(d, epsilon=eps, param_dtype=param_dtype)

  def __call__(self, pixels):
    h = self.pre_layrnorm(self.embeddings(pixels))
    for layer in self.encoder.layers:
      h = layer(h, mask=None)
    return h, self.post_layernorm(h[:, 0])


class CLIPModel(nnx.Module):
  """Both CLIP towers with their projections.

  `get_image_features(pixels (B, S, S, 3) normalised) -> (B, P)` and
  `get_text_features(input_ids (B, T)) -> (B, P)`, unnormalised, as transformers' methods of those names.
  """

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = config
    vc = config.vision
    kw = dict(rngs=rngs, dtype=jnp.dtype(vc.dtype), param_dtype=jnp.dtype(vc.param_dtype))
    self.text = CLIPTextModel(config.text, rngs=rngs)
    self.vision_model = CLIPVisionTransformer(vc, **kw)
    self.visual_projection = Linear(vc.hidden_size, config.projection_dim, use_bias=False, **kw)
    self.text_projection = Linear(config.text.hidden_size, config.projection_dim, use_bias=False, **kw)

  def get_image_features(self, pixels):
    _, pooled = self.vision_model(pixels)
    return self.visual_projection(pooled)

  def get_text_features(self, input_ids):
    _, pooled = self.text.encode(input_ids)
    return self.text_projection(pooled)
