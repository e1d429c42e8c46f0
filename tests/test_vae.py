"""vcjax AutoencoderKL against diffusers' AutoencoderKL (tiny random model, fp32)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from vcjax.models.configs import tiny_vae  # noqa: E402
from vcjax.models.vae import AutoencoderKL  # noqa: E402
from vcjax.weights.keymaps import load_state_dict  # noqa: E402

TOL = 1e-5


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
      norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2).eval()
  with torch.no_grad():
    # Norm scales/biases start at 1/0; perturb them so that a mix-up of norm parameters would show.
    for name, p in ref.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("vae")
  ref.save_pretrained(path, safe_serialization=True)
  state = load_file(str(path / "diffusion_pytorch_model.safetensors"))

  config = tiny_vae()
  vae = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))  # abstract: nothing allocated
  load_state_dict(vae, state, what="vae")  # strict: every key used, every param filled
  return ref, vae


def test_loaded_params_are_concrete(models):
  _, vae = models
  leaves = jax.tree.leaves(nnx.state(vae, nnx.Param))
  assert leaves and all(isinstance(x, jax.Array) for x in leaves)


def test_encode_decode_match_diffusers(models):
  ref, vae = models
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    dist = ref.encode(nchw(x)).latent_dist
  mean, logvar = nnx.jit(lambda m, x: m.encode(x))(vae, jnp.asarray(x))
  assert mean.shape == (2, 16, 16, 4) and logvar.shape == (2, 16, 16, 4)
  e_mean, e_logvar = rel_err(mean, nhwc(dist.mean)), rel_err(logvar, nhwc(dist.logvar))
  print(f"encode mean rel err {e_mean:.2e}, logvar rel err {e_logvar:.2e}")
  assert e_mean <= TOL and e_logvar <= TOL

  z = np.random.default_rng(1).standard_normal((2, 16, 16, 4)).astype(np.float32)
  with torch.no_grad():
    want = nhwc(ref.decode(nchw(z)).sample)
  got = nnx.jit(lambda m, z: m.decode(z))(vae, jnp.asarray(z))
  assert got.shape == (2, 32, 32, 3)
  e_dec = rel_err(got, want)
  print(f"decode rel err {e_dec:.2e}")
  assert e_dec <= TOL


def test_sample_statistics(models):
  sample = jax.jit(models[1].sample)
  mean = jnp.full((4, 16, 16, 4), 0.5)
  logvar = jnp.full((4, 16, 16, 4), 2.0 * np.log(0.3))
  s = np.asarray(sample(mean, logvar, jax.random.key(0)))
  assert abs(s.mean() - 0.5) < 0.02 and abs(s.std() - 0.3) < 0.02
  # Clamp like diffusers: logvar above 20 behaves as 20.
  a = sample(mean, jnp.full_like(mean, 50.0), jax.random.key(1))
  b = sample(mean, jnp.full_like(mean, 20.0), jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_video_encode_scaling_and_chunked_decode(models):
  ref, vae = models
  sf = vae.config.scaling_factor
  b, f = 1, 5
  video = np.random.default_rng(2).uniform(-1, 1, (b, f, 32, 32, 3)).astype(np.float32)
  key = jax.random.key(3)

  @nnx.jit
  def encodes(m, x):  # one compilation for all variants (eager mode is slow here)
    mean, logvar = m.encode(x.reshape(b * f, *x.shape[2:]))
    return (m.encode_video(x), m.encode_video(x, chunk_size=2), m.encode_video(x, key),
            m.sample(mean, logvar, key).reshape(b, f, *mean.shape[1:]), mean.reshape(b, f, *mean.shape[1:]))

  lat, lat_c, lat_s, sampled, mean = encodes(vae, jnp.asarray(video))
  assert lat.shape == (b, f, 16, 16, 4)
  np.testing.assert_allclose(np.asarray(lat), np.asarray(mean) * sf, rtol=1e-6, atol=1e-6)
  # Chunked encode (chunk not dividing F) equals the unchunked one.
  assert rel_err(lat_c, lat) <= 1e-6
  # Sampled latents: mean + std * noise, scaled.
  np.testing.assert_allclose(np.asarray(lat_s), np.asarray(sampled) * sf, rtol=1e-6, atol=1e-6)
  assert rel_err(lat_s, lat) > 1e-3

  latents = np.random.default_rng(4).standard_normal((2, f, 16, 16, 4)).astype(np.float32) * sf
  decode = nnx.jit(lambda m, z: m.decode_video(z, chunk_size=3))  # 10 frames in chunks of 3
  got = np.asarray(decode(vae, jnp.asarray(latents)))
  assert got.shape == (2, f, 32, 32, 3)
  with torch.no_grad():
    want = np.stack([
        np.stack([nhwc(ref.decode(nchw(latents[i, j:j + 1] / sf)).sample)[0] for j in range(f)])
        for i in range(2)])
  e_vid = rel_err(got, want)
  print(f"decode_video (chunk 3 of 10 frames) rel err {e_vid:.2e}")
  assert e_vid <= TOL
