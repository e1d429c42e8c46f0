"""The world model's pieces: the world tokenizer, the VAE and text-to-video objectives (one optimizer step
lowers the loss on a fixed batch; a resumed run equals an uninterrupted one bit for bit), and the recipe's
two stages end to end on a tiny world through the real data pipeline (export -> tfds -> grain -> train.py
-> a converted folder that VideoPipeline samples)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from configs.train_common import t2v_config, vae_config
from vcjax.models.tokenizer import load_tokenizer, tokenize
from vcjax.parallel import make_mesh
from vcjax.train.loop import run
from vcjax.train.models import TrainModel
from vcjax.train.objectives.text_to_video import TextToVideoTask, t2v_trainable
from vcjax.train.objectives.vae import VAETask, kl_divergence
from vcjax.train.state import OptimizerConfig, Trainer
from vcjax.world import WorldConfig, sample_clip
from vcjax.world.tokenizer import learn_merges, world_words, write_tokenizer

TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
TINY_UNET = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock", "DownBlock"),
                 up_block_types=("UpBlock", "CrossAttnUpBlock"), layers_per_block=1, num_attention_heads=2,
                 cross_attention_dim=16, norm_num_groups=8, motion_num_heads=2, motion_max_seq_length=24)
TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=24)


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("world_tok"))
  write_tokenizer(folder)
  return folder


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
  from vcjax.world.export import export
  data = str(tmp_path_factory.mktemp("world_data"))
  config = dataclasses.replace(WorldConfig(), size=32, frames=4)
  info = export("t2v", data, config=config, num=8, name="tiny")
  assert info["splits"] == {"train": 8}
  return data


def test_world_tokenizer_one_token_per_word(world_tokenizer, tmp_path):
  tok = load_tokenizer(world_tokenizer)
  for w in world_words():
    assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
  config = WorldConfig()
  longest = 0
  for i in range(200):
    caption = sample_clip(config, i).caption
    ids = tok(caption)["input_ids"]
    assert len(ids) == len(caption.split()) + 2  # start + one per word + end
    assert tok.decode(ids, skip_special_tokens=True).strip() == caption
    longest = max(longest, len(ids))
  assert longest <= tok.model_max_length == 24
  assert tokenize(tok, ["a red star"]).shape == (1, 24)
  # Text outside the vocabulary still tokenizes (byte-level characters), and the files are deterministic.
  assert len(tok("zebra", add_special_tokens=False)["input_ids"]) > 1
  write_tokenizer(str(tmp_path))
  for name in ("vocab.json", "merges.txt"):
    assert open(os.path.join(world_tokenizer, name)).read() == open(tmp_path / name).read()


def test_learn_merges_makes_each_word_one_symbol():
  merges = learn_merges(["stars", "star", "start", "a"])
  made = {a + b for a, b in merges}
  assert {"stars</w>", "star</w>", "start</w>"} <= made and "a</w>" not in made  # "a" is a character token


def test_kl_divergence_closed_form():
  mean = jnp.asarray([[0.0, 1.0], [2.0, -1.0]])
  logvar = jnp.asarray([[0.0, 0.0], [np.log(4.0), np.log(0.25)]])
  want = 0.5 * np.array([0 + 1 - 1 - 0 + 1 + 1 - 1 - 0, 4 + 4 - 1 - np.log(4) + 1 + 0.25 - 1 - np.log(0.25)])
  np.testing.assert_allclose(np.asarray(kl_divergence(mean, logvar)), want, rtol=1e-6)


def test_vae_subject_term_is_the_l1_over_subject_pixels():
  """subject_weight adds the L1 averaged over the mask's pixels (and channels), the mask dilated by
  subject_dilation pixels; without a mask it must not be asked for."""
  cfg = vae_config()
  cfg.vae = ml_collections.ConfigDict(TINY_VAE)
  cfg.subject_weight, cfg.subject_dilation = 2.5, 1
  task = VAETask.from_config(cfg)
  vae = task.build(cfg, rngs=nnx.Rngs(0)).model.vae
  frames = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 16, 12, 3)), jnp.float32)
  mask = np.zeros((3, 16, 12, 1), np.float32)
  mask[0, 2:9, 3:7] = 1.0
  mask[2, 10:, :5] = 1.0  # frame 1 has no subject
  grown = np.zeros_like(mask)  # dilated by 1 pixel, clipped at the border
  grown[0, 1:10, 2:8] = 1.0
  grown[2, 9:, :6] = 1.0
  key = jax.random.PRNGKey(1)
  total, aux = task.objective(TrainModel(vae=vae), frames, key, jnp.asarray(mask))
  recon = np.asarray(vae.decode(vae.sample(*vae.encode(frames), key)), np.float64)
  err = np.abs(recon - np.asarray(frames, np.float64))
  want_subject = (err * grown).sum() / (grown.sum() * 3)
  np.testing.assert_allclose(float(aux["loss_l1_subject"]), want_subject, rtol=1e-5)
  np.testing.assert_allclose(float(aux["loss_l1"]), err.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(total), err.mean() + 2.5 * want_subject + cfg.kl_weight * float(aux["kl"]),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="subject_mask"):
    task.objective(TrainModel(vae=vae), frames, key)


def _tiny_vae_cfg(tokenizer: str, data: str):
  c = vae_config()
  c.vae = ml_collections.ConfigDict(TINY_VAE)
  c.tokenizer = tokenizer
  c.resolution, c.num_frames, c.frames_per_clip, c.batch_size = 32, 4, 2, 8  # 8: one row per test device
  c.data.dir, c.data.dataset = data, "vcjax_video_clips/tiny"
  c.optimizer.update(warmup_steps=0, learning_rate=2e-3)
  c.progress, c.log_every, c.checkpoint.async_save = False, 1, False
  return c


def _tiny_t2v_cfg(model: str, data: str):
  c = t2v_config()
  c.model = model
  c.unet = ml_collections.ConfigDict(TINY_UNET)
  c.text_encoder = ml_collections.ConfigDict(TINY_TEXT)
  c.train_text_encoder = True
  c.resolution, c.num_frames, c.batch_size = 32, 4, 8
  c.data.dir, c.data.dataset = data, "vcjax_video_clips/tiny"
  c.optimizer.update(warmup_steps=0, learning_rate=1e-3)
  c.progress, c.log_every, c.checkpoint.async_save = False, 1, False
  return c


def _fixed_batch_improves(task, cfg, steps=3):
  """Loss on one fixed batch and key before and after `steps` AdamW steps on that batch."""
  built = task.build(cfg, rngs=nnx.Rngs(0))
  data = task.data(cfg, built.tokenizer, batch_size=cfg.batch_size, seed=0)
  trainer = Trainer(built.model, built.trainable, task.loss, OptimizerConfig(learning_rate=2e-3, grad_clip=0.0),
                    mesh=make_mesh(devices=jax.devices()[:1]))
  batch = trainer.shard_batch(next(data))
  key = jax.random.PRNGKey(3)
  params, opt = trainer.init()
  losses = []
  for _ in range(steps + 1):  # each step reports the loss of the parameters it started from
    params, opt, m = trainer.step(params, opt, batch, key)
    losses.append(float(m["loss"]))
  return losses[0], losses[-1], built


def _resumes_bit_exactly(cfg, tmp_path):
  """4 steps straight vs 2 steps, stop (a checkpoint), resume for 2: equal final weights, bit for bit."""
  cfg.num_steps, cfg.checkpoint.every, cfg.compilation_cache = 4, 2, str(tmp_path / "cache")
  assert run(cfg, str(tmp_path / "straight")) == 0
  cfg.stop_after = 2
  assert run(cfg, str(tmp_path / "resumed")) == 0
  cfg.stop_after = 0
  assert run(cfg, str(tmp_path / "resumed")) == 0
  a = safetensors.numpy.load_file(str(tmp_path / "straight" / "final" / "trainable.safetensors"))
  b = safetensors.numpy.load_file(str(tmp_path / "resumed" / "final" / "trainable.safetensors"))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_vae_objective_step_lowers_the_loss(world_tokenizer, world_data):
  cfg = _tiny_vae_cfg(world_tokenizer, world_data)
  first, last, built = _fixed_batch_improves(VAETask.from_config(cfg), cfg)
  assert np.isfinite(first) and last < first * 0.95, (first, last)
  assert built.info["vae_parameters"] > 0


@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_vae_stage_resumes_bit_exactly_and_writes_a_model(world_tokenizer, world_data, tmp_path):
  _resumes_bit_exactly(_tiny_vae_cfg(world_tokenizer, world_data), tmp_path)
  model = tmp_path / "straight" / "final" / "model"
  config = json.load(open(model / "config.json"))
  info = json.load(open(tmp_path / "straight" / "final" / "info.json"))
  assert config["vae"]["scaling_factor"] == pytest.approx(1.0 / info["latent_std"])
  assert (model / "tokenizer" / "vocab.json").exists() and (model / "vae.safetensors").exists()


@pytest.fixture(scope="module")
def vae_model(world_tokenizer, world_data, tmp_path_factory):
  work = tmp_path_factory.mktemp("vae_run")
  cfg = _tiny_vae_cfg(world_tokenizer, world_data)
  cfg.num_steps, cfg.checkpoint.every = 2, 2
  assert run(cfg, str(work)) == 0
  return str(work / "final" / "model")


@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_t2v_vae_model_replaces_the_base_vae(vae_model, world_data, tmp_path):
  """config.vae_model: stage 2 trains over (and exports) another folder's VAE, config.model's UNet and the rest."""
  from vcjax.train.objectives.common import fresh_or_loaded, write_converted
  other_cfg = vae_config()
  other_cfg.vae = ml_collections.ConfigDict(TINY_VAE)
  other = fresh_or_loaded(other_cfg, "vae", rngs=nnx.Rngs(7))
  write_converted(str(tmp_path / "other"), {"vae": other})
  cfg = _tiny_t2v_cfg(vae_model, world_data)
  cfg.vae_model = str(tmp_path / "other")
  task = TextToVideoTask.from_config(cfg)
  built = task.build(cfg, rngs=nnx.Rngs(0))
  want = safetensors.numpy.load_file(str(tmp_path / "other" / "vae.safetensors"))
  base = safetensors.numpy.load_file(os.path.join(vae_model, "vae.safetensors"))
  task.export(built.model, str(tmp_path / "out"), {}, cfg)
  got = safetensors.numpy.load_file(str(tmp_path / "out" / "model" / "vae.safetensors"))
  assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
  assert any(not np.array_equal(want[k], base[k]) for k in want)  # not the base's VAE
  flat = dict(nnx.to_flat_state(nnx.state(built.model.vae, nnx.Param)))
  assert len(flat) == len(want)


def test_world_t2v_config_variants():
  """The recipe's configs: joint (fresh), :continue, and AnimateDiff's two stages, which see as many frames a
  step as a joint step and train disjoint parameter groups."""
  from configs import world_t2v
  joint, cont, images, motion = (world_t2v.get_config(v) for v in ("", "continue", "images", "motion"))
  assert joint.unet.block_out_channels == (32, 64, 128) and not cont.unet and not motion.unet
  assert images.unet.to_dict() == joint.unet.to_dict()
  assert images.num_frames * images.batch_size == joint.num_frames * joint.batch_size == 64
  assert (images.train_spatial, images.train_motion, images.train_text_encoder) == (True, False, True)
  assert (motion.train_spatial, motion.train_motion, motion.train_text_encoder) == (False, True, False)
  assert motion.num_frames == 16
  with pytest.raises(ValueError, match=":images"):
    world_t2v.get_config("stage1")


def test_world_customization_configs():
  """E2's configs: the world's sizes, their tasks' hyper-parameters, world-grammar captions for the LoRA."""
  from configs import world_girl, world_subject, world_t2v
  from vcjax.train.task import get_task
  girl, subject = world_girl.get_config(), world_subject.get_config()
  assert (girl.resolution, girl.num_frames, subject.resolution) == (64, 16, 64)
  g, s = get_task(girl), get_task(subject)
  assert g.hp.train_motion and g.hp.min_snr_gamma == 5.0 and g.hp.ref_loss_weight == 0.1
  assert s.hp.lora_rank == 4 and s.hp.class_word == "star" and s.hp.new_token == "<new1>"
  assert subject.augment == "none" and subject.use_captions
  # Both fine-tune the world model with its own schedule and target (train.py refuses a mismatch).
  t2v = world_t2v.get_config()
  for c in (girl, subject):
    assert (c.beta_start, c.beta_end, c.prediction_type) == (t2v.beta_start, t2v.beta_end, "v_prediction")


