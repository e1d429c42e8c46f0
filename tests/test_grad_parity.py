"""Gradients of one training step, vcjax vs PyTorch, for both objectives (same weights, inputs, noise and
timesteps; the random draws are bypassed by calling the deterministic `*_objective` directly).

PyTorch side: diffusers' UNetMotionModel built from the same random tiny pipeline as the `converted`
fixture, with the LoRA, Custom Diffusion's start-token detach, the PISA processor and both losses
written here from the method descriptions (METHODS.md §3, §4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from tests.reference import rel_err
from vcjax.diffusion.schedulers import SchedulerConfig
from vcjax.models.tokenizer import load_tokenizer, tokenize
from vcjax.nn import lora
from vcjax.methods.customcrafter.training import SubjectTask
from vcjax.methods.videomaker.training import GirlTask, girl_trainable
from vcjax.train.models import load_models
from configs.train_common import default_config
from vcjax.train.state import merge_model, split_model
from vcjax.weights.keymaps import diffusers_key_to_path, module_param_shapes, to_flax_layout

B, FRAMES, HW = 2, 2, 8
TOL = 1e-4


def torch_models():
  from diffusers import UNetMotionModel
  from vcjax.testing import build_models
  unet2d, _, text, adapter = build_models("tiny", "v2", seed=0)  # what the `converted` fixture holds
  return UNetMotionModel.from_unet2d(unet2d, adapter).eval(), text.eval()


def ddim_add_noise(x, noise, t):
  from diffusers import DDIMScheduler
  s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear")
  return s.add_noise(x, noise, t), s


def to_torch_video(x):  # (B, F, H, W, C) -> (B, C, F, H, W)
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3)))


def spatial_attention(name: str, which: str) -> bool:
  return ".attentions." in f".{name}" and "motion_modules" not in name and name.endswith(which)


def compare(jax_grads: dict, torch_named_grads: dict, unet_shapes) -> tuple[float, float]:
  """torch gradients (diffusers names) vs vcjax's (vcjax paths) -> (max per-tensor error, global rel err).

  Per-tensor error = ||a - b|| / max(||b||, 1e-4 * ||all of b||): relative for every gradient that is not
  ~0. (Some are exactly 0 in exact arithmetic, e.g. a bias right before a GroupNorm with one channel per
  group, whose shift the norm removes; both frameworks then return rounding noise ~1e-9.)
  """
  pairs = []
  for name, g in torch_named_grads.items():
    path = "unet." + diffusers_key_to_path(name, unet_shapes)
    assert path in jax_grads, f"{name} -> {path} is not trainable in vcjax"
    pairs.append((np.asarray(jax_grads[path], np.float64),
                  to_flax_layout(g, jax_grads[path].shape, name=path.rpartition(".")[2]).astype(np.float64)))
  assert len(pairs) == len(jax_grads), f"{len(jax_grads) - len(pairs)} vcjax trainables have no torch counterpart"
  total = np.sqrt(sum(np.sum(b ** 2) for _, b in pairs))
  worst = max(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-4 * total) for a, b in pairs)
  glob = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in pairs)) / total
  return float(worst), float(glob)


def flat(tree) -> dict:
  return {".".join(str(p.key) for p in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------------------------- subject


class TorchLoRA(torch.nn.Module):
  def __init__(self, base, down, up):
    super().__init__()
    self.base = base
    self.down = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(down.T)))  # (r, in)
    self.up = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(up.T)))  # (out, r)

  def forward(self, x):
    return self.base(x) + (x @ self.down.T) @ self.up.T


class DetachStartTokenProcessor:
  """Custom Diffusion's cross-attention: key/value rows of token 0 are detached."""

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
    q = attn.to_q(hidden_states)
    k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    detach = torch.ones_like(k)
    detach[:, :1] = 0.0
    k = detach * k + (1 - detach) * k.detach()
    v = detach * v + (1 - detach) * v.detach()
    b, n, c = q.shape
    heads = lambda x: x.view(b, -1, attn.heads, c // attn.heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(b, n, c)
    return attn.to_out[0](o)


def test_subject_lora_gradients(converted):
  cfg = default_config("subject")
  cfg.num_frames = FRAMES
  cfg.loss_kind = "l2"  # the reference below is the squared error (the default is the authors' L1)
  task = SubjectTask.from_config(cfg)
  assert task.hp.scheduler == SchedulerConfig()  # the objective's DDPM betas
  model = load_models(converted)
  tok = load_tokenizer(converted)
  trainable_filter, info = task.setup(model, tok, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for m in lora.lora_modules(model.unet).values():  # up = 0 would zero every down gradient
    m.lora_up.set_value(jnp.asarray(rng.standard_normal(m.lora_up.get_value().shape) * 0.3, jnp.float32))
  loras = lora.lora_arrays(model.unet)
  init_row = np.asarray(model.text_encoder.text_model.embeddings.new_token_embedding[...])[0]

  latents = rng.standard_normal((B, FRAMES, HW, HW, 4)).astype(np.float32)
  noise = rng.standard_normal(latents.shape).astype(np.float32)
  mask = (rng.random((B, FRAMES, HW, HW, 1)) > 0.3).astype(np.float32)
  ids = tokenize(tok, [f"a {cfg.new_token} dog", "a dog"])
  assert (ids == info["new_token_id"]).sum() == 1
  is_prior = np.array([0.0, 1.0], np.float32)
  t = np.array([10, 700])

  graphdef, trainable, frozen = split_model(model, trainable_filter)

  def loss_fn(tr):
    m = merge_model(graphdef, tr, frozen)
    return task.objective(m, latents, mask, ids, is_prior, noise, t)[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable)
  grads = flat(grads)

  # PyTorch.
  unet, text = torch_models()
  for p in (*unet.parameters(), *text.parameters()):
    p.requires_grad_(False)
  wrapped = {}
  for name, module in list(unet.named_modules()):
    for proj in ("to_q", "to_k", "to_v"):
      if spatial_attention(name, "attn1") or spatial_attention(name, "attn2"):
        down, up, _ = loras[f"{name}.{proj}"]
        wrapped[f"{name}.{proj}"] = TorchLoRA(getattr(module, proj), down, up)
        setattr(module, proj, wrapped[f"{name}.{proj}"])
    if spatial_attention(name, "attn2"):
      module.set_processor(DetachStartTokenProcessor())
  assert len(wrapped) == len(loras)
  text.resize_token_embeddings(info["new_token_id"] + 1, mean_resizing=False)
  emb = text.get_input_embeddings().weight
  with torch.no_grad():
    emb.data[info["new_token_id"]] = torch.from_numpy(np.array(init_row))
  emb.requires_grad_(True)

  context = text(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state
  lat, nz = to_torch_video(latents), to_torch_video(noise)
  tt = torch.from_numpy(t)
  noisy, _ = ddim_add_noise(lat, nz, tt)
  eps = unet(noisy, tt, context.repeat_interleave(FRAMES, dim=0)).sample
  m = to_torch_video(mask).expand_as(eps)
  per = (((eps - nz) ** 2) * m).sum(dim=(1, 2, 3, 4)) / m.sum(dim=(1, 2, 3, 4))
  ip = torch.from_numpy(is_prior)
  want_loss = (per * (1 - ip)).sum() / (1 - ip).sum() + cfg.prior_loss_weight * (per * ip).sum() / ip.sum()
  want_loss.backward()

  assert abs(float(loss) - float(want_loss.detach())) <= 1e-5 * abs(float(want_loss.detach()))
  torch_grads = {}
  for name, w in wrapped.items():
    torch_grads[f"{name}.lora_down"] = w.down.grad.numpy().T
    torch_grads[f"{name}.lora_up"] = w.up.grad.numpy().T
  errs = [rel_err(grads[f"unet.{k}"], g) for k, g in torch_grads.items()]
  tok_err = rel_err(grads["text_encoder.text_model.embeddings.new_token_embedding"][0],
                    emb.grad[info["new_token_id"]].numpy())
  print(f"subject: loss {float(loss):.6f} vs {want_loss.item():.6f}; LoRA grads max rel err {max(errs):.2e} "
        f"over {len(errs)} tensors; new token row {tok_err:.2e}")
  assert len(errs) + 1 == len(grads)
  assert max(errs) <= TOL and tok_err <= TOL


# ---------------------------------------------------------------------------------------------- GIRL


class PISAProcessor:
  """The authors' PISA: frame i attends over [frame_i; reference]; to_out on every token, then the
  reference halves averaged over the frames."""

  def __init__(self, num_frames):
    self.nf = num_frames

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
    h = hidden_states
    bf, length, c = h.shape
    b, f = bf // self.nf, self.nf - 1

    def pairs(x):
      x = x.view(b, self.nf, length, c)
      ref = x[:, -1:].expand(b, f, length, c)
      x = torch.cat([x[:, :-1], ref], dim=2).reshape(b * f, 2 * length, c)
      return x.view(b * f, 2 * length, attn.heads, c // attn.heads).transpose(1, 2)

    o = F.scaled_dot_product_attention(pairs(attn.to_q(h)), pairs(attn.to_k(h)), pairs(attn.to_v(h)))
    o = attn.to_out[0](o.transpose(1, 2).reshape(b * f, 2 * length, c)).view(b, f, 2 * length, c)
    ref = o[:, :, length:].mean(dim=1, keepdim=True)
    return torch.cat([o[:, :, :length], ref], dim=1).reshape(bf, length, c)


@pytest.mark.parametrize("train_motion", [True])  # False only drops tensors from the comparison
def test_girl_gradients(converted, train_motion):
  cfg = default_config("girl")
  cfg.train_motion = train_motion
  task = GirlTask.from_config(cfg)
  assert task.hp.scheduler == SchedulerConfig()  # the objective's DDPM betas
  model = load_models(converted)
  trainable_filter = girl_trainable(cfg.train_motion)
  rng = np.random.default_rng(1)
  latents = rng.standard_normal((B, FRAMES, HW, HW, 4)).astype(np.float32)
  noise = rng.standard_normal(latents.shape).astype(np.float32)
  reference = rng.standard_normal((B, 1, HW, HW, 4)).astype(np.float32)
  reference[1] = 0.0  # a dropped-out reference
  ref_noise = rng.standard_normal(reference.shape).astype(np.float32)
  context = rng.standard_normal((B, 7, 32)).astype(np.float32)
  t = np.array([250, 999])  # reference at t' = 2 and 9

  graphdef, trainable, frozen = split_model(model, trainable_filter)

  def loss_fn(tr):
    m = merge_model(graphdef, tr, frozen)
    return task.objective(m, latents, reference, context, noise, ref_noise, t)[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable)
  grads = flat(grads)

  unet, _ = torch_models()
  trainable_torch = {}
  for name, p in unet.named_parameters():
    is_attn1 = ".attentions." in f".{name}" and ".attn1." in name and "motion_modules" not in name
    train = is_attn1 or (train_motion and "motion_modules" in name and not name.endswith("pos_embed.pe"))
    p.requires_grad_(train)
    if train:
      trainable_torch[name] = p
  for name, module in unet.named_modules():
    if spatial_attention(name, "attn1"):
      module.set_processor(PISAProcessor(FRAMES + 1))
  from diffusers.training_utils import compute_snr
  tt = torch.from_numpy(t)
  noisy, s = ddim_add_noise(to_torch_video(latents), to_torch_video(noise), tt)
  rn = to_torch_video(ref_noise)
  ref_noisy, _ = ddim_add_noise(to_torch_video(reference), rn, torch.tensor([int(0.01 * x) for x in t]))
  x = torch.cat([noisy, ref_noisy], dim=2)
  out = unet(x, tt, torch.from_numpy(context).repeat_interleave(FRAMES + 1, dim=0)).sample
  eps, eps_ref = out[:, :, :FRAMES], out[:, :, FRAMES:]
  snr = compute_snr(s, tt)
  w = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
  l_video = (((eps - to_torch_video(noise)) ** 2).mean(dim=(1, 2, 3, 4)) * w).mean()
  l_ref = ((eps_ref - rn) ** 2).mean()
  want_loss = l_video + 0.1 * l_ref
  want_loss.backward()

  assert abs(float(loss) - float(want_loss.detach())) <= 1e-5 * abs(float(want_loss.detach()))
  shapes = module_param_shapes(model.unet)
  worst, glob = compare(grads, {k: p.grad.numpy() for k, p in trainable_torch.items()}, shapes)
  print(f"girl (train_motion={train_motion}): loss {float(loss):.6f} vs {want_loss.item():.6f}; grads: "
        f"global rel err {glob:.2e}, max per-tensor err {worst:.2e} over {len(trainable_torch)} tensors")
  assert worst <= TOL and glob <= TOL
