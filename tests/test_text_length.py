"""Prompt length comes from the tokenizer, everywhere ids are made; a text encoder of 16 positions (the
shape of any small model) encodes right at batch 1, 2 and 3 under a user's own jax.jit, and trains."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red fox", "two dogs playing in the snow at night under the moon", "x"]


@pytest.fixture(scope="module")
def text_models(odd_model):
  from transformers import CLIPTextModel
  from vcjax.loading import load_text_encoder, load_tokenizer
  ref = CLIPTextModel.from_pretrained(os.path.join(odd_model["base"], "text_encoder")).eval()
  return ref, load_text_encoder(odd_model["converted"]), load_tokenizer(odd_model["converted"])


def test_tokenize_pads_to_the_tokenizers_length(text_models):
  from vcjax.models.tokenizer import padded_length, tokenize
  _, _, tok = text_models
  assert padded_length(tok) == 16 and tokenize(tok, PROMPTS).shape == (3, 16)
  assert tokenize(tok, PROMPTS, 20).shape == (3, 20)  # an explicit length still wins


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_text_encoder_under_plain_jax_jit_equals_transformers(text_models, batch):
  """The 16-token CLIP takes the short-sequence attention path that XLA:CPU's YNNPACK fusions miscompile at
  batch 1 (max abs error 4.98 before vcjax.compiler's workaround)."""
  from flax import nnx
  from vcjax.models.tokenizer import tokenize
  ref, model, tok = text_models
  ids = tokenize(tok, PROMPTS[:batch])
  with torch.no_grad():
    want = ref(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  graphdef, state = nnx.split(model)
  got = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))(state, jnp.asarray(ids))
  err = rel_err(got, want)
  print(f"16-position CLIP text encoder, batch {batch}, jax.jit: rel err {err:.2e}, "
        f"max abs {np.abs(np.asarray(got) - want).max():.2e}")
  assert err <= 1e-5


def test_pipeline_prompt_embedding_equals_transformers_at_batch_1(odd_model, text_models):
  from vcjax.pipeline import VideoPipeline
  ref, _, tok = text_models
  pipe = VideoPipeline.from_pretrained(odd_model["converted"])
  got = pipe.encode_prompts(PROMPTS[:1])
  ids = torch.from_numpy(tok(PROMPTS[:1], padding="max_length", max_length=16, truncation=True,
                             return_tensors="np")["input_ids"])
  with torch.no_grad():
    want = ref(ids).last_hidden_state.numpy()
  assert got.shape == (1, 16, 32) and rel_err(got, want) <= 1e-5


def test_tokenizer_longer_than_the_text_encoder_is_a_clear_error(odd_model, converted):
  """The 77-token tokenizer of one model with the 16-position text encoder of another."""
  from vcjax.loading import load_text_encoder, load_tokenizer, load_unet, load_vae
  from vcjax.pipeline import VideoPipeline
  pipe = VideoPipeline(load_unet(odd_model["converted"]), load_vae(odd_model["converted"]),
                       load_text_encoder(odd_model["converted"]), load_tokenizer(converted))
  with pytest.raises(ValueError, match="pads prompts to 77 tokens .* only 16 positions"):
    pipe.encode_prompts(["a"])
  from vcjax.models.trainable_tokens import add_trainable_tokens
  text = load_text_encoder(odd_model["converted"])
  add_trainable_tokens(text, [3], np.zeros((1, 32), np.float32))  # the subject-token path checks the length too
  with pytest.raises(ValueError, match="exceeds max_position_embeddings 16"):
    text(jnp.zeros((1, 77), jnp.int32))


@pytest.mark.slow  # prepare + train.py subprocesses
def test_subject_lora_from_a_folder_trains_on_a_16_token_model(odd_model, tmp_path):
  """prepare subject -> train.py on the 16-position model: finite losses (the ids were padded to 77 and the
  position lookup past the table read NaN: "loss is nan at step 1")."""
  from PIL import Image
  src = tmp_path / "dog"
  src.mkdir()
  rng = np.random.default_rng(0)
  for i in range(4):
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(src / f"{i}.png")
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")  # one CPU device: the batch of 2 is not split 8 ways
  data = tmp_path / "data"
  subprocess.run([sys.executable, "-m", "vcjax.data.prepare", "subject", "--src", str(src), "--data-dir",
                  str(data)], check=True, capture_output=True, cwd=ROOT, env=env, timeout=300)
  work = tmp_path / "run"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                         os.path.join(ROOT, "configs/train_tiny_subject.py"), "--workdir", str(work),
                         f"--config.model={odd_model['converted']}", "--config.data.kind=folder",
                         f"--config.data.dir={data}", "--config.num_steps=2", "--config.prior_loss_weight=0"],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  import json
  losses = [json.loads(line)["loss"] for line in open(work / "metrics.jsonl") if '"loss"' in line]
  assert len(losses) == 2 and all(np.isfinite(losses)), losses
