"""dot_product_attention: every implementation that runs on CPU (plain XLA, chunked, the Pallas TPU splash
kernel in interpret mode) against a float64 numpy reference; selection rules; bf16 through the UNet."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.reference import rel_err
from vcjax.nn import attention as A
from vcjax.nn.attention import AttentionConfig, dot_product_attention, select_implementation

# Small chunks so that the chunked path really runs several query chunks AND an online softmax over
# several key chunks, with chunk sizes that do not divide the lengths.
SMALL_CHUNKS = AttentionConfig(chunk_bytes=2 * 3 * 24 * 4, min_query_chunk=24, key_chunk=40)


def reference(q, k, v, mask=None):
  """float64 numpy softmax attention, q `(B, Lq, N, D)`."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    s = np.where(mask, s, -np.inf)
  s = s - s.max(-1, keepdims=True)
  p = np.exp(s)
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnqk,bknd->bqnd", p, v)


def qkv(b, lq, lk, n, d, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(rng.standard_normal(s).astype(np.float32) for s in ((b, lq, n, d), (b, lk, n, d), (b, lk, n, d)))


CASES = {  # name: (B, Lq, Lk, heads, head size)
    "self_d40_odd": (2, 77, 77, 3, 40),  # CLIP length, SD1.5 level-0 head size
    "cross_d80": (2, 150, 77, 2, 80),  # Lq != Lk, level-1 head size
    "self_d160_odd": (1, 133, 133, 2, 160),  # level-2 head size, not a multiple of 128
    "temporal_d40": (6, 16, 16, 2, 40),  # motion module: 16 frames (the short-sequence path on CPU)
}
IMPLS = ["xla", "chunked", "splash"]


def run(impl, q, k, v, mask=None):
  return np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=mask,
                                          implementation=impl, config=SMALL_CHUNKS))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(impl, case):
  b, lq, lk, n, d = CASES[case]
  q, k, v = qkv(b, lq, lk, n, d)
  got = run(impl, q, k, v)
  err = rel_err(got, reference(q, k, v))
  print(f"{impl} {case}: rel err {err:.2e}")
  assert got.shape == (b, lq, n, d) and got.dtype == np.float32
  assert err <= 1e-5


def test_short_sequence_path_with_mask_and_gradient():
  """The CPU short-sequence formulation (broadcast-multiply-reduce) with a per-example mask, and its grad."""
  q, k, v = qkv(4, 16, 16, 2, 40, seed=8)
  mask = np.random.default_rng(9).random((4, 1, 16, 16)) > 0.3
  mask[..., 0] = True
  got = run("xla", q, k, v, mask)
  err = rel_err(got, reference(q, k, v, mask))
  print(f"short path with mask: rel err {err:.2e}")
  assert err <= 1e-5
  # Its hand-written backward (custom_vjp) against autodiff of the chunked path, for q, k and v, with
  # the mask traced under jit.
  w = np.random.default_rng(10).standard_normal(q.shape).astype(np.float32)
  grads = lambda impl: jax.jit(jax.grad(lambda q, k, v, m: jnp.sum(dot_product_attention(
      q, k, v, mask=m, implementation=impl) * w), argnums=(0, 1, 2)))(q, k, v, mask)
  for name, got, want in zip("qkv", grads("xla"), grads("chunked")):
    err = rel_err(got, want)
    print(f"short path d{name} vs chunked: rel err {err:.2e}")
    assert err <= 1e-5


