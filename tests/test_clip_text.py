"""CLIP text encoder vs transformers' CLIPTextModel, and the tokenizer wrapper."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vcjax.models import configs
from vcjax.models.clip_text import CLIPTextModel, clip_text_state_dict
from vcjax.models.tokenizer import load_tokenizer, tokenize
from vcjax.weights.keymaps import load_state_dict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_reference(cfg, eos_token_id, tmp_path):
  """A seeded random transformers CLIPTextModel of `cfg`'s sizes, saved and re-read as numpy."""
  torch.manual_seed(0)
  tcfg = transformers.CLIPTextConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
      max_position_embeddings=cfg.max_position_embeddings, hidden_act=cfg.hidden_act,
      layer_norm_eps=cfg.layer_norm_eps, bos_token_id=cfg.vocab_size - 2, pad_token_id=1,
      eos_token_id=eos_token_id)
  model = transformers.CLIPTextModel(tcfg).eval()
  with torch.no_grad():  # LayerNorms start at (1, 0); randomise them so they are really tested.
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path, safe_serialization=True)
  state = safetensors_numpy.load_file(os.path.join(tmp_path, "model.safetensors"))
  return model, state


def make_ids(cfg, eos, rng):
  """Two prompts of different lengths: BOS, random tokens, EOS, then EOS padding (as SD1.5).

  Token 2 sits at position 3, so a legacy config (eos_token_id 2) that matched the id instead of
  taking the argmax would pool the wrong position.
  """
  ids = np.full((2, cfg.max_position_embeddings), eos, np.int32)
  for b, n in enumerate((9, 30)):
    ids[b, 0] = cfg.vocab_size - 2
    ids[b, 1:n] = rng.integers(3, min(eos, cfg.vocab_size - 2), n - 1)
    ids[b, 3] = 2
  return ids


def load_vcjax(cfg, state):
  model = nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0)))
  return load_state_dict(model, clip_text_state_dict(state), ignore=[r"position_ids"], what="CLIP text")


