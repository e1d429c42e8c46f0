"""VideoMaker's PISA and the reference-frame UNet call, against a PyTorch re-statement of the authors'
attention processor installed in diffusers' UNetMotionModel; plus unit tests of the PISA semantics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from tests.reference import rel_err, to_channels_last_video
from vcjax.nn.attention import Attention, dot_product_attention, with_attention
from vcjax.nn.attention_variants import ALL, joint_frame_attention
from vcjax.methods.videomaker import encode_reference, load_reference_image, unet_with_reference

VIDEO_FRAMES = 3


class TorchPISAProcessor:
  """PISA as a diffusers attention processor (a re-statement of the VideoMaker authors' semantics).

  hidden_states `(b*(f+1), L, C)`, reference last. Every video frame i attends over [frame_i; ref]
  (2L tokens); `to_out` is applied to all 2L outputs; the frame half is the new frame i and the mean of
  the f reference halves is the new reference. Then the stock residual / rescale handling.
  """

  def __init__(self, video_frames: int):
    self.video_frames = video_frames

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
               *args, **kwargs):
    assert encoder_hidden_states is None and attention_mask is None
    f = self.video_frames
    bf, length, channels = hidden_states.shape
    b = bf // (f + 1)
    x = hidden_states.reshape(b, f + 1, length, channels)
    ref = x[:, f:].expand(b, f, length, channels)
    tokens = torch.cat([x[:, :f], ref], dim=2).reshape(b * f, 2 * length, channels)

    def heads(t):
      return t.reshape(b * f, 2 * length, attn.heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(attn.to_q(tokens)), heads(attn.to_k(tokens)),
                                         heads(attn.to_v(tokens)))
    out = out.transpose(1, 2).reshape(b * f, 2 * length, channels)
    out = attn.to_out[1](attn.to_out[0](out)).reshape(b, f, 2 * length, channels)
    ref_out = out[:, :, length:].mean(dim=1, keepdim=True)
    out = torch.cat([out[:, :, :length], ref_out], dim=1).reshape(bf, length, channels)
    if attn.residual_connection:
      out = out + hidden_states
    return out / attn.rescale_output_factor


def install_pisa_(model, video_frames: int):
  """PISA on every spatial attn1 (down, mid, up), motion modules untouched.

  Returns (names given PISA, the previous processors, to restore)."""
  before = dict(model.attn_processors)
  procs, installed = {}, []
  for name, proc in model.attn_processors.items():
    if name.endswith("attn1.processor") and "motion_modules" not in name:
      procs[name] = TorchPISAProcessor(video_frames)
      installed.append(name)
    else:
      procs[name] = proc
  model.set_attn_processor(procs)
  return installed, before


@pytest.fixture(scope="module")
def models():
  from diffusers import UNetMotionModel
  from vcjax.testing import build_models
  from vcjax.loading import from_state_dict
  from vcjax.models.configs import VAEConfig, tiny_unet
  unet2d, vae, _, adapter = build_models("tiny", "v3")
  ref = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  unet = from_state_dict("unet", tiny_unet(motion_max_seq_length=32, motion_mid_block=False), sd)
  vae_sd = {k: v.detach().numpy() for k, v in vae.state_dict().items()}
  return ref, unet, vae, from_state_dict("vae", VAEConfig.from_dict(dict(vae.config)), vae_sd)


@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_unet_with_reference_matches_diffusers_with_pisa_processor(models):
  ref_model, unet, _, _ = models
  installed, stock = install_pisa_(ref_model, VIDEO_FRAMES)
  assert any(n.startswith("down_blocks") for n in installed)
  assert any(n.startswith("mid_block") for n in installed)
  assert any(n.startswith("up_blocks") for n in installed)

  rng = np.random.default_rng(0)
  b = 2
  latents = rng.standard_normal((b, 4, VIDEO_FRAMES, 16, 16)).astype(np.float32)  # diffusers layout
  reference = rng.standard_normal((b, 4, 1, 16, 16)).astype(np.float32)
  context = rng.standard_normal((b, 7, 32)).astype(np.float32)
  timesteps = np.array([999, 17], np.int64)

  full = np.concatenate([latents, reference], axis=2)
  with torch.no_grad():
    want = ref_model(torch.from_numpy(full), torch.from_numpy(timesteps),
                     torch.from_numpy(np.repeat(context, VIDEO_FRAMES + 1, axis=0))).sample.numpy()
  want = to_channels_last_video(want)

  fn = nnx.jit(lambda m, x, r, t, c: unet_with_reference(m, x, r, t, c, return_reference=True))
  eps, eps_ref = fn(unet, jnp.asarray(to_channels_last_video(latents)),
                    jnp.asarray(to_channels_last_video(reference)), jnp.asarray(timesteps), jnp.asarray(context))
  assert eps.shape == (b, VIDEO_FRAMES, 16, 16, 4) and eps_ref.shape == (b, 1, 16, 16, 4)
  err_video = rel_err(eps, want[:, :VIDEO_FRAMES])
  err_ref = rel_err(eps_ref, want[:, VIDEO_FRAMES:])
  print(f"unet_with_reference vs diffusers+PISA processor: video eps {err_video:.2e}, reference eps {err_ref:.2e}")
  assert err_video <= 1e-5 and err_ref <= 1e-5

  # PISA really changes the result: the same 4 frames through the stock processors differ.
  ref_model.set_attn_processor(stock)
  with torch.no_grad():
    plain = ref_model(torch.from_numpy(full), torch.from_numpy(timesteps),
                      torch.from_numpy(np.repeat(context, VIDEO_FRAMES + 1, axis=0))).sample.numpy()
  assert rel_err(to_channels_last_video(plain), want) > 1e-2


def test_unet_with_reference_wiring():
  """Reference appended last, same timestep, PISA on the spatial attn1 of the UNet it calls (not on the
  caller's, which stays plain), outputs split; batch-1 reference broadcasts."""
  from vcjax.models.blocks import TransformerBlock
  calls = {}

  class FakeUNet(nnx.Module):
    def __init__(self):
      self.transformer_blocks = nnx.List([TransformerBlock(8, 2, None, rngs=nnx.Rngs(0))])

    def __call__(self, x, t, c):
      block = self.transformer_blocks[0]
      calls.update(shape=x.shape, t=t, hook=(block.attn1.variant, block.attn2.variant))
      return x * 2.0

  fake_unet = FakeUNet()
  latents = jnp.arange(2 * 3 * 2 * 2 * 4, dtype=jnp.float32).reshape(2, 3, 2, 2, 4)
  reference = -jnp.ones((1, 1, 2, 2, 4))
  eps, eps_ref = unet_with_reference(fake_unet, latents, reference, 7, None, return_reference=True)
  assert calls["shape"] == (2, 4, 2, 2, 4) and calls["t"] == 7 and calls["hook"] == ("pisa", "default")
  assert fake_unet.transformer_blocks[0].attn1.variant == "default"
  np.testing.assert_array_equal(eps, latents * 2.0)
  np.testing.assert_array_equal(eps_ref, -2.0 * jnp.ones((2, 1, 2, 2, 4)))
  assert unet_with_reference(fake_unet, latents, reference, 7, None).shape == latents.shape
  with pytest.raises(ValueError, match="reference must be"):
    unet_with_reference(fake_unet, latents, jnp.ones((2, 2, 2, 2, 4)), 7, None)


def attention_module(dim=16, heads=2, seed=0):
  attn = Attention(dim, heads, rngs=nnx.Rngs(seed))
  # A non-zero output bias, so that averaging before or after to_out would show if it mattered.
  attn.to_out.bias.value = jax.random.normal(jax.random.key(seed + 1), attn.to_out.bias.value.shape)
  return attn


def video_tokens(b, frames_incl_ref, length=6, dim=16, seed=0):
  return jax.random.normal(jax.random.key(seed), (b * frames_incl_ref, length, dim))


def pisa_self_attention(num_frames: int):
  """`fn(attn, h)`: attn with the "pisa" variant (on a clone) over h `(B*num_frames, L, C)`."""
  return lambda attn, h: with_attention(attn, "pisa", where=ALL)(h, frames=num_frames)


def test_single_frame_is_plain_attention_over_concatenated_tokens():
  attn, b, length = attention_module(), 2, 6
  h = video_tokens(b, 2, length)
  got = pisa_self_attention(2)(attn, h).reshape(b, 2, length, -1)
  pairs = h.reshape(b, 2, length, -1)
  want = attn(jnp.concatenate([pairs[:, 0], pairs[:, 1]], axis=1))  # (B, 2L, C), frame first
  err = max(rel_err(got[:, 0], want[:, :length]), rel_err(got[:, 1], want[:, length:]))
  print(f"PISA F=1 vs attention over 2L tokens: rel err {err:.2e}")
  assert err <= 1e-6


def test_reference_is_mean_over_frames_and_not_one_copy():
  attn, b, f, length = attention_module(seed=3), 2, 4, 6
  h = video_tokens(b, f + 1, length, seed=4)
  got = pisa_self_attention(f + 1)(attn, h).reshape(b, f + 1, length, -1)
  x = h.reshape(b, f + 1, length, -1)
  per_frame = [attn(jnp.concatenate([x[:, i], x[:, f]], axis=1)) for i in range(f)]  # each (B, 2L, C)
  for i in range(f):
    assert rel_err(got[:, i], per_frame[i][:, :length]) <= 1e-6
  mean_ref = jnp.mean(jnp.stack([p[:, length:] for p in per_frame]), axis=0)
  err = rel_err(got[:, f], mean_ref)
  print(f"PISA reference vs mean of per-frame reference halves: rel err {err:.2e}")
  assert err <= 1e-6
  # If the reference half were not averaged (first copy, or last), the output would be far off.
  assert rel_err(got[:, f], per_frame[0][:, length:]) > 1e-2
  assert rel_err(got[:, f], per_frame[-1][:, length:]) > 1e-2


def test_jit_and_pure_function():
  attn, f1 = attention_module(seed=5), 4
  h = video_tokens(3, f1, seed=6)
  eager = pisa_self_attention(f1)(attn, h)
  jitted = nnx.jit(lambda m, x: pisa_self_attention(f1)(m, x))(attn, h)
  assert rel_err(jitted, eager) <= 1e-6
  q = attn.split_heads(attn.to_q(h))
  k = attn.split_heads(attn.to_k(h))
  v = attn.split_heads(attn.to_v(h))
  pure = jax.jit(functools.partial(joint_frame_attention, attend=dot_product_attention), static_argnums=3)(
      q, k, v, f1)
  assert pure.shape == q.shape
  assert rel_err(attn.to_out(pure.reshape(*pure.shape[:2], -1)), eager) <= 1e-6
  with pytest.raises(ValueError):
    pisa_self_attention(1)(attn, h)
  with pytest.raises(ValueError):
    joint_frame_attention(q, k, v, 5, attend=dot_product_attention)  # 12 rows are not a multiple of 5


def test_encode_reference_matches_diffusers_vae(models):
  _, _, ref_vae, vae = models
  image = np.random.default_rng(1).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    dist = ref_vae.encode(torch.from_numpy(image.transpose(0, 3, 1, 2))).latent_dist
  want = dist.mean.numpy().transpose(0, 2, 3, 1)[:, None] * vae.config.scaling_factor
  # One compiled call for both modes (mean, and a posterior sample).
  got, sampled = nnx.jit(lambda m, x, key: (encode_reference(m, x), encode_reference(m, x, key)))(
      vae, jnp.asarray(image), jax.random.key(0))
  assert got.shape == (2, 1, 8, 8, 4)
  err = rel_err(got, want)
  print(f"encode_reference (mean) vs diffusers: rel err {err:.2e}")
  assert err <= 1e-5
  std = np.exp(0.5 * np.clip(dist.logvar.numpy(), -30, 20)).transpose(0, 2, 3, 1)[:, None]
  z = (np.asarray(sampled) / vae.config.scaling_factor - want / vae.config.scaling_factor) / std
  assert abs(z.mean()) < 0.15 and abs(z.std() - 1) < 0.15  # a draw from the posterior, not the mean


def test_load_reference_image_pads_white_and_scales(tmp_path):
  from PIL import Image
  path = tmp_path / "wide.png"
  Image.new("RGB", (40, 20), (255, 0, 0)).save(path)  # 2:1 -> white bands above and below
  img = load_reference_image(path, 32, 32)
  assert img.shape == (32, 32, 3) and img.dtype == np.float32
  assert img.min() >= -1.0 and img.max() <= 1.0
  np.testing.assert_allclose(img[:6], 1.0)  # top band: rows 0..7 are white before resampling blur
  np.testing.assert_allclose(img[-6:], 1.0)
  np.testing.assert_allclose(img[14:18, 4:28], np.broadcast_to([1.0, -1.0, -1.0], (4, 24, 3)), atol=1e-6)

  tall = tmp_path / "tall.png"
  Image.new("RGB", (10, 40), (0, 0, 255)).save(tall)  # for a 16x32 (h x w) target: white left/right
  img = load_reference_image(tall, 16, 32)
  assert img.shape == (16, 32, 3)
  np.testing.assert_allclose(img[:, :12], 1.0)
  np.testing.assert_allclose(img[:, -12:], 1.0)
  np.testing.assert_allclose(img[:, 16], np.broadcast_to([-1.0, -1.0, 1.0], (16, 3)), atol=1e-6)

  rgba = tmp_path / "cutout.png"
  Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(rgba)  # fully transparent -> white
  np.testing.assert_allclose(load_reference_image(rgba, 8, 8), 1.0)

  with pytest.raises(ValueError, match="not found"):
    load_reference_image(tmp_path / "missing.png", 32, 32)
  bad = tmp_path / "bad.png"
  bad.write_text("not an image")
  with pytest.raises(ValueError, match="cannot read"):
    load_reference_image(bad, 32, 32)