def test_short_sequence_gradient_bf16_and_no_mask():
  """bf16 inputs (fp32 inside) and no mask: the hand-written backward agrees with the chunked path's."""
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in qkv(3, 16, 16, 2, 40, seed=3))
  loss = lambda impl: lambda q, k, v: jnp.sum(jnp.square(dot_product_attention(
      q, k, v, implementation=impl).astype(jnp.float32)))
  for got, want in zip(jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v),
                       jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)):
    assert got.dtype == jnp.bfloat16
    assert rel_err(np.asarray(got, np.float32), np.asarray(want, np.float32)) <= 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_mask(impl):
  q, k, v = qkv(2, 77, 77, 3, 40, seed=1)
  mask = np.tril(np.ones((77, 77), bool))[None, None]  # CLIP's (1, 1, T, T)
  got = run(impl, q, k, v, mask)
  err = rel_err(got, reference(q, k, v, mask))
  print(f"{impl} causal: rel err {err:.2e}")
  assert err <= 1e-5
  # Row 0 attends to token 0 only.
  np.testing.assert_allclose(got[:, 0], v[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_per_example_key_mask_cross_attention(impl):
  """A batch-dependent (B, 1, 1, Lk) padding mask, cross-attention with odd lengths."""
  q, k, v = qkv(2, 101, 77, 2, 80, seed=2)
  mask = np.ones((2, 1, 1, 77), bool)
  mask[1, ..., 50:] = False
  got = run(impl, q, k, v, mask)
  err = rel_err(got, reference(q, k, v, mask))
  print(f"{impl} key-padding mask: rel err {err:.2e}")
  assert err <= 1e-5


@pytest.mark.parametrize("group", [1, 2, 4])
def test_chunked_explicit_chunk_sizes_and_traced_mask(group):
  """Direct block sizes (pair groups of 1/2/4 that may not divide B*N = 6, queries 50 / keys 33 on lengths
  257 / 130) and a per-example, per-head mask built under jit."""
  q, k, v = qkv(2, 257, 130, 3, 40, seed=3)
  mask_np = np.random.default_rng(4).random((2, 3, 257, 130)) > 0.2

  @jax.jit
  def f(q, k, v, mask):
    return A._chunked(q, k, v, mask, 1 / np.sqrt(40), q_chunk=50, k_chunk=33, group=group)

  err = rel_err(f(q, k, v, jnp.asarray(mask_np)), reference(q, k, v, mask_np))
  print(f"chunked group {group}, 50/33 with per-example per-head mask: rel err {err:.2e}")
  assert err <= 1e-5


def test_chunk_plan():
  """Blocks of about chunk_bytes; divisors preferred so that nothing needs padding."""
  assert A.chunk_plan(128, 1024, 1024, 2 << 20) == (1, 512, 1024)  # SD1.5 level 0, 16 frames x 8 heads
  assert A.chunk_plan(128, 1024, 77, 2 << 20) == (4, 1024, 77)  # cross-attention
  assert A.chunk_plan(16, 4096, 4096, 256 << 20) == (4, 4096, 4096)
  g, qc, kc = A.chunk_plan(1, 10 ** 6, 10 ** 6, 2 << 20)  # a million tokens: online softmax over keys
  assert kc == AttentionConfig().key_chunk and g * qc * kc * 4 <= 2 << 20


@pytest.mark.parametrize("impl", ["chunked", "splash"])
def test_gradients_match_plain(impl):
  q, k, v = qkv(1, 77, 77, 2, 40, seed=5)
  w = np.random.default_rng(6).standard_normal(q.shape).astype(np.float32)

  def loss(impl):
    def f(q, k, v):
      return jnp.sum(dot_product_attention(q, k, v, implementation=impl, config=SMALL_CHUNKS) * w)
    return jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))

  want = loss("xla")
  for name, g, r in zip("qkv", loss(impl), want):
    err = rel_err(g, r)
    print(f"{impl} d{name}: rel err {err:.2e}")
    assert err <= 1e-5


