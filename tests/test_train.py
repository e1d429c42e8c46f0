"""The trainer's pieces: what is trainable, the training hooks (start-token detach, new-token splice,
remat), data-parallel + FSDP steps on 8 simulated devices vs one device, TensorBoard event files and
train.py's command line. (Resume / SIGTERM / NaN: test_train_resume.py; gradients vs PyTorch:
test_grad_parity.py.)"""

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.reference import rel_err
from vcjax import parallel
from vcjax.models.blocks import ResnetBlock, SpatialTransformer
from vcjax.models.motion import MotionModule
from vcjax.models.tokenizer import load_tokenizer, tokenize
from vcjax.nn.attention import Attention, set_attention
from vcjax.nn.attention_variants import ALL
from vcjax.methods.customcrafter.training import SubjectTask
from vcjax.methods.videomaker.training import GirlTask, girl_trainable
from vcjax.models.trainable_tokens import add_placeholder_token, add_trainable_tokens
from vcjax.train.models import load_component, load_models
from vcjax.train.task import TASKS
from configs.train_common import default_config
from vcjax.train.metrics import MetricsWriter, _masked_crc32c
from vcjax.train.state import OptimizerConfig, Trainer, split_model, step_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def paths(tree):
  return [".".join(str(p.key) for p in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_trainable_selection(converted):
  # Subject: the LoRA factors of q/k/v in spatial attn1/attn2, and the new token row; nothing else.
  model = load_models(converted)
  cfg = default_config("subject")
  filt, info = SubjectTask.from_config(cfg).setup(model, load_tokenizer(converted), rngs=nnx.Rngs(0))
  _, trainable, frozen = split_model(model, filt)
  names = paths(trainable)
  lora = [n for n in names if n.startswith("unet.")]
  assert len(lora) == 6 * 2 * 3 * 2  # 6 spatial transformer blocks x attn1/2 x q/k/v x down/up
  assert all(".attentions." in n and "motion_modules" not in n and n.split(".")[-3] in ("attn1", "attn2")
             and n.split(".")[-2] in ("to_q", "to_k", "to_v") for n in lora)
  assert set(names) - set(lora) == {"text_encoder.text_model.embeddings.new_token_embedding"}
  assert info["new_token_id"] == 514  # appended after the tiny tokenizer's 514 tokens
  assert "text_encoder.text_model.embeddings.token_embedding.embedding" in paths(frozen)
  # GIRL: spatial attn1 (q/k/v/out) outside the motion modules, plus every motion-module parameter.
  model = load_models(converted)
  for train_motion in (False, True):
    _, trainable, _ = split_model(model, girl_trainable(train_motion))
    names = paths(trainable)
    attn1 = [n for n in names if "motion_modules" not in n]
    assert len(attn1) == 6 * 5 and all(".attentions." in n and ".attn1." in n for n in attn1)
    motion = [n for n in names if "motion_modules" in n]
    all_motion = [n for n in paths(nnx.state(model, nnx.Param).to_pure_dict()) if "motion_modules" in n]
    assert motion == (sorted(all_motion, key=names.index) if train_motion else [])


@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_start_token_detach():
  rngs = nnx.Rngs(0)
  attn = Attention(8, 2, context_dim=6, rngs=rngs)
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  ctx = jax.random.normal(jax.random.key(2), (2, 4, 6))
  plain = attn(x, ctx)
  set_attention(attn, "start_token_detach", where=ALL)
  np.testing.assert_array_equal(np.asarray(attn(x, ctx)), np.asarray(plain))  # same values

  def loss(kernels, ctx):
    graphdef, state = nnx.split(attn)
    m = nnx.merge(graphdef, state)
    m.to_k.kernel = nnx.Param(kernels[0])
    m.to_v.kernel = nnx.Param(kernels[1])
    return jnp.sum(jnp.sin(m(x, ctx)))

  kernels = (attn.to_k.kernel[...], attn.to_v.kernel[...])
  g_kernels, g_ctx = jax.grad(loss, argnums=(0, 1))(kernels, ctx)
  assert np.all(np.asarray(g_ctx[:, 0]) == 0) and np.abs(np.asarray(g_ctx[:, 1:])).min() > 0

  # The k/v kernel gradients are those of a function where token 0's key/value rows are constants.
  def manual(kernels):
    k = ctx @ kernels[0]
    v = ctx @ kernels[1]
    k = jnp.concatenate([jax.lax.stop_gradient(k[:, :1]), k[:, 1:]], axis=1)
    v = jnp.concatenate([jax.lax.stop_gradient(v[:, :1]), v[:, 1:]], axis=1)
    q = attn.split_heads(attn.to_q(x))
    from vcjax.nn.attention import dot_product_attention
    o = dot_product_attention(q, attn.split_heads(k), attn.split_heads(v))
    return jnp.sum(jnp.sin(attn.to_out(o.reshape(*o.shape[:-2], -1))))

  want = jax.grad(manual)(kernels)
  for g, w in zip(g_kernels, want):
    assert rel_err(g, w) < 1e-6
  # ... which differ from not detaching (else this test proves nothing).
  set_attention(attn, "default", where=ALL)
  assert rel_err(jax.grad(loss)(kernels, ctx)[0], want[0]) > 1e-3


def test_new_token_splice(converted):
  text = load_component(converted, "text_encoder")
  tok = load_tokenizer(converted)
  token_id, init = add_placeholder_token(tok, "<new1>", "x", text)
  x_id = tok("x", add_special_tokens=False)["input_ids"]
  assert len(x_id) == 1
  table = np.asarray(text.text_model.embeddings.token_embedding.embedding[...])
  np.testing.assert_array_equal(init, table[x_id[0]])
  ids_class = tokenize(tok, ["a x dog"])
  want = np.asarray(text(ids_class))
  add_trainable_tokens(text, [token_id], init[None])
  ids_new = tokenize(tok, ["a <new1> dog"])
  assert (ids_new == token_id).sum() == 1 and ids_new.shape == ids_class.shape
  np.testing.assert_allclose(np.asarray(text(ids_new)), want, rtol=0, atol=1e-6)
  # Only the new row receives gradient; the table is a different (frozen) variable.
  graphdef, new, rest = nnx.split(text, nnx.PathContains("new_token_embedding"), ...)
  g = jax.grad(lambda n: jnp.sum(nnx.merge(graphdef, n, rest)(ids_new) ** 2))(new)
  assert np.abs(np.asarray(jax.tree.leaves(g)[0])).sum() > 0


@pytest.mark.slow  # > 15 s on 2 CPU cores
def test_remat_blocks_same_values_and_grads():
  class Tiny(nnx.Module):
    def __init__(self, remat: bool):
      rngs = nnx.Rngs(0)  # the same parameters with and without remat
      self.res = ResnetBlock(8, 8, 4, groups=2, eps=1e-5, across_frames=False, remat=remat, rngs=rngs)
      self.st = SpatialTransformer(8, 2, 4, groups=2, eps=1e-6, remat=remat, rngs=rngs)
      self.mm = MotionModule(8, 2, groups=2, zero_init_out=False, remat=remat, rngs=rngs)  # every weight matters
      # A variant that reads the (static) frame count inside the remat'd block; the path selects the
      # spatial transformer's attn1 (the default selection knows the motion modules by their UNet name).
      set_attention(self, "pisa", where=r"^st\.transformer_blocks\.\d+\.attn1$")

    def __call__(self, x, temb, ctx):
      x = self.res(x, temb)
      x = self.st(x, ctx)
      return self.mm(x)

  model = Tiny(remat=False)
  args = (jax.random.normal(jax.random.key(1), (1, 3, 2, 2, 8)), jax.random.normal(jax.random.key(2), (1, 4)),
          jax.random.normal(jax.random.key(3), (1, 3, 4)))

  def grads(m):
    graphdef, params = nnx.split(m)
    f = lambda p: jnp.sum(jnp.tanh(nnx.merge(graphdef, p)(*args)))
    return jax.jit(jax.value_and_grad(f))(params), jax.make_jaxpr(jax.grad(f))(params)

  (v0, g0), _ = grads(model)
  model = Tiny(remat=True)
  assert sum(1 for _, m in nnx.iter_graph(model) if getattr(m, "remat", False) is True) == 3
  assert model.st.transformer_blocks[0].attn1.variant == "pisa" and isinstance(model.st, SpatialTransformer)
  (v1, g1), jaxpr = grads(model)
  assert "checkpoint" in str(jaxpr) or "remat" in str(jaxpr)
  assert float(v0) == pytest.approx(float(v1), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    assert rel_err(a, b) < 1e-5


def _parallel_losses(converted: str) -> dict:
  """GIRL, 3 steps on one device and on 8 (data 2 x fsdp 4, params + optimizer state sharded)."""
  cfg = default_config("girl")
  cfg.num_frames, cfg.resolution = 2, 16
  cfg.model, cfg.data.kind = converted, "synthetic"
  tok = load_tokenizer(converted)
  task = GirlTask.from_config(cfg)
  data = task.data(cfg, tok, batch_size=8, seed=0)
  batches = [next(data) for _ in range(3)]
  seed = jax.random.PRNGKey(0)

  def run(mesh, mode):
    built = task.build(cfg, rngs=nnx.Rngs(0))
    model, filt, loss_fn = built.model, built.trainable, task.loss
    # Adam's first update is lr * g / (|g| + eps): with the paper's eps 1e-8 the ~1e-9 round-off noise on
    # parameters whose true gradient is 0 (motion-module biases after a one-channel-per-group GroupNorm)
    # becomes a full +-lr step whose sign depends on the reduction order, i.e. on the device count. A
    # larger eps keeps those steps at round-off size (the test checks the sharding, not Adam).
    tr = Trainer(model, filt, loss_fn, OptimizerConfig(eps=1e-3), mesh=mesh, param_mode=mode)  # paper lr 1e-5
    p, o = tr.init()
    out = []
    for i, b in enumerate(batches):
      p, o, m = tr.step(p, o, tr.shard_batch(b), step_key(seed, i))
      out.append(float(m["loss"]))
    sharded = [x for x in jax.tree.leaves((p, o)) if not x.sharding.is_fully_replicated]
    return out, len(sharded)

  one, _ = run(parallel.make_mesh(devices=jax.devices()[:1]), "replicate")
  eight, n_sharded = run(parallel.make_mesh(data=2, fsdp=4), "fsdp")
  return {"one": one, "eight": eight, "sharded": n_sharded, "devices": jax.device_count()}


def test_data_parallel_and_fsdp_match_one_device(converted):
  """Run in a subprocess with XLA's cheapest CPU optimisation level (the 8-device SPMD compile is the
  slow part of this file); both meshes run there, so the comparison is like for like."""
  import json
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  code = f"import json, tests.test_train as t; print('RESULT', json.dumps(t._parallel_losses({converted!r})))"
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.split("RESULT", 1)[1])
  print(f"losses 1 device {r['one']}; 8 devices (data 2 x fsdp 4) {r['eight']}; {r['sharded']} arrays sharded")
  assert r["devices"] == 8 and r["sharded"] > 0
  for a, b in zip(r["eight"], r["one"]):
    assert abs(a - b) <= 1e-5 * abs(b)
  assert len(set(r["one"])) == 3


class _Affine(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (64, 64)))  # 4096 elements: fsdp shards it
    self.b = nnx.Param(jnp.zeros((64,)))


def test_parameter_ema_matches_diffusers_ema_model():
  """optimizer.ema_decay: the EMA kept in the optimizer state (parameters sharded over 8 devices, fsdp)
  equals diffusers' EMAModel stepped with the same parameters after every update, warmup rule included."""
  import torch
  from diffusers.training_utils import EMAModel
  from vcjax.train.state import ema_params

  def loss_fn(model, batch, key):
    del key
    return jnp.mean((batch["x"] @ model.w.value + model.b.value - batch["y"]) ** 2), {}

  model = _Affine(nnx.Rngs(0))
  init = {k: np.asarray(v) for k, v in {"w": model.w.value, "b": model.b.value}.items()}
  mesh = parallel.make_mesh(fsdp=8)
  tr = Trainer(model, nnx.Param, loss_fn, OptimizerConfig(learning_rate=0.05, ema_decay=0.7), mesh=mesh,
               param_mode="fsdp")
  params, opt = tr.init()
  torch_params = [torch.nn.Parameter(torch.from_numpy(init[k].copy())) for k in ("w", "b")]
  ema = EMAModel(torch_params, decay=0.7)
  rng = np.random.default_rng(0)
  for step in range(6):
    batch = tr.shard_batch({"x": rng.normal(size=(8, 64)).astype(np.float32),
                            "y": rng.normal(size=(8, 64)).astype(np.float32)})
    params, opt, _ = tr.step(params, opt, batch, jax.random.PRNGKey(step))
    with torch.no_grad():
      for p, k in zip(torch_params, ("w", "b")):
        p.copy_(torch.from_numpy(np.array(params[k])))
    ema.step(torch_params)
  ours = ema_params(opt)
  assert ours["w"].sharding == params["w"].sharding and params["w"].sharding.spec != jax.sharding.PartitionSpec()
  for k, theirs in zip(("w", "b"), ema.shadow_params):
    assert rel_err(np.asarray(ours[k]), theirs.numpy()) < 1e-6
  # after 6 updates the decay is min(0.7, 6 / 15) = 0.4: the EMA is not the last parameters
  assert rel_err(np.asarray(ours["w"]), np.asarray(params["w"])) > 1e-3
  assert ema_params(Trainer(_Affine(nnx.Rngs(0)), nnx.Param, loss_fn, OptimizerConfig(), mesh=mesh).init()[1]) is None


def test_lr_multipliers_scale_one_parameter_groups_step():
  """optimizer.lr_multipliers: the matching parameter's AdamW step (decay included) is exactly `factor` times
  the plain run's from the same parameters and gradients (one step); rules apply in order. The config's string form parses to the same rules."""
  from vcjax.train.loop import optimizer_config

  def loss_fn(model, batch, key):
    del key
    return jnp.mean((batch["x"] @ model.w.value + model.b.value - batch["y"]) ** 2), {}

  rng = np.random.default_rng(1)
  batch = {"x": rng.normal(size=(8, 64)).astype(np.float32), "y": rng.normal(size=(8, 64)).astype(np.float32)}
  steps = {}
  for rules in ((), (("^w$", 3.0), ("w|b", 0.5))):
    tr = Trainer(_Affine(nnx.Rngs(0)), nnx.Param, loss_fn,
                 OptimizerConfig(learning_rate=0.01, weight_decay=0.1, lr_multipliers=rules))
    params, opt = tr.init()
    before = jax.tree.map(np.asarray, params)
    params, opt, _ = tr.step(params, opt, tr.shard_batch(batch), jax.random.PRNGKey(0))  # Adam + decay
    steps[rules] = {k: np.asarray(params[k]) - before[k] for k in before}
  plain, scaled = steps.values()
  assert np.abs(plain["w"]).max() > 1e-3
  np.testing.assert_allclose(scaled["w"], 3.0 * plain["w"], rtol=1e-4, atol=1e-7)  # first rule wins
  np.testing.assert_allclose(scaled["b"], 0.5 * plain["b"], rtol=1e-4, atol=1e-7)
  cfg = default_config("t2v")
  cfg.optimizer.lr_multipliers = "attentions/.*/attn2/=5, ^text_encoder/=2.5"
  assert optimizer_config(cfg).lr_multipliers == (("attentions/.*/attn2/", 5.0), ("^text_encoder/", 2.5))
  cfg.optimizer.lr_multipliers = "attn2"
  with pytest.raises(ValueError, match="pattern=factor"):
    optimizer_config(cfg)


def _read_events(path):
  """TFRecord framing (CRC-checked) + the scalars of each Event, decoded by hand."""

  def varint(b, i):
    n = shift = 0
    while True:
      n |= (b[i] & 0x7F) << shift
      shift += 7
      i += 1
      if not b[i - 1] & 0x80:
        return n, i

  def fields(b):
    i, out = 0, []
    while i < len(b):
      key, i = varint(b, i)
      num, wire = key >> 3, key & 7
      if wire == 0:
        v, i = varint(b, i)
      elif wire == 1:
        v, i = b[i:i + 8], i + 8
      elif wire == 5:
        v, i = b[i:i + 4], i + 4
      else:
        n, i = varint(b, i)
        v, i = b[i:i + n], i + n
      out.append((num, v))
    return out

  data, i, events = open(path, "rb").read(), 0, []
  while i < len(data):
    header = data[i:i + 8]
    (n,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[i + 8:i + 12])[0] == _masked_crc32c(header)
    body = data[i + 12:i + 12 + n]
    assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == _masked_crc32c(body)
    i += 16 + n
    ev = dict(step=0, version=None, scalars={})
    for num, v in fields(body):
      if num == 2:
        ev["step"] = v
      elif num == 3:
        ev["version"] = v.decode()
      elif num == 5:
        for _, value in fields(v):
          f = dict(fields(value))
          ev["scalars"][f[1].decode()] = struct.unpack("<f", f[2])[0]
    events.append(ev)
  return events


def test_metrics_jsonl_and_tensorboard(tmp_path):
  w = MetricsWriter(str(tmp_path))
  for step in (1, 2, 3):
    w.write(step, {"loss": 1.0 / step, "lr": 1e-5, "grad_norm": float("nan")})
  w.close()
  w = MetricsWriter(str(tmp_path), resume_step=2)  # a resumed run drops the records after its checkpoint
  w.write(3, {"loss": 0.5})
  w.close()
  from vcjax.train.metrics import read_metrics
  recs = read_metrics(str(tmp_path))
  assert [r["step"] for r in recs] == [1, 2, 3] and recs[2]["loss"] == 0.5 and recs[0]["grad_norm"] == "nan"
  files = sorted(os.listdir(tmp_path / "tensorboard"))
  assert len(files) == 2 and all(f.startswith("events.out.tfevents.") for f in files)
  events = [e for f in files for e in _read_events(tmp_path / "tensorboard" / f)]
  assert events[0]["version"] == "brain.Event:2"
  scalars = [(e["step"], e["scalars"]) for e in events if e["scalars"]]
  assert scalars[0] == (1, {"train/loss": 1.0, "train/lr": pytest.approx(1e-5), "train/grad_norm": pytest.approx(
      float("nan"), nan_ok=True)})
  assert scalars[-1] == (3, {"train/loss": 0.5})


def test_train_cli_errors(tmp_path, capsys):
  import importlib.util
  spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  assert cli.main(["--workdir", str(tmp_path)]) == 2
  cfg = os.path.join(ROOT, "configs", "train_tiny_girl.py")
  assert cli.main(["--config", cfg, "--workdir", str(tmp_path), "--config.no_such_key=1"]) == 2
  assert "no_such_key" in capsys.readouterr().err
  for name in ("train_subject_lora", "train_girl", "train_tiny_subject", "train_tiny_girl"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert "python train.py --config configs/" in mod.__doc__
    c = mod.get_config()
    assert c.task in TASKS
  from configs.train_common import default_config as dc
  paper = dc("girl")
  assert (paper.optimizer.learning_rate, paper.optimizer.weight_decay, paper.optimizer.grad_clip) == (1e-5, 1e-2, 1.0)
  assert dc("subject").optimizer.learning_rate == 3e-5 and dc("subject").lora_rank == 4


def test_tasks_by_name_or_dotted_path():
  from vcjax.train.task import Task, task_class
  from vcjax.train.objectives.vae import VAETask
  assert task_class("vae") is VAETask
  assert task_class("vcjax.train.objectives.vae:VAETask") is VAETask  # a new objective needs no registry entry
  assert task_class("girl") is GirlTask and issubclass(task_class("subject"), Task)
  for bad, why in (("nope", "unknown task"), ("vcjax.nope:X", "cannot import"), ("vcjax.train.task:Built", "not a")):
    with pytest.raises(ValueError, match=why):
      task_class(bad)
  cfg = default_config("girl")
  del cfg["ref_loss_weight"]  # a hyper-parameter without a default must come from the config
  with pytest.raises(ValueError, match="ref_loss_weight"):
    GirlTask.from_config(cfg)


@pytest.mark.parametrize("task_name", ["girl", "subject"])
def test_fine_tuning_refuses_another_schedule_than_the_base(converted, tmp_path, task_name):
  """girl / subject export no scheduler (their weights are sampled with the base's), so a config that trains
  another target or beta range than the base's scheduler config says is refused, naming the overrides."""
  from vcjax.train.task import task_class
  base = str(tmp_path / "base")
  shutil.copytree(converted, base)
  sched_path = os.path.join(base, "scheduler", "scheduler_config.json")
  with open(sched_path) as f:
    sched = json.load(f)
  sched.update(beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction")
  with open(sched_path, "w") as f:
    json.dump(sched, f)
  cfg = default_config(task_name)
  cfg.model = base
  cls = task_class(task_name)
  with pytest.raises(ValueError, match=r"prediction_type='v_prediction'.*beta_start=0\.0001.*beta_end=0\.02"):
    cls.from_config(cfg).build(cfg, rngs=nnx.Rngs(0))
  cfg.beta_start, cfg.beta_end, cfg.prediction_type = 0.0001, 0.02, "v_prediction"
  built = cls.from_config(cfg).build(cfg, rngs=nnx.Rngs(0))
  assert built.model.unet is not None
