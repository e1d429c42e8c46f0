"""Learned tokens ("<new1>") from training to sampling: token-embedding files (vcjax / diffusers / A1111, read
torch-free and checked against diffusers' own readers), the tokenizer + CLIP table surgery (vs transformers
after diffusers' load_textual_inversion), and through the CLIs: prepare subject -> train.py -> sample.py
sees the trained text encoder's prompt embedding, and the exported PEFT LoRA + token in diffusers'
AnimateDiffPipeline gives sample.py's latents."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.reference import rel_err
from vcjax.weights.errors import CheckpointError
from vcjax.weights.sources import save_safetensors
from vcjax.weights.textual_inversion import read_token_embeddings, token_file_beside

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 32  # the tiny random pipeline's text width
PROMPT = "a <new1> dog running"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  old = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(old)


def rows(n, seed=0):
  return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """One file of every format -> (path, expected {token: row}, whether diffusers reads it the same way)."""
  d = tmp_path_factory.mktemp("embeds")
  a, b, c, e = rows(1, 1)[0], rows(2, 2), rows(3, 3), rows(2, 4)
  out = {}
  save_safetensors({"<new1>": a}, d / "token_embedding.safetensors")
  out["vcjax"] = (d / "token_embedding.safetensors", {"<new1>": a}, True)
  save_safetensors({"<cat-toy>": b}, d / "learned_embeds.safetensors")
  out["diffusers_st"] = (d / "learned_embeds.safetensors", {"<cat-toy>": b[0], "<cat-toy>_1": b[1]}, True)
  torch.save({"<dog-toy>": torch.from_numpy(a)}, d / "learned_embeds.bin")
  out["diffusers_bin"] = (d / "learned_embeds.bin", {"<dog-toy>": a}, True)
  torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(torch.from_numpy(c))},
              "name": "mystyle", "step": 1500, "sd_checkpoint": "abcd", "sd_checkpoint_name": "v1-5"},
             d / "mystyle.pt")
  out["a1111_pt"] = (d / "mystyle.pt", {"mystyle": c[0], "mystyle_1": c[1], "mystyle_2": c[2]}, True)
  save_safetensors({"emb_params": e}, d / "badstyle.safetensors")  # A1111 names it after the file
  out["a1111_st"] = (d / "badstyle.safetensors", {"badstyle": e[0], "badstyle_1": e[1]}, False)
  return out


@pytest.mark.parametrize("kind", ["vcjax", "diffusers_st", "diffusers_bin", "a1111_pt", "a1111_st"])
def test_file_formats(files, kind, random_pipeline):
  path, want, diffusers_agrees = files[kind]
  got = read_token_embeddings(path)
  assert list(got) == list(want)
  for token in want:
    assert got[token].dtype == np.float32 and np.array_equal(got[token], want[token])
  if diffusers_agrees:  # diffusers' own reading: same tokens (multi-vector names too), same rows
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin as TI
    from diffusers.loaders.textual_inversion import load_textual_inversion_state_dicts
    from vcjax.models.tokenizer import load_tokenizer
    tok = load_tokenizer(random_pipeline["base"])
    tokens, embs = TI._retrieve_tokens_and_embeddings([None], load_textual_inversion_state_dicts([str(path)]), tok)
    tokens, embs = TI._extend_tokens_and_embeddings(tokens, embs, tok)
    assert tokens == list(got)
    for t, e in zip(tokens, embs):
      np.testing.assert_array_equal(e.detach().float().numpy(), got[t])


def test_token_names_and_errors(files, tmp_path):
  path, want, _ = files["vcjax"]
  assert list(read_token_embeddings(path, token="<sks>")) == ["<sks>"]
  multi, _, _ = files["a1111_pt"]
  assert list(read_token_embeddings(multi, token="x")) == ["x", "x_1", "x_2"]
  torch.save(torch.from_numpy(rows(1)[0]), tmp_path / "bare.pt")
  with pytest.raises(CheckpointError, match="bare tensor"):
    read_token_embeddings(tmp_path / "bare.pt")
  assert list(read_token_embeddings(tmp_path / "bare.pt", token="<b>")) == ["<b>"]
  save_safetensors({"<a>": rows(1)[0], "<b>": rows(1)[0]}, tmp_path / "two.safetensors")
  assert list(read_token_embeddings(tmp_path / "two.safetensors")) == ["<a>", "<b>"]
  with pytest.raises(CheckpointError, match="2 tokens"):
    read_token_embeddings(tmp_path / "two.safetensors", token="<c>")
  torch.save({"step": 3}, tmp_path / "junk.pt")
  with pytest.raises(CheckpointError, match="not a token-embedding file"):
    read_token_embeddings(tmp_path / "junk.pt")
  with pytest.raises(CheckpointError, match="no such"):
    read_token_embeddings(tmp_path / "missing.safetensors")
  assert token_file_beside(tmp_path / "lora.safetensors") is None
  assert token_file_beside(os.path.join(os.path.dirname(path), "lora.safetensors")) == str(path)


def text_pipeline(converted):
  """A VideoPipeline with only what encode_prompts needs."""
  from vcjax.loading import load_text_encoder, load_tokenizer
  from vcjax.pipeline import VideoPipeline
  return VideoPipeline(None, None, load_text_encoder(converted), load_tokenizer(converted))


def test_growth_keeps_rows_and_checks_tokens(converted, files):
  from vcjax.models.new_tokens import add_tokens, grow_token_embedding, token_table
  pipe = text_pipeline(converted)
  te, tok = pipe.text_encoder, pipe.tokenizer
  before = np.asarray(token_table(te).embedding[...]).copy()
  n = before.shape[0]
  path, want, _ = files["a1111_pt"]
  ids = add_tokens(tok, te, read_token_embeddings(path))
  assert list(ids.values()) == [n, n + 1, n + 2] and len(tok) == n + 3
  after = np.asarray(token_table(te).embedding[...])
  assert after.shape == (n + 3, D) and te.config.vocab_size == n + 3 and token_table(te).num_embeddings == n + 3
  assert np.array_equal(after[:n], before)  # bit-identical old rows
  assert np.array_equal(after[n:], np.stack(list(want.values())))
  assert add_tokens(tok, te, read_token_embeddings(path)) == ids  # the same file again: a no-op
  with pytest.raises(ValueError, match="another embedding"):
    add_tokens(tok, te, {"mystyle": rows(1, 9)[0]})
  with pytest.raises(ValueError, match="base vocabulary"):
    add_tokens(tok, te, {"a</w>": rows(1, 9)[0]})
  with pytest.raises(ValueError, match=r"\(32,\)"):
    add_tokens(tok, te, {"<wide>": np.zeros(D + 1, np.float32)})
  assert "<wide>" not in tok.get_vocab() and len(tok) == n + 3  # a failed add changes nothing
  assert grow_token_embedding(te, {n + 5: rows(1, 7)[0]}) == n + 6  # a gap is filled with zero rows
  t = np.asarray(token_table(te).embedding[...])
  assert np.array_equal(t[:n + 3], after) and not t[n + 3:n + 5].any()


def test_prompt_embedding_matches_transformers_after_diffusers_load(converted, random_pipeline, files):
  """vcjax's load_textual_inversion + encode_prompts (multi-vector prompt expansion included) vs the
  transformers text encoder after diffusers' load_textual_inversion and maybe_convert_prompt."""
  from diffusers import StableDiffusionPipeline
  from transformers import CLIPTextModel, CLIPTokenizer
  base = random_pipeline["base"]
  ref = StableDiffusionPipeline(vae=None, text_encoder=CLIPTextModel.from_pretrained(f"{base}/text_encoder"),
                                tokenizer=CLIPTokenizer.from_pretrained(f"{base}/tokenizer"), unet=None,
                                scheduler=None, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False)
  pipe = text_pipeline(converted)
  for kind in ("vcjax", "a1111_pt", "diffusers_st"):
    ref.load_textual_inversion(str(files[kind][0]))
    pipe.load_textual_inversion(str(files[kind][0]))
  prompt = "a <new1> dog in mystyle, <cat-toy>"
  assert pipe.tokenizer.get_vocab() == ref.tokenizer.get_vocab()
  with torch.no_grad():
    want, _ = ref.encode_prompt(prompt, "cpu", 1, False)
  got = np.asarray(pipe.encode_prompts([prompt]))
  assert np.abs(got - want.numpy()).max() < 1e-5


