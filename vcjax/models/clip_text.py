"""The CLIP text encoder (SD1.5's ViT-L/14 text tower) in Flax NNX.

Attribute names mirror transformers' CLIPTextModel state dict (`text_model.embeddings.token_embedding`,
`text_model.encoder.layers.i.self_attn.q_proj`, ...), so `vcjax.weights.keymaps.load_state_dict(model,
state_dict, ignore=[r"position_ids"])` loads its weights directly. transformers >= 5 saves the keys
without the `text_model.` prefix; `clip_text_state_dict` puts it back (and strips LDM's prefix).

Pre-LN transformer with a causal mask: h += attn(LN1(h)); h += mlp(LN2(h)); final LayerNorm.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vcjax.models.configs import CLIPTextConfig
from vcjax.nn.attention import dot_product_attention
from vcjax.nn.layers import LayerNorm, Linear

# Checkpoint prefixes in front of `text_model.`-less keys: LDM single files, diffusers/transformers.
_PREFIXES = ("cond_stage_model.transformer.", "text_encoder.")


def quick_gelu(x):
  """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x) (what SD1.5's text tower was trained with)."""
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def clip_text_state_dict(state_dict: Mapping[str, object]) -> dict[str, object]:
  """Rename a CLIP text-encoder state dict into transformers' `text_model.`-prefixed names.

  Accepts transformers < 5 keys (already prefixed), transformers >= 5 keys (no prefix), and keys under
  `cond_stage_model.transformer.` (LDM single files) or `text_encoder.`.
  """
  out = {}
  for key, value in state_dict.items():
    for prefix in _PREFIXES:
      if key.startswith(prefix):
        key = key[len(prefix):]
        break
    if not key.startswith("text_model."):
      key = "text_model." + key
    out[key] = value
  return out


class CLIPAttention(nnx.Module):
  """Causal multi-head self-attention with biased q/k/v/out projections. x `(B, T, D)` -> `(B, T, D)`."""

  def __init__(self, dim: int, heads: int, *, attention_config=None, rngs: nnx.Rngs, dtype, param_dtype):
    if dim % heads:
      raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.heads = heads
    self.attention_config = attention_config  # static: the kernel choice (None: automatic)
    self.q_proj = Linear(dim, dim, **kw)
    self.k_proj = Linear(dim, dim, **kw)
    self.v_proj = Linear(dim, dim, **kw)
    self.out_proj = Linear(dim, dim, **kw)

  def __call__(self, x, *, mask=None):
    def split(t):  # (B, T, D) -> (B, T, heads, D / heads)
      return t.reshape(*t.shape[:-1], self.heads, t.shape[-1] // self.heads)

    out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                mask=mask, config=self.attention_config)
    return self.out_proj(out.reshape(*out.shape[:-2], -1))


class CLIPMLP(nnx.Module):
  """fc1 (D -> I), activation, fc2 (I -> D)."""

  def __init__(self, dim: int, hidden: int, act: str, *, rngs: nnx.Rngs, dtype, param_dtype):
    if act not in _ACTIVATIONS:
      raise ValueError(f"unknown hidden_act {act!r}; known: {sorted(_ACTIVATIONS)}")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.act = act
    self.fc1 = Linear(dim, hidden, **kw)
    self.fc2 = Linear(hidden, dim, **kw)

  def __call__(self, x):
    return self.fc2(_ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-LN block: h + attn(LN1(h)), then h + mlp(LN2(h)). `(B, T, D)` -> `(B, T, D)`."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    d = config.hidden_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.self_attn = CLIPAttention(d, config.num_attention_heads, attention_config=config.attention, **kw)
    self.layer_norm1 = LayerNorm(d, epsilon=config.layer_norm_eps, param_dtype=param_dtype)
    self.mlp = CLIPMLP(d, config.intermediate_size, config.hidden_act, **kw)
    self.layer_norm2 = LayerNorm(d, epsilon=config.layer_norm_eps, param_dtype=param_dtype)

  def __call__(self, h, *, mask):
    h = h + self.self_attn(self.layer_norm1(h), mask=mask)
    return h + self.mlp(self.layer_norm2(h))


class CLIPEncoder(nnx.Module):
  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.layers = nnx.List([CLIPEncoderLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                            for _ in range(config.num_hidden_layers)])


class CLIPTextEmbeddings(nnx.Module):
  """Token plus learned absolute position embeddings. ids `(B, T)` -> `(B, T, D)`."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    # torch.nn.Embedding initialises N(0, 1); only matters for random look-alike models.
    init = jax.nn.initializers.normal(1.0)
    kw = dict(embedding_init=init, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
    self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size, **kw)

  def __call__(self, input_ids):
    return self.token_embedding(input_ids) + position_embeddings(self.position_embedding, input_ids.shape[-1])


def position_embeddings(table: nnx.Embed, length: int) -> jax.Array:
  """Rows 0..length-1 of the position table `(length, D)`; a ValueError (not NaN rows: out-of-range gathers
  fill) when the ids are longer than the table."""
  if length > table.num_embeddings:
    raise ValueError(f"sequence length {length} exceeds max_position_embeddings {table.num_embeddings} "
                     "(prompts must be tokenized to the text encoder's length)")
  return table(jnp.arange(length))


class CLIPTextTransformer(nnx.Module):
  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.embeddings = CLIPTextEmbeddings(config, **kw)
    self.encoder = CLIPEncoder(config, **kw)
    self.final_layer_norm = LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                                      param_dtype=param_dtype)


class CLIPTextModel(nnx.Module):
  """CLIP text tower. input_ids `(B, T)` int -> hidden states `(B, T, D)` (T <= max_position_embeddings).

  `model(ids)` gives the final-LayerNorm'ed last hidden state (SD's prompt embedding);
  `model(ids, clip_skip=k)` the hidden state k layers before the last, also through the final LayerNorm
  (what diffusers pipelines do with `clip_skip`); `model.encode(ids)` also returns the pooled output.
  """

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.text_model = CLIPTextTransformer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def _hidden_states(self, input_ids, num_layers: int, *, keep: int | None = None):
    """Embeddings then the first `num_layers` encoder layers, before the final LayerNorm.

    -> the last of those hidden states `(B, T, D)`, and (if `keep` is given) the one after `keep` layers.
    """
    tm = self.text_model
    h = tm.embeddings(input_ids)
    t = input_ids.shape[-1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # (1, 1, T, T): token i sees tokens <= i
    kept = h
    for i, layer in enumerate(list(tm.encoder.layers)[:num_layers]):
      h = layer(h, mask=mask)
      if i + 1 == keep:
        kept = h
    return h, kept

  def _check_clip_skip(self, clip_skip: int) -> int:
    n = self.config.num_hidden_layers
    if not 0 <= clip_skip <= n:
      raise ValueError(f"clip_skip must be in [0, {n}], got {clip_skip}")
    return n - clip_skip

  def __call__(self, input_ids, *, clip_skip: int = 0):
    """input_ids `(B, T)` int32 -> `(B, T, D)`; clip_skip=k stops k layers early (then final LN)."""
    h, _ = self._hidden_states(input_ids, self._check_clip_skip(clip_skip))
    return self.text_model.final_layer_norm(h)

  def pooled(self, last_hidden_state, input_ids):
    """The hidden state at each sequence's end-of-text token. `(B, T, D)`, `(B, T)` -> `(B, D)`.

    Like transformers: configs with the legacy eos_token_id 2 take the position of the largest id (the
    original vocabulary's EOT is its last entry); otherwise the first position holding eos_token_id
    (padding may repeat it), position 0 if there is none.
    """
    ids = jnp.asarray(input_ids).astype(jnp.int32)
    if self.config.eos_token_id == 2:
      pos = jnp.argmax(ids, axis=-1)
    else:
      pos = jnp.argmax(ids == self.config.eos_token_id, axis=-1)
    return jnp.take_along_axis(last_hidden_state, pos[:, None, None], axis=1)[:, 0]

  def encode(self, input_ids, *, clip_skip: int = 0):
    """-> (hidden state `(B, T, D)` as `__call__` with clip_skip, pooled output `(B, D)`).

    The pooled output always comes from the full-depth last hidden state, as in transformers.
    """
    keep = self._check_clip_skip(clip_skip)
    h, kept = self._hidden_states(input_ids, self.config.num_hidden_layers, keep=keep)
    last = self.text_model.final_layer_norm(h)
    hidden = last if clip_skip == 0 else self.text_model.final_layer_norm(kept)
    return hidden, self.pooled(last, input_ids)