@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_t2v_trainable_selection(vae_model, world_data):
  cfg = _tiny_t2v_cfg(vae_model, world_data)
  built = TextToVideoTask.from_config(cfg).build(cfg, rngs=nnx.Rngs(0))

  def names(spatial, motion, text):
    _, state, _ = nnx.split(built.model, t2v_trainable(spatial, motion, text), ...)
    return [".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)]

  everything = names(True, True, True)
  motion = names(False, True, False)
  spatial = names(True, False, False)
  text = names(False, False, True)
  assert motion and spatial and text and not any(n.startswith("vae.") for n in everything)
  assert all("motion_modules" in n for n in motion) and not any("motion_modules" in n for n in spatial)
  assert all(n.startswith("text_encoder.") for n in text)
  assert sorted(motion + spatial + text) == sorted(everything)
  # A fresh UNet's motion modules start as the identity (AnimateDiff's zero-initialised proj_out).
  outs = [m.proj_out.kernel[...] for _, m in nnx.iter_modules(built.model.unet) if hasattr(m, "proj_out")
          and "Motion" in type(m).__name__]
  assert outs and all(float(jnp.abs(k).max()) == 0.0 for k in outs)


@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_t2v_objective_step_lowers_the_loss(vae_model, world_data):
  cfg = _tiny_t2v_cfg(vae_model, world_data)
  cfg.uncond_prob = 0.0
  first, last, _ = _fixed_batch_improves(TextToVideoTask.from_config(cfg), cfg, steps=4)
  assert np.isfinite(first) and last < first, (first, last)


@pytest.mark.slow
def test_t2v_stage_resumes_bit_exactly_and_samples(vae_model, world_data, tmp_path):
  from vcjax.pipeline import VideoPipeline
  cfg = _tiny_t2v_cfg(vae_model, world_data)
  cfg.beta_start, cfg.beta_end, cfg.prediction_type = 0.0001, 0.02, "v_prediction"  # configs/world_t2v.py's
  cfg.optimizer.ema_decay = 0.9  # so is an EMA: the resumed run's EMA must come back from the checkpoint
  _resumes_bit_exactly(cfg, tmp_path)
  assert json.load(open(tmp_path / "straight" / "final" / "info.json"))["exported"] == "ema"
  # The exported folder is a complete model for the ordinary pipeline, with the training betas and target.
  model = str(tmp_path / "straight" / "final" / "model")
  pipe = VideoPipeline.from_pretrained(model)
  settings = pipe.scheduler_settings()
  assert (settings.beta_schedule, settings.beta_start, settings.beta_end, settings.prediction_type) == (
      "linear", 0.0001, 0.02, "v_prediction") and pipe.vae_scale == 2
  out = pipe.generate(["a red star moving left over grass"], seeds=[0], num_frames=3, height=32, width=32,
                      steps=2, guidance_scale=2.0)
  assert out.frames.shape == (1, 3, 32, 32, 3) and np.isfinite(out.latents).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_t2v_objective_regresses_the_prediction_types_target(prediction_type):
  """With a UNet that outputs 0 the loss is the target's mean square: noise for eps, v for v-prediction;
  the exported scheduler config says which (so sampling reads the output the same way)."""
  import types
  from vcjax.diffusion.schedulers import get_velocity
  from vcjax.train.objectives.text_to_video import scheduler_json
  cfg = t2v_config()
  cfg.beta_start, cfg.beta_end, cfg.prediction_type = 0.0001, 0.02, prediction_type
  task = TextToVideoTask.from_config(cfg)
  model = types.SimpleNamespace(text_encoder=lambda ids: jnp.zeros(ids.shape + (8,)),
                                unet=lambda x, t, c: jnp.zeros_like(x))
  rng = np.random.default_rng(0)
  latents, noise = (jnp.asarray(rng.standard_normal((2, 3, 4, 5, 4)), jnp.float32) for _ in range(2))
  t = jnp.array([10, 990])
  loss, _ = task.objective(model, latents, jnp.zeros((2, 6), jnp.int32), noise, t)
  target = noise if prediction_type == "epsilon" else get_velocity(task.hp.scheduler, latents, noise, t)
  np.testing.assert_allclose(float(loss), float(jnp.mean(jnp.square(target))), rtol=1e-6)
  if prediction_type == "v_prediction":  # at t = 990 v is mostly -x0: not the noise
    assert abs(float(loss) - float(jnp.mean(jnp.square(noise)))) > 0.05
  assert scheduler_json(task.hp.scheduler)["prediction_type"] == prediction_type


@pytest.mark.slow  # ~20-40 s on 2 CPU cores: the shipped model, 25 steps, 16 frames
def test_sample_py_without_arguments_samples_the_shipped_world_model(tmp_path):
  """README command (1): `python sample.py` on the model in models/world/ writes an mp4, a gif and the JSON
  sidecar, and the world's probe reads the default prompt's background and colour in the video."""
  import subprocess
  import sys
  import imageio.v3 as iio
  from configs import sample_world
  from vcjax.world import probe
  from vcjax.world.evaluate import score_video
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="")
  proc = subprocess.run([sys.executable, os.path.join(root, "sample.py")], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = tmp_path / "outputs"
  assert sorted(os.listdir(out)) == ["world.gif", "world.json", "world.mp4"]
  with open(out / "world.json") as f:
    sidecar = json.load(f)
  prompt = sample_world.get_config().prompt
  assert prompt in json.dumps(sidecar) and sidecar["config"]["model"] == sample_world.MODEL
  video = iio.imread(out / "world.mp4")
  assert video.shape == (16, 64, 64, 3) and iio.imread(out / "world.gif").shape == (16, 64, 64, 3)
  row = score_video(probe.load_probe(), WorldConfig(), prompt, video)
  assert row["correct"]["background"] and row["correct"]["colour"], row["read"]
  assert row["subject_visible"] == 1.0


@pytest.mark.slow  # ~40 s on 2 CPU cores: 2 videos x 50 steps, 16 frames
def test_shipped_subject_lora_samples_through_the_customcrafter_config(tmp_path):
  """E2: a shipped subject LoRA (models/world_subjects/, its token beside it) loads through the ordinary
  CustomCrafter sample config (dynamic weighting, 50 DDIM steps, CFG 12) and draws its sprite's colour:
  sprite 9 is a solid black star."""
  import subprocess
  import sys
  import imageio.v3 as iio
  from vcjax.world import probe
  from vcjax.world.evaluate import score_video
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  lora = os.path.join(root, "models", "world_subjects", "subject_9", "lora.safetensors")
  cmd = [sys.executable, os.path.join(root, "sample.py"), "--config", os.path.join(root, "configs/sample_customcrafter.py"),
         f"--config.model={os.path.join(root, 'models', 'world')}", f"--config.lora={lora}", "--config.height=64",
         "--config.width=64", "--config.num_videos=2", "--config.prompt=a <new1> star standing still on a white background",
         f"--config.output={tmp_path / 'v.mp4'}"]
  proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / "v_0.json") as f:
    assert json.load(f)["config"]["lora_schedule"] == "paper"
  probe_model = probe.load_probe()
  for i in range(2):
    row = score_video(probe_model, WorldConfig(), "a solid black star standing still on a white background",
                      iio.imread(tmp_path / f"v_{i}.mp4"))
    assert row["read"]["colour"] == "black" and row["read"]["background"] == "white", row["read"]
