"""CLIP (both towers + projections) and DINO ViT vs transformers on random weights at tiny sizes, loaded
torch-free from the files save_pretrained writes."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from tests.reference import rel_err
from vcjax.testing import randomize_
from vcjax.weights.errors import CheckpointError
from vcjax.weights.eval_models import load_clip, load_dino

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def tiny_hf_clip(folder, *, seed=0, act="quick_gelu", eos_token_id=2, image_size=32, patch_size=8):
  """A random transformers CLIPModel with the architecture of ViT-B/32 at tiny sizes, saved to `folder`."""
  torch.manual_seed(seed)
  text = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              hidden_act=act, eos_token_id=eos_token_id, bos_token_id=998, pad_token_id=1)
  vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                image_size=image_size, patch_size=patch_size, hidden_act=act)
  cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
  model = randomize_(transformers.CLIPModel(cfg).eval(), seed)
  model.save_pretrained(folder, safe_serialization=True)
  return model


def tiny_hf_vit(folder, *, seed=0, image_size=32, patch_size=8):
  """A random transformers ViTModel with DINO ViT-S/16's architecture at tiny sizes, saved to `folder`."""
  torch.manual_seed(seed)
  cfg = transformers.ViTConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               image_size=image_size, patch_size=patch_size)
  model = randomize_(transformers.ViTModel(cfg).eval(), seed)
  model.save_pretrained(folder, safe_serialization=True)
  return model


def make_ids(rng, vocab=1000, eos=999, bos=998):
  ids = np.full((3, 77), eos, np.int64)
  for b, n in enumerate((5, 12, 30)):
    ids[b, 0] = bos
    ids[b, 1:n] = rng.integers(3, 990, n - 1)
  return ids


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_features_match_transformers(tmp_path, act):
  ref = tiny_hf_clip(tmp_path, act=act)
  model = load_clip(str(tmp_path))
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
  ids = make_ids(rng)
  with torch.no_grad():
    want_img = ref.get_image_features(pixel_values=torch.from_numpy(pixels))
    want_txt = ref.get_text_features(input_ids=torch.from_numpy(ids))
  want_img = getattr(want_img, "pooler_output", want_img).numpy()
  want_txt = getattr(want_txt, "pooler_output", want_txt).numpy()
  got_img = model.get_image_features(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  got_txt = model.get_text_features(jnp.asarray(ids, jnp.int32))
  assert want_img.shape == got_img.shape == (3, 24)
  assert rel_err(got_img, want_img) < 1e-5
  assert rel_err(got_txt, want_txt) < 1e-5


def test_dino_cls_matches_transformers(tmp_path):
  ref = tiny_hf_vit(tmp_path)
  model = load_dino(str(tmp_path))
  pixels = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    want = ref(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
  got = model(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  assert rel_err(got, want) < 1e-5
  assert rel_err(model.cls(jnp.asarray(pixels.transpose(0, 2, 3, 1))), want[:, 0]) < 1e-5


def test_wrong_kind_of_folder(tmp_path):
  tiny_hf_vit(tmp_path / "vit")
  tiny_hf_clip(tmp_path / "clip")
  with pytest.raises(CheckpointError, match=r"vit.*not a CLIP"):
    load_clip(str(tmp_path / "vit"))
  with pytest.raises(CheckpointError, match=r"clip.*not a ViT"):
    load_dino(str(tmp_path / "clip"))
  with pytest.raises(CheckpointError, match="no config.json"):
    load_clip(str(tmp_path))
  (tmp_path / "broken").mkdir()
  with open(tmp_path / "broken" / "config.json", "w") as f:
    json.dump({"model_type": "clip"}, f)
  with pytest.raises(CheckpointError, match="no weights found"):
    load_clip(str(tmp_path / "broken"))
  assert os.path.isfile(tmp_path / "clip" / "model.safetensors")