def test_bf16_inputs_softmax_in_fp32():
  q, k, v = qkv(2, 130, 130, 2, 40, seed=7)
  want = reference(q, k, v)
  for impl in ["xla", "chunked"]:
    got = run(impl, *(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert got.dtype == jnp.bfloat16
    err = rel_err(got.astype(np.float32), want)
    print(f"{impl} bf16: rel err {err:.2e}")
    assert err <= 1e-2


def test_selection_rules():
  def sel(b, lq, lk, n, d, dtype=jnp.float32, backend="cpu", **kw):
    q = jax.ShapeDtypeStruct((b, lq, n, d), dtype)
    k = jax.ShapeDtypeStruct((b, lk, n, d), dtype)
    return select_implementation(q, k, backend=backend, **kw)

  # Temporal attention (16 frames) is always plain, whatever the backend or configured choice.
  for backend in ("cpu", "gpu", "tpu"):
    assert sel(4096, 16, 16, 8, 40, jnp.bfloat16, backend) == "xla"
  chunked = AttentionConfig(implementation="chunked")
  assert sel(4096, 16, 16, 8, 40, config=chunked) == "xla"
  assert sel(16, 1024, 1024, 8, 40, config=chunked) == "chunked"
  # Automatic: TPU splash, GPU cuDNN for bf16 (not fp32, not with a mask, not head size > 256).
  assert sel(16, 4096, 4096, 8, 40, backend="tpu") == "splash"
  assert sel(16, 4096, 77, 8, 40, jnp.bfloat16, "gpu") == "cudnn"
  assert sel(16, 1024, 77, 8, 40, jnp.float32, "gpu") == "xla"
  assert sel(2, 77, 77, 8, 64, jnp.bfloat16, "gpu", mask=np.ones((77, 77), bool)) == "xla"
  # CPU: chunked (cache-sized blocks) beyond the short-sequence rule.
  assert sel(2, 77, 77, 8, 40) == "chunked"
  assert sel(2, 77, 77, 8, 40, mask=np.ones((77, 77), bool)) == "chunked"
  # GPU without cuDNN: plain below the logits threshold (fp32 B*N*Lq*Lk*4 bytes), chunked above it.
  small = AttentionConfig().chunk_threshold_bytes // (8 * 1024 * 1024 * 4)
  assert sel(small, 1024, 1024, 8, 40, backend="gpu") == "xla"
  assert sel(small + 1, 1024, 1024, 8, 40, backend="gpu") == "chunked"
  # A call's own choice wins; one that cannot run raises instead of silently falling back.
  assert sel(4096, 16, 16, 8, 40, implementation="chunked") == "chunked"
  assert sel(16, 4096, 4096, 8, 40, implementation="flash") == "splash"
  with pytest.raises(ValueError, match="GPU"):
    sel(16, 4096, 4096, 8, 40, jnp.bfloat16, implementation="cudnn")
  with pytest.raises(ValueError, match="bf16"):
    sel(16, 4096, 4096, 8, 40, jnp.float32, "gpu", implementation="cudnn")
  with pytest.raises(ValueError, match="batch"):
    sel(2, 256, 256, 8, 40, implementation="splash", mask=np.ones((2, 1, 256, 256), bool))
  with pytest.raises(ValueError, match="unknown"):
    sel(2, 256, 256, 8, 40, implementation="fast")
  # A configured choice that cannot run a call falls back to the automatic rule.
  cudnn = AttentionConfig(implementation="cudnn")
  assert sel(2, 1024, 1024, 8, 40, config=cudnn) == "chunked"
  assert sel(2, 1024, 1024, 8, 40, backend="gpu", config=cudnn) == "xla"
  assert AttentionConfig().implementation == "auto"  # no process-wide setting: the default is automatic


def test_attention_module_per_call_implementation_under_jit():
  attn = A.Attention(64, 4, context_dim=32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 100, 64))
  ctx = jax.random.normal(jax.random.key(2), (2, 77, 32))
  want = attn(x, ctx, implementation="xla")
  got = nnx.jit(lambda m, x, c: m(x, c, implementation="chunked"))(attn, x, ctx)
  err = rel_err(got, want)
  print(f"Attention module chunked vs plain under jit: {err:.2e}")
  assert err <= 1e-6


def fill_random_(module, seed=0):
  """Random parameters distributed like the modules' own (torch-default) init: kernels uniform in
  +-1/sqrt(fan_in), norm scales near 1, biases near 0. From numpy: much faster than the eager init."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    if x.ndim == 1:
      base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
      return jnp.asarray(base + 0.05 * rng.uniform(-1, 1, x.shape), x.dtype)
    fan_in = int(np.prod(x.shape[:-1]))
    return jnp.asarray(rng.uniform(-1, 1, x.shape) / np.sqrt(fan_in), x.dtype)

  nnx.update(module, jax.tree_util.tree_map_with_path(draw, nnx.state(module, nnx.Param)))
  return module


@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_unet_bf16_close_to_fp32():
  """bf16 params and activations through the tiny UNet (norms and softmax in fp32) vs the fp32 UNet with
  the same (bf16-representable) weights: what bf16 compute costs, not what rounding the weights costs."""
  from vcjax.models.configs import tiny_unet
  from vcjax.models.unet3d import UNet3D
  cfg = tiny_unet(layers_per_block=1, motion_mid_block=True)  # every kind of block, half the compile time
  ref = fill_random_(nnx.eval_shape(lambda: UNet3D(cfg, rngs=nnx.Rngs(0))))
  nnx.update(ref, jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), nnx.state(ref, nnx.Param)))
  half = nnx.eval_shape(lambda: UNet3D(dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16"),
                                          rngs=nnx.Rngs(0)))
  nnx.update(half, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(ref, nnx.Param)))
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.standard_normal((1, 3, 16, 16, 4)), jnp.bfloat16)
  context = jnp.asarray(rng.standard_normal((1, 7, 32)), jnp.bfloat16)
  t = jnp.array([500])
  forward = nnx.jit(lambda m, *a: m(*a))
  want = forward(ref, latents.astype(jnp.float32), t, context.astype(jnp.float32))
  got = forward(half, latents, t, context)
  assert got.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(nnx.state(half, nnx.Param)))
  err = rel_err(np.asarray(got, np.float32), want)
  print(f"tiny UNet bf16 vs fp32 (same weights): rel err {err:.2e}")
  # (With larger random weights, kernels randn/sqrt(fan_in), this is 2.1e-2 to 2.4e-2, and diffusers'
  # UNetMotionModel in bf16 vs fp32 is 1.9e-2 to 2.0e-2: bf16 rounding amplified by random weights.)
  assert err < 2e-2


# ------------------------------------------------------------------------- static configuration, variants


def test_attention_config_parse_and_model_configs():
  from vcjax.models.configs import CLIPTextConfig, UNet3DConfig, VAEConfig, tiny_unet
  assert AttentionConfig.parse(None) == AttentionConfig.parse("auto") == AttentionConfig()
  assert AttentionConfig.parse("flash").implementation == "splash"
  spec = AttentionConfig.parse("chunked,chunk_bytes=8388608,splash_interpret=true")
  assert spec == AttentionConfig(implementation="chunked", chunk_bytes=8 << 20, splash_interpret=True)
  assert AttentionConfig.parse(dataclasses.asdict(spec)) == spec
  for bad in ("fast", "chunked,chunk_bytes", "chunked,nothing=1"):
    with pytest.raises(ValueError):
      AttentionConfig.parse(bad)
  # A field of every model config (a string is parsed); older saved configs without it load the default.
  cfg = tiny_unet(attention="chunked")
  assert cfg.attention == AttentionConfig(implementation="chunked") and hash(cfg) != hash(tiny_unet())
  assert UNet3DConfig.from_dict(cfg.to_dict()) == cfg
  old = {k: v for k, v in tiny_unet().to_dict().items() if k not in ("attention", "remat")}
  assert UNet3DConfig.from_dict(old) == tiny_unet()
  for config_cls in (VAEConfig, CLIPTextConfig):
    assert config_cls.from_dict({"attention": "xla"}).attention.implementation == "xla"
    assert config_cls.from_dict({}).attention == AttentionConfig()


def test_attention_choice_is_static_and_keys_the_compiled_function():
  """The kernel choice lives in the graphdef: a jitted function taking the graphdef statically traces
  again for another choice (never reuses a stale one), and the results agree."""
  from vcjax import compiler
  traces = []

  @compiler.jit(static_argnums=(0,))
  def forward(graphdef, state, x, ctx):
    traces.append(1)
    return nnx.merge(graphdef, state)(x, ctx)

  x = jax.random.normal(jax.random.key(1), (2, 100, 64))
  ctx = jax.random.normal(jax.random.key(2), (2, 77, 32))
  outs = []
  for impl in ("xla", "chunked", "xla"):
    attn = A.Attention(64, 4, context_dim=32, attention_config=AttentionConfig(implementation=impl),
                       rngs=nnx.Rngs(0))
    outs.append(forward(*nnx.split(attn), x, ctx))
  assert len(traces) == 2  # xla, chunked; the second xla call hits the cache
  assert rel_err(outs[1], outs[0]) <= 1e-6 and rel_err(outs[2], outs[0]) == 0


def test_set_attention_selects_layers_by_path():
  from vcjax.models.configs import tiny_unet
  from vcjax.models.unet3d import UNet3D
  unet = nnx.eval_shape(lambda: UNet3D(tiny_unet(motion_mid_block=True), rngs=nnx.Rngs(0)))
  layers = dict(A.attention_layers(unet))
  spatial = [p for p in layers if ".attentions." in f".{p}" and "motion_modules" not in p]
  # 6 spatial transformer blocks (2 down, 1 mid, 3 up); 11 motion modules (2 + 2 down, 1 mid, 3 + 3 up).
  assert len(spatial) == 2 * 6 and len(layers) == len(spatial) + 2 * 11
  assert A.set_attention(unet, "pisa") == 6
  assert A.set_attention(unet, "start_token_detach") == 6
  for path, layer in layers.items():
    want = "default" if "motion_modules" in path else {"attn1": "pisa", "attn2": "start_token_detach"}[path[-5:]]
    assert layer.variant == want, path
  # with_attention: a clone with the variant set; the model itself (and its graphdef) unchanged.
  before = nnx.graphdef(unet)
  plain = A.with_attention(unet, "default")
  assert plain is not unet and all(m.variant == "default" for _, m in A.attention_layers(plain))
  assert nnx.graphdef(unet) == before and nnx.graphdef(plain) != before
  assert A.with_attention(plain, "default") is plain  # already set: nothing to clone
  with pytest.raises(ValueError, match="unknown attention variant"):
    A.set_attention(unet, "fast")
