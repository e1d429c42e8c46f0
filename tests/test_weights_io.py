"""Torch-free checkpoint reading (vcjax.weights.pickle_safe / sources) against files torch wrote."""

import argparse
import collections
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from vcjax.weights.errors import CheckpointError  # noqa: E402
from vcjax.weights.pickle_safe import load_torch_pickle  # noqa: E402
from vcjax.weights.sources import (  # noqa: E402
    is_diffusers_folder, read_diffusers_component, read_state_dict, save_safetensors, split_by_prefix)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def to_numpy(t: "torch.Tensor") -> np.ndarray:
  """Reference values; bf16 / fp8 upcast to fp32 (numpy has no such dtypes)."""
  t = t.detach()
  if t.dtype in (torch.bfloat16, torch.float8_e4m3fn):
    t = t.float()
  return t.contiguous().numpy()


def assert_same(got: np.ndarray, ref: "torch.Tensor"):
  want = to_numpy(ref)
  if got.dtype in (np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn)):
    got = got.astype(np.float32)
  assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
  assert np.array_equal(got, want)


def tensors():
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 8, generator=g)
  flat = torch.arange(40, dtype=torch.float32)
  return {
      "fp32": torch.randn(3, 4, 5, generator=g),
      "fp16": torch.randn(7, 3, generator=g).half(),
      "bf16": torch.randn(4, 9, generator=g).to(torch.bfloat16),
      "int64": torch.randint(-10**12, 10**12, (5,), generator=g, dtype=torch.int64),
      "transposed": base.t(),  # non-contiguous: strides (1, 8)
      "every_other_col": base[:, ::2],  # non-contiguous: strides (8, 2)
      "shared_full": flat,
      "shared_view": flat[10:30].view(4, 5),  # same storage, offset 10
      "expanded": torch.randn(1, 4, generator=g).expand(3, 4),  # stride 0
      "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 3),
      "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
      "fp8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),  # _rebuild_tensor_v3 path
  }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_roundtrip(tmp_path, zip_format):
  ref = tensors()
  ckpt = {"state_dict": ref, "epoch": 3, "global_step": 1200, "hparams": {"lr": 1e-4, "name": "x"}}
  path = tmp_path / "model.ckpt"
  torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
  sd = read_state_dict(path)
  assert set(sd) == set(ref)
  for name, t in ref.items():
    assert_same(sd[name], t)
  # Views of one torch storage come back as independent copies.
  sd["shared_view"][0, 0] = -1.0
  assert sd["shared_full"][10] == 10.0
  # The plain-Python parts survive in the raw object.
  raw = load_torch_pickle(path)
  assert raw["epoch"] == 3 and raw["global_step"] == 1200
  assert raw["hparams"] == {"lr": 1e-4, "name": "x"}


def test_torch_save_other_payloads(tmp_path):
  # Folder name inside the zip is "archive" for a buffer; a file saved as a.pt and renamed keeps "a/".
  buf = io.BytesIO()
  obj = {"w": torch.ones(2, 3), "od": collections.OrderedDict(a=1), "size": torch.Size([2, 3]),
         "dtype": torch.float16, "ns": argparse.Namespace(lr=0.5), "np": np.arange(4), "bytes": b"\x00\xff",
         "set": {1, 2}, "tuple": (1, "two", 3.0), "none": None}
  torch.save(obj, buf)
  (tmp_path / "buffer.pt").write_bytes(buf.getvalue())
  torch.save(obj, tmp_path / "a.pt")
  os.rename(tmp_path / "a.pt", tmp_path / "renamed.bin")
  for name in ("buffer.pt", "renamed.bin"):
    raw = load_torch_pickle(tmp_path / name)
    assert np.array_equal(raw["w"], np.ones((2, 3), np.float32))
    assert raw["od"] == collections.OrderedDict(a=1) and raw["size"] == (2, 3)
    assert raw["dtype"] == np.float16 and raw["ns"].lr == 0.5
    assert np.array_equal(raw["np"], np.arange(4)) and raw["bytes"] == b"\x00\xff"
    assert raw["set"] == {1, 2} and raw["tuple"] == (1, "two", 3.0) and raw["none"] is None
  # Unwrapping: "module" / "model" wrappers, nested tensor dicts flattened, non-arrays dropped.
  torch.save({"module": {"a.weight": torch.ones(2), "sub": {"b": torch.zeros(1)}, "n": 5}}, tmp_path / "m.pt")
  sd = read_state_dict(tmp_path / "m.pt")
  assert sorted(sd) == ["a.weight", "sub.b"]