@pytest.mark.parametrize("legacy_eos,act", [(False, "quick_gelu"), (True, "quick_gelu"), (False, "gelu")])
def test_matches_transformers(tmp_path, legacy_eos, act):
  # Legacy configs (eos_token_id 2) find the tokenizer's EOS (999) as the largest id. The other case
  # uses EOS 997 < BOS 998, so taking the argmax there would pool the wrong (BOS) position.
  eos = 999 if legacy_eos else 997
  cfg = configs.tiny_clip_text(eos_token_id=2 if legacy_eos else eos, hidden_act=act)
  tmodel, state = torch_reference(cfg, cfg.eos_token_id, tmp_path)
  model = load_vcjax(cfg, state)
  ids = make_ids(cfg, eos, np.random.default_rng(0))

  with torch.no_grad():
    out = tmodel(torch.from_numpy(ids).long(), output_hidden_states=True)
    ref_last = out.last_hidden_state.numpy()
    ref_pooled = out.pooler_output.numpy()
    # diffusers' clip_skip: hidden_states[-(k + 1)] through final_layer_norm.
    ref_skip1 = tmodel.final_layer_norm(out.hidden_states[-2]).numpy()

  last = model(jnp.asarray(ids))
  hidden, pooled = model.encode(jnp.asarray(ids))
  skip1 = model(jnp.asarray(ids), clip_skip=1)
  skip1_enc, pooled_skip = model.encode(jnp.asarray(ids), clip_skip=1)
  errs = dict(last=rel_l2(last, ref_last), encode_last=rel_l2(hidden, ref_last),
              pooled=rel_l2(pooled, ref_pooled), skip1=rel_l2(skip1, ref_skip1),
              encode_skip1=rel_l2(skip1_enc, ref_skip1), pooled_skip=rel_l2(pooled_skip, ref_pooled))
  print(f"legacy_eos={legacy_eos} {act} rel L2: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
  assert last.shape == (2, 77, cfg.hidden_size) and pooled.shape == (2, cfg.hidden_size)
  for k, v in errs.items():
    assert v <= 1e-5, (k, v)
  # The pooled vector is the EOS position's state (index 9 and 30 here), not the sequence end.
  np.testing.assert_allclose(np.asarray(pooled[0]), np.asarray(last[0, 9]), rtol=0, atol=0)


def test_jit_and_causality(tmp_path):
  cfg = configs.tiny_clip_text()
  _, state = torch_reference(cfg, cfg.eos_token_id, tmp_path)
  model = load_vcjax(cfg, state)
  ids = make_ids(cfg, 999, np.random.default_rng(1))
  run = nnx.jit(lambda m, x: m(x))
  a = np.asarray(run(model, jnp.asarray(ids)))
  ids2 = ids.copy()
  ids2[:, 40:] = 5  # changing later tokens must not change earlier positions (causal mask)
  b = np.asarray(run(model, jnp.asarray(ids2)))
  np.testing.assert_array_equal(a[:, :40], b[:, :40])
  assert np.abs(a[:, 40:] - b[:, 40:]).max() > 1e-3
  with pytest.raises(ValueError):
    model(jnp.asarray(ids), clip_skip=cfg.num_hidden_layers + 1)


def test_embedding_not_transposed(tmp_path):
  # A square embedding table (vocab == hidden) would load transposed if treated as a linear.
  cfg = configs.tiny_clip_text(vocab_size=32, max_position_embeddings=32, eos_token_id=31)
  _, state = torch_reference(cfg, cfg.eos_token_id, tmp_path)
  model = load_vcjax(cfg, state)
  np.testing.assert_array_equal(np.asarray(model.text_model.embeddings.token_embedding.embedding[...]),
                                state["embeddings.token_embedding.weight"])


def test_state_dict_prefixes():
  x = np.zeros(1)
  for key in ("final_layer_norm.weight", "text_model.final_layer_norm.weight",
              "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
    assert list(clip_text_state_dict({key: x})) == ["text_model.final_layer_norm.weight"]


# ---------------------------------------------------------------- tokenizer

def write_tiny_bpe(folder):
  """A CLIP-style BPE vocabulary: letters, letters + </w>, a few merges, BOS / EOS last."""
  letters = "abcdefghijklmnopqrstuvwxyz"
  tokens = ["!"] + list(letters) + [c + "</w>" for c in letters]
  merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>")]
  tokens += [a + b for a, b in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return {t: i for i, t in enumerate(tokens)}


def test_tokenizer(tmp_path):
  vocab = write_tiny_bpe(tmp_path / "tokenizer")
  tok = load_tokenizer(tmp_path)  # a diffusers-style root: finds tokenizer/
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  prompts = ["the cat", "DOG", "cat " * 100]
  ids = tokenize(tok, prompts, max_length=77)
  assert ids.shape == (3, 77) and ids.dtype == np.int32
  # Lower-cased, merged BPE, EOS padding.
  np.testing.assert_array_equal(ids[0, :4], [bos, vocab["the</w>"], vocab["cat</w>"], eos])
  np.testing.assert_array_equal(ids[1, :3], [bos, vocab["dog</w>"], eos])
  assert (ids[0, 4:] == tok.pad_token_id).all() and tok.pad_token_id == eos
  # Truncation keeps BOS ... EOS within max_length.
  assert ids[2, 0] == bos and ids[2, -1] == eos and (ids[2, 1:-1] == vocab["cat</w>"]).all()
  ref = tok(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
  np.testing.assert_array_equal(ids, np.asarray(ref))
  short = tokenize(tok, "the dog", max_length=8)
  assert short.shape == (1, 8)


def test_tokenizer_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_tokenizer(tmp_path / "nope")


def test_no_torch_import(tmp_path):
  import subprocess
  import sys
  write_tiny_bpe(tmp_path)
  code = ("import sys, vcjax.models.clip_text\n"
          "from vcjax.models.tokenizer import load_tokenizer, tokenize\n"
          "assert 'torch' not in sys.modules, 'import loaded torch'\n"
          "assert tokenize(load_tokenizer(sys.argv[1]), ['the cat']).shape == (1, 77)\n"
          "assert 'torch' not in sys.modules, 'tokenizing loaded torch'\n")
  subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