# ----------------------------------------------------------------------------------- through the CLIs


def _run(cmd, timeout=900):
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def trained(converted, tmp_path_factory):
  """prepare subject (4 images + 2 class images) -> train.py --config configs/train_tiny_subject.py."""
  from vcjax.data.prepare import main as prepare
  tmp = tmp_path_factory.mktemp("subject_run")
  rng = np.random.default_rng(0)
  os.makedirs(tmp / "dog" / "class")
  for i in range(4):
    Image.fromarray(rng.integers(0, 255, (40, 32, 3), np.uint8)).save(tmp / "dog" / f"img{i}.png")
  for i in range(2):
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(tmp / "dog" / "class" / f"c{i}.png")
  assert prepare(["subject", "--src", str(tmp / "dog"), "--data-dir", str(tmp / "data"), "--image-size", "32"]) == 0
  work = tmp / "run"
  _run([sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/train_tiny_subject.py"),
        "--workdir", str(work), f"--config.model={converted}", "--config.num_steps=2", "--config.checkpoint.every=2",
        "--config.data.kind=folder", f"--config.data.dir={tmp / 'data'}", "--config.data.num_threads=1"])
  final = work / "final"
  for name in ("lora.safetensors", "pytorch_lora_weights.safetensors", "token_embedding.safetensors"):
    assert (final / name).is_file(), name
  return dict(final=final, tmp=tmp)