def test_safetensors_roundtrip(tmp_path):
  g = torch.Generator().manual_seed(1)
  ref = {"fp32": torch.randn(3, 5, generator=g), "fp16": torch.randn(4, generator=g).half(),
         "bf16": torch.randn(2, 3, 2, generator=g).to(torch.bfloat16),
         "int64": torch.arange(6, dtype=torch.int64), "empty": torch.zeros(0, 2)}
  path = tmp_path / "w.safetensors"
  safetensors_torch.save_file(ref, str(path), metadata={"format": "pt"})
  sd = read_state_dict(path)
  assert set(sd) == set(ref)
  for name, t in ref.items():
    assert_same(sd[name], t)
  # Our writer is read back by the official reader, bf16 included.
  save_safetensors(sd, tmp_path / "ours.safetensors", metadata={"note": "test"})
  back = safetensors_torch.load_file(str(tmp_path / "ours.safetensors"))
  assert set(back) == set(ref)
  for name, t in ref.items():
    assert back[name].dtype == t.dtype and torch.equal(back[name], t)
  # dtype cast touches floats only.
  cast = read_state_dict(path, dtype=np.float16)
  assert cast["bf16"].dtype == np.float16 and cast["fp32"].dtype == np.float16
  assert cast["int64"].dtype == np.int64
  assert read_state_dict(path, dtype="bfloat16")["fp32"].dtype == ml_dtypes.bfloat16


class _Payload:
  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return self.fn, (self.arg,)


