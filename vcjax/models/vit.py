"""A plain ViT encoder (transformers' `ViTModel` naming), used as DINO ViT-S/16 for the DINO-I metric.

Attribute names mirror the checkpoint (`embeddings.patch_embeddings.projection`,
`encoder.layer.i.attention.attention.query`, `encoder.layer.i.intermediate.dense`, `layernorm`, ...), so
`vcjax.weights.keymaps.load_state_dict` loads `facebook/dino-vits16` directly. The pooler (a tanh layer
DINO never trained) is not built: the metric reads the CLS token of the last hidden state.

Pre-LN blocks: h += attn(LN_before(h)); h += fc2(gelu(fc1(LN_after(h)))); final LayerNorm.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vcjax.models.clip_text import _ACTIVATIONS
from vcjax.nn.attention import dot_product_attention
from vcjax.nn.layers import LayerNorm, Linear


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """transformers' ViTConfig fields that change the computation; defaults are transformers' (ViT-B/16)."""
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ViTConfig":
    """From a transformers config.json (unknown keys ignored, missing ones take transformers' defaults)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields})


def dino_vits16(**overrides) -> ViTConfig:
  """facebook/dino-vits16."""
  return ViTConfig(**dict(dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536), **overrides))


class PatchEmbed(nnx.Module):
  """A stride-`patch` convolution with a `patch` x `patch` kernel, computed as one matmul over patches.

  x `(B, H, W, C)` -> `(B, (H // p) * (W // p), D)`, row-major over patches like torch's conv + flatten.
  Rows / columns past the last whole patch are dropped, as the convolution does.
  """

  def __init__(self, channels: int, dim: int, patch: int, *, use_bias: bool, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    init = jax.nn.initializers.lecun_normal()
    self.patch = patch
    self.dtype = dtype
    self.kernel = nnx.Param(init(rngs.params(), (patch, patch, channels, dim), param_dtype))  # HWIO
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if use_bias else None

  def __call__(self, x):
    b, h, w, c = x.shape
    p = self.patch
    gh, gw = h // p, w // p
    x = x[:, :gh * p, :gw * p].astype(self.dtype).reshape(b, gh, p, gw, p, c)
    patches = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)  # (kh, kw, c) like HWIO
    y = jnp.dot(patches, self.kernel[...].astype(self.dtype).reshape(p * p * c, -1))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class ViTPatchEmbeddings(nnx.Module):
  def __init__(self, config: ViTConfig, **kw):
    self.projection = PatchEmbed(config.num_channels, config.hidden_size, config.patch_size, use_bias=True,
                                 **kw)


class ViTEmbeddings(nnx.Module):
  """CLS token + patch embeddings + learned positions. pixels `(B, S, S, C)` -> `(B, 1 + P, D)`."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    d = config.hidden_size
    init = jax.nn.initializers.normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), param_dtype))
    self.position_embeddings = nnx.Param(init(rngs.params(), (1, config.num_patches + 1, d), param_dtype))
    self.patch_embeddings = ViTPatchEmbeddings(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.image_size = config.image_size

  def __call__(self, pixels):
    if pixels.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"ViT expects {self.image_size}x{self.image_size} pixels, got {pixels.shape[1:3]}")
    x = self.patch_embeddings.projection(pixels)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    return jnp.concatenate([cls, x], axis=1) + self.position_embeddings[...].astype(x.dtype)


class ViTSelfAttention(nnx.Module):
  """Multi-head self-attention projections `query`, `key`, `value`. `(B, T, D)` -> `(B, T, D)`."""

  def __init__(self, config: ViTConfig, **kw):
    d = config.hidden_size
    if d % config.num_attention_heads:
      raise ValueError(f"hidden size {d} is not divisible by {config.num_attention_heads} heads")
    self.heads = config.num_attention_heads
    self.query = Linear(d, d, use_bias=config.qkv_bias, **kw)
    self.key = Linear(d, d, use_bias=config.qkv_bias, **kw)
    self.value = Linear(d, d, use_bias=config.qkv_bias, **kw)

  def __call__(self, x):
    def split(t):  # (B, T, D) -> (B, T, heads, D / heads)
      return t.reshape(*t.shape[:-1], self.heads, t.shape[-1] // self.heads)

    out = dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
    return out.reshape(*out.shape[:-2], -1)


class _Dense(nnx.Module):
  """A holder of one `dense` Linear (the checkpoint's `attention.output`, `intermediate`, `output`)."""

  def __init__(self, d_in: int, d_out: int, **kw):
    self.dense = Linear(d_in, d_out, **kw)


class ViTAttention(nnx.Module):
  def __init__(self, config: ViTConfig, **kw):
    self.attention = ViTSelfAttention(config, **kw)
    self.output = _Dense(config.hidden_size, config.hidden_size, **kw)

  def __call__(self, x):
    return self.output.dense(self.attention(x))


class ViTLayer(nnx.Module):
  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    d = config.hidden_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if config.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"unknown hidden_act {config.hidden_act!r}; known: {sorted(_ACTIVATIONS)}")
    self.act = config.hidden_act
    self.layernorm_before = LayerNorm(d, epsilon=config.layer_norm_eps, param_dtype=param_dtype)
    self.attention = ViTAttention(config, **kw)
    self.layernorm_after = LayerNorm(d, epsilon=config.layer_norm_eps, param_dtype=param_dtype)
    self.intermediate = _Dense(d, config.intermediate_size, **kw)
    self.output = _Dense(config.intermediate_size, d, **kw)

  def __call__(self, h):
    h = h + self.attention(self.layernorm_before(h))
    y = _ACTIVATIONS[self.act](self.intermediate.dense(self.layernorm_after(h)))
    return h + self.output.dense(y)


class ViTEncoder(nnx.Module):
  def __init__(self, config: ViTConfig, **kw):
    self.layer = nnx.List([ViTLayer(config, **kw) for _ in range(config.num_hidden_layers)])


class ViTModel(nnx.Module):
  """pixels `(B, S, S, C)` (normalised, S = image_size) -> last hidden state `(B, 1 + P, D)`.

  `model.cls(pixels)` -> `(B, D)`, the CLS token of the last hidden state (DINO's image feature).
  """

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.config = config
    kw = dict(rngs=rngs, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
    self.embeddings = ViTEmbeddings(config, **kw)
    self.encoder = ViTEncoder(config, **kw)
    self.layernorm = LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                               param_dtype=kw["param_dtype"])

  def __call__(self, pixels):
    h = self.embeddings(pixels)
    for layer in self.encoder.layer:
      h = layer(h)
    return self.layernorm(h)

  def cls(self, pixels):
    return self(pixels)[:, 0]