@pytest.fixture(scope="module")
def sampled(converted, trained):
  """sample.py --config configs/sample_customcrafter.py --config.lora=WORKDIR/final/lora.safetensors, tiny:
  DDIM eta 0, constant LoRA scale 1, fixed initial noise."""
  tmp = trained["tmp"]
  noise = np.random.default_rng(1).standard_normal((1, 4, 2, 8, 8)).astype(np.float32)
  np.save(tmp / "noise.npy", noise)
  _run([sys.executable, os.path.join(ROOT, "sample.py"), "--config", os.path.join(ROOT, "configs/sample_customcrafter.py"),
        f"--config.model={converted}", f"--config.lora={trained['final'] / 'lora.safetensors'}",
        f"--config.prompt={PROMPT}", "--config.height=64", "--config.width=64", "--config.num_frames=2",
        "--config.steps=3", "--config.eta=0.0", "--config.lora_schedule=constant:1.0", "--config.gif=False",
        f"--config.init_noise={tmp / 'noise.npy'}", f"--config.save_latents={tmp / 'latents.npy'}",
        f"--config.output={tmp / 'video.mp4'}"])
  return dict(noise=noise, latents=np.load(tmp / "latents.npy"), sidecar=json.load(open(tmp / "video.json")))


@pytest.mark.slow  # train.py + sample.py subprocesses: ~3.5 min CPU on 2 busy cores
def test_trained_token_reaches_the_sampler(converted, trained, sampled):
  import jax.numpy as jnp
  from flax import nnx
  from vcjax.models.tokenizer import load_tokenizer, tokenize
  from vcjax.pipeline import VideoPipeline, _encode_text
  from configs.train_common import default_config
  from vcjax.methods.customcrafter.training import SubjectTask
  from vcjax.train.models import load_models
  from vcjax.weights.sources import read_state_dict

  final = trained["final"]
  token_file = str(final / "token_embedding.safetensors")
  assert sampled["sidecar"]["added_tokens"] == {"<new1>": token_file}
  # The trained text encoder: base + NewTokenEmbeddings holding the row train.py learned (trainable.safetensors).
  model = load_models(converted)
  tok = load_tokenizer(converted)
  _, info = SubjectTask.from_config(default_config("subject")).setup(model, tok, rngs=nnx.Rngs(0))
  new_rows = model.text_encoder.text_model.embeddings.new_token_embedding
  init_row = np.asarray(new_rows[...]).copy()
  (key,) = [k for k in read_state_dict(str(final / "trainable.safetensors")) if "new_token_embedding" in k]
  new_rows.set_value(jnp.asarray(read_state_dict(str(final / "trainable.safetensors"))[key]))
  assert not np.array_equal(np.asarray(new_rows[...]), init_row)  # it trained
  ids = jnp.asarray(tokenize(tok, [PROMPT]))
  want = np.asarray(_encode_text(*nnx.split(model.text_encoder), ids))  # compiled as the pipeline compiles
  want_in = np.asarray(model.text_encoder.text_model.embeddings(ids))

  pipe = VideoPipeline.from_pretrained(converted)
  assert pipe.load_lora(str(final / "lora.safetensors")) == ["<new1>"]
  assert pipe.tokenizer.convert_tokens_to_ids("<new1>") == info["new_token_id"]
  got = np.asarray(pipe.encode_prompts([PROMPT]))
  assert np.array_equal(np.asarray(pipe.text_encoder.text_model.embeddings(ids)), want_in)  # the encoder's input
  diff = float(np.abs(got - want).max())
  without = VideoPipeline.from_pretrained(converted)
  assert without.load_lora(str(final / "lora.safetensors"), token_embedding="none") == []
  base_emb = np.asarray(without.encode_prompts([PROMPT]))
  print(f"prompt embedding vs the trained text encoder: max abs diff {diff:.2e}; "
        f"without the token file: {np.abs(base_emb - want).max():.2e}")
  assert diff < 1e-6
  assert np.abs(base_emb - want).max() > 1e-2