def _payloads(marker):
  return {
      "os.system": _Payload(os.system, f"touch {marker}"),
      "builtins.eval": _Payload(eval, f"__import__('pathlib').Path({str(marker)!r}).touch()"),
  }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_malicious_pickles_are_refused(tmp_path, kind):
  marker = tmp_path / "pwned"
  payload = _payloads(marker)[kind]
  # The payload is live: plain pickle would run it.
  pickle.loads(pickle.dumps(payload))
  assert marker.exists()
  marker.unlink()
  files = {"zip.ckpt": None, "legacy.pt": None, "plain.pkl": None, "nested.pt": None}
  torch.save({"state_dict": {"w": torch.ones(2)}, "evil": payload}, tmp_path / "zip.ckpt")
  torch.save({"evil": payload}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
  (tmp_path / "plain.pkl").write_bytes(pickle.dumps(payload, protocol=2))
  torch.save([torch.zeros(1), {"a": [payload]}], tmp_path / "nested.pt")
  refused_name = kind.split(".")[1]  # protocol 2 spells them posix.system, __builtin__.eval
  for name in files:
    with pytest.raises(CheckpointError) as err:
      read_state_dict(tmp_path / name)
    msg = str(err.value)
    assert name in msg and refused_name in msg and "\n" not in msg, msg
    assert not marker.exists()


def _truncations(n):
  return sorted({1, 9, 100, n // 3, n // 2, n - 64, n - 1})


@pytest.mark.parametrize("suffix,writer", [
    (".safetensors", lambda sd, p: safetensors_torch.save_file(sd, p)),
    (".ckpt", lambda sd, p: torch.save({"state_dict": sd}, p)),
    (".pt", lambda sd, p: torch.save(sd, p, _use_new_zipfile_serialization=False)),
])
def test_truncated_and_corrupt_files(tmp_path, suffix, writer):
  good = tmp_path / f"good{suffix}"
  writer({"a": torch.randn(64, 64), "b": torch.randn(32)}, str(good))
  data = good.read_bytes()
  for cut in _truncations(len(data)):
    bad = tmp_path / f"cut{cut}{suffix}"
    bad.write_bytes(data[:cut])
    with pytest.raises(CheckpointError) as err:
      read_state_dict(bad)
    msg = str(err.value)
    assert str(bad) in msg and "\n" not in msg, msg
  for name, blob in (("empty", b""), ("garbage", b"\x13\x37" * 100)):
    bad = tmp_path / f"{name}{suffix}"
    bad.write_bytes(blob)
    with pytest.raises(CheckpointError, match=name) as err:
      read_state_dict(bad)
    assert "\n" not in str(err.value)
  with pytest.raises(CheckpointError, match="no such file"):
    read_state_dict(tmp_path / f"missing{suffix}")


def _tiny_vae():
  from diffusers import AutoencoderKL
  torch.manual_seed(0)
  return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                       up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                       latent_channels=4, norm_num_groups=4, sample_size=16).eval()


@pytest.mark.parametrize("variant", ["safetensors", "bin", "fp16", "sharded", "fp16_sharded"])
def test_diffusers_folder(tmp_path, variant):
  vae = _tiny_vae()
  if variant.startswith("fp16"):
    vae = vae.half()
  kwargs = {"safetensors": {}, "bin": {"safe_serialization": False}, "fp16": {"variant": "fp16"},
            "sharded": {"max_shard_size": "4KB"},
            "fp16_sharded": {"variant": "fp16", "max_shard_size": "4KB"}}[variant]
  vae.save_pretrained(tmp_path / "vae", **kwargs)
  (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
  assert is_diffusers_folder(tmp_path) and not is_diffusers_folder(tmp_path / "vae")
  if variant.endswith("sharded"):
    assert any(".index." in n for n in os.listdir(tmp_path / "vae"))
  config, sd = read_diffusers_component(tmp_path, "vae")
  assert config["block_out_channels"] == [8] and config["latent_channels"] == 4
  ref = vae.state_dict()
  assert set(sd) == set(ref)
  for name, t in ref.items():
    assert_same(sd[name], t)


def test_transformers_folder_and_errors(tmp_path):
  from transformers import CLIPTextConfig, CLIPTextModel
  torch.manual_seed(0)
  cfg = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=8, projection_dim=16)
  model = CLIPTextModel(cfg).eval()
  model.save_pretrained(tmp_path / "text_encoder")
  config, sd = read_diffusers_component(tmp_path, "text_encoder")
  assert config["hidden_size"] == 16
  ref = model.state_dict()
  assert set(sd) == set(ref)
  for name, arr in sd.items():
    assert_same(arr, ref[name])
  # LDM-style single file: prefixes split back out.
  ldm = {f"cond_stage_model.transformer.{k}": v for k, v in sd.items()}
  ldm["model.diffusion_model.x"] = np.zeros(1)
  assert set(split_by_prefix(ldm, "cond_stage_model.transformer.")) == set(sd)
  # Clear errors: no such component, no weights in the component.
  with pytest.raises(CheckpointError, match="no such component folder.*text_encoder"):
    read_diffusers_component(tmp_path, "unet")
  os.makedirs(tmp_path / "scheduler")
  shutil.copy(tmp_path / "text_encoder" / "config.json", tmp_path / "scheduler" / "config.json")
  with pytest.raises(CheckpointError, match="no weights found"):
    read_diffusers_component(tmp_path, "scheduler")


def test_import_does_not_pull_torch():
  code = "import sys, vcjax.weights.sources; assert 'torch' not in sys.modules, 'torch imported'"
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr


def test_big_endian_zip(tmp_path):
  # A zip checkpoint whose `byteorder` says "big" (written on a big-endian host): rebuilt by hand from
  # a little-endian one, checked against torch.load itself, then read by us.
  ref = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).to(torch.bfloat16),
         "c64": torch.randn(2, dtype=torch.complex64), "i64": torch.arange(3)}
  torch.save(ref, tmp_path / "le.pt")
  units = {"0": 4, "1": 2, "2": 4, "3": 8}  # storage key -> byte-swap unit (complex: per component)
  with zipfile.ZipFile(tmp_path / "le.pt") as src, zipfile.ZipFile(tmp_path / "be.pt", "w") as dst:
    for info in src.infolist():
      data = src.read(info)
      folder, _, rest = info.filename.partition("/")
      if rest == "byteorder":
        data = b"big"
      elif rest.startswith("data/"):
        unit = units[rest[len("data/"):]]
        data = np.frombuffer(data, f"<u{unit}").astype(f">u{unit}").tobytes()
      dst.writestr(info, data)
  back = torch.load(tmp_path / "be.pt", weights_only=True)
  assert all(torch.equal(back[k], v) for k, v in ref.items())
  sd = read_state_dict(tmp_path / "be.pt")
  for name, t in ref.items():
    assert_same(sd[name], t)


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_abstract_modules_match_a_real_build(component):
  """loading.abstract (ShapeOnlyRngs) has exactly the variables, shapes and dtypes of nnx.eval_shape
  with nnx.Rngs."""
  from flax import nnx

  from vcjax import loading
  from vcjax.models.configs import CLIPTextConfig, UNet3DConfig, VAEConfig
  config = {"unet": UNet3DConfig(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
                                 num_attention_heads=2, norm_num_groups=8, motion_num_heads=2,
                                 down_block_types=("CrossAttnDownBlock", "DownBlock"),
                                 up_block_types=("UpBlock", "CrossAttnUpBlock")),
            "vae": VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
            "text_encoder": CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           max_position_embeddings=8)}[component]
  cls, _ = loading._COMPONENTS[component]
  want = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
  got = loading.abstract(component, config)
  shapes = lambda m: {path: (type(v).__name__, v.get_value().shape, v.get_value().dtype)
                      for path, v in nnx.to_flat_state(nnx.state(m))}
  assert shapes(got) == shapes(want) and len(shapes(want)) > 10