@pytest.mark.slow  # train.py + sample.py subprocesses: ~3.5 min CPU on 2 busy cores
def test_diffusers_with_exported_lora_and_token_gives_sample_py_latents(random_pipeline, trained, sampled):
  from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
  from transformers import CLIPTextModel, CLIPTokenizer
  base, final, side = random_pipeline["base"], trained["final"], sampled["sidecar"]
  s = side["scheduler"]
  assert s["name"] == "ddim" and side["config"]["eta"] == 0.0
  scheduler = DDIMScheduler(**{k: s[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                                 "timestep_spacing", "steps_offset", "set_alpha_to_one",
                                                 "clip_sample", "clip_sample_range", "prediction_type")})
  ref = AnimateDiffPipeline(vae=AutoencoderKL.from_pretrained(f"{base}/vae"),
                            text_encoder=CLIPTextModel.from_pretrained(f"{base}/text_encoder"),
                            tokenizer=CLIPTokenizer.from_pretrained(f"{base}/tokenizer"),
                            unet=UNet2DConditionModel.from_pretrained(f"{base}/unet"),
                            motion_adapter=MotionAdapter.from_pretrained(random_pipeline["motion_diffusers"]),
                            scheduler=scheduler)
  ref.load_lora_weights(str(final), weight_name="pytorch_lora_weights.safetensors")
  ref.load_textual_inversion(str(final / "token_embedding.safetensors"))
  cfg = side["config"]
  with torch.no_grad():
    want = ref(prompt=side["prompt"], negative_prompt=cfg["negative_prompt"], num_frames=cfg["num_frames"],
               height=cfg["height"], width=cfg["width"], num_inference_steps=cfg["steps"],
               guidance_scale=cfg["guidance_scale"], eta=0.0, latents=torch.from_numpy(sampled["noise"]),
               output_type="latent").frames.numpy()
  err = rel_err(sampled["latents"], want)
  print(f"final latents, sample.py vs diffusers (PEFT LoRA + textual inversion): rel err {err:.2e}")
  assert err < 1e-4
