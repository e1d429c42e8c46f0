"""The training loop: build -> restore -> step / log / checkpoint -> export, preemption-safe.

    code = run(config, workdir)   # 0: finished or stopped cleanly (SIGTERM / stop_after); 1: failed

Behaviour:
  * resumes from the newest checkpoint in `workdir/checkpoints` if there is one (parameters, optimizer,
    data iterator position, random key), so a resumed run continues with exactly the numbers the
    uninterrupted run would have produced (bit-exact on CPU);
  * SIGTERM (preemption) -> finish the current step, save, log a line, return 0; `stop_after` does the
    same at a given step (tests, time-sliced jobs);
  * a non-finite loss stops the run without saving the broken state (the last good checkpoint stays)
    and returns 1 with a message; the loss is checked one step late so the host never waits on the
    device except when logging or saving;
  * metrics every `log_every` steps to workdir/metrics.jsonl and TensorBoard;
  * at the end, workdir/final/: the trained parameters (and the LoRA / token embedding for "subject").
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcjax import compiler, parallel
from vcjax.diffusion.schedulers import SchedulerConfig
from vcjax.models.configs import reconfigure
from vcjax.models.tokenizer import check_length, load_tokenizer
from vcjax.train import tasks
from vcjax.train.checkpoint import Checkpointer, flatten
from vcjax.train.data import make_data
from vcjax.train.metrics import MetricsWriter
from vcjax.train.state import OptimizerConfig, Trainer, step_key


class NonFiniteLoss(RuntimeError):
  pass


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[train] {msg}", flush=True)


class _Preemption:
  """SIGTERM sets a flag; the loop saves and exits at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del frame
      self.requested = True
      log(f"signal {signum} received: will save a checkpoint after the current step and exit")
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler (stop_after still works)
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def optimizer_config(cfg) -> OptimizerConfig:
  """The OptimizerConfig of a train config; `optimizer.scale_lr` multiplies the lr by the global batch."""
  o = cfg.optimizer
  lr = o.learning_rate * (cfg.batch_size if o.get("scale_lr", False) else 1)
  return OptimizerConfig(learning_rate=lr, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                         grad_clip=o.grad_clip, warmup_steps=o.warmup_steps)


def build(cfg, *, mesh=None):
  """-> (trainer, tokenizer, info) for a train config."""
  model = tasks.load_models(cfg.model, cfg.dtype)
  # How the models run is part of their (static) configs: set before the task installs its changes
  # (attention variants, LoRA, new tokens), which a rebuild would not carry over.
  attention = cfg.get("attention", "auto")
  model.unet = reconfigure(model.unet, attention=attention, remat=cfg.remat)
  model.vae = reconfigure(model.vae, attention=attention)
  model.text_encoder = reconfigure(model.text_encoder, attention=attention)
  tokenizer = load_tokenizer(cfg.model)
  check_length(tokenizer, model.text_encoder.config.max_position_embeddings)
  trainable_filter, info = tasks.SETUP[cfg.task](model, cfg, tokenizer, rngs=nnx.Rngs(cfg.seed))
  if cfg.remat:
    info["remat_blocks"] = sum(1 for _, m in nnx.iter_graph(model.unet) if getattr(m, "remat", False) is True)
  sched = SchedulerConfig(beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start, beta_end=cfg.beta_end)
  loss = tasks.LOSSES[cfg.task]

  def loss_fn(m, batch, key):
    return loss(m, batch, key, cfg, sched)

  opt = optimizer_config(cfg)
  info["learning_rate"] = opt.learning_rate
  if mesh is None:
    mesh = parallel.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, sequence=cfg.mesh.sequence)
  trainer = Trainer(model, trainable_filter, loss_fn, opt, mesh=mesh, param_mode=cfg.mesh.param_sharding)
  return trainer, tokenizer, info


def export(trainer: Trainer, trainable, cfg, info, out: str) -> None:
  """workdir/final: trainable.safetensors (vcjax paths); for "subject" also the LoRA (vcjax and PEFT files)
  and the new token's embedding (token_embedding.safetensors: {token: (D,)}); for "girl" the full UNet in
  diffusers naming (unet_diffusers/, loadable by UNetMotionModel.from_pretrained)."""
  from vcjax.weights.sources import save_safetensors
  os.makedirs(out, exist_ok=True)
  host = jax.device_get(trainable)
  save_safetensors({k: np.asarray(v) for k, v in flatten(host).items()}, os.path.join(out, "trainable.safetensors"))
  if cfg.task == "subject":
    model = trainer.model(host)
    emb = np.asarray(model.text_encoder.text_model.embeddings.new_token_embedding[...])
    save_safetensors({cfg.new_token: emb[0]}, os.path.join(out, "token_embedding.safetensors"))
    from vcjax.weights.lora_files import save_lora, save_lora_peft
    save_lora(model.unet, os.path.join(out, "lora.safetensors"))  # vcjax's own (sample.py --lora)
    save_lora_peft(model.unet, os.path.join(out, "pytorch_lora_weights.safetensors"))  # diffusers / PEFT
  else:  # GIRL: the whole UNet as a diffusers UNetMotionModel folder (what VideoMaker releases)
    from vcjax.weights.export import save_unet
    save_unet(trainer.model(host).unet, os.path.join(out, "unet_diffusers"))
  with open(os.path.join(out, "info.json"), "w") as f:
    json.dump({"task": cfg.task, "new_token": cfg.get("new_token"), **info}, f, indent=2)


def run(cfg, workdir: str) -> int:
  parallel.initialize_distributed()
  compiler.use_compilation_cache(cfg.compilation_cache)  # a resumed or repeated run loads its executables
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json(indent=2))
  t0 = time.time()
  trainer, tokenizer, info = build(cfg)
  log(f"task {cfg.task}: {trainer.num_trainable:,} trainable / {trainer.num_frozen:,} frozen parameters; "
      f"mesh {dict(trainer.mesh.shape)}, params {cfg.mesh.param_sharding}, dtype {cfg.dtype}, remat {cfg.remat}; "
      f"built in {time.time() - t0:.1f}s")
  if cfg.batch_size % jax.process_count():
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {jax.process_count()} processes")
  data = make_data(cfg, tokenizer, batch_size=cfg.batch_size // jax.process_count(), seed=cfg.seed)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.checkpoint.keep,
                      async_save=cfg.checkpoint.async_save)
  start = ckpt.latest_step()
  if start is not None:
    tr_target, opt_target = trainer.abstract_state()
    trainable, opt_state, key_data, meta = ckpt.restore(start, tr_target, opt_target)
    trainer.release_initial()
    data.set_state(meta["data"])
    seed_key = jnp.asarray(key_data)
    log(f"resumed from step {start} ({ckpt.directory})")
  else:
    start = 0
    trainable, opt_state = trainer.init()
    seed_key = jax.random.PRNGKey(cfg.seed)
  writer = MetricsWriter(workdir, resume_step=start, tensorboard=cfg.tensorboard)
  num_steps = cfg.num_steps
  state = {"last_good": start if ckpt.latest_step() is not None else None, "t": time.time(), "t_step": start}

  def handle(step: int, metrics) -> None:
    """Check (and maybe log) a finished step's metrics; blocks until that step is done."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(m["loss"]):
      raise NonFiniteLoss(f"loss is {m['loss']} at step {step}")
    if step % cfg.log_every == 0 or step == num_steps:
      now = time.time()
      m["steps_per_sec"] = (step - state["t_step"]) / max(now - state["t"], 1e-9)
      m["lr"] = float(trainer.lr_schedule(step - 1))
      state["t"], state["t_step"] = now, step
      writer.write(step, m)
      if progress is not None:
        progress.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)

  def save(step: int) -> None:
    ckpt.save(step, trainable, opt_state, seed_key, {"data": data.get_state()})
    state["last_good"] = step

  progress = None
  if jax.process_index() == 0 and cfg.progress:
    from tqdm import tqdm
    progress = tqdm(total=num_steps, initial=start, desc=cfg.task, dynamic_ncols=True, file=sys.stderr)
  step, pending, code = start, None, 0
  try:
    with _Preemption() as preempt:
      while step < num_steps:
        batch = next(data)
        if cfg.debug_nan_at_step == step + 1:  # test hook: poison this step's input
          batch = dict(batch, pixels=np.full_like(batch["pixels"], np.nan))
        trainable, opt_state, metrics = trainer.step(trainable, opt_state, trainer.shard_batch(batch),
                                                     step_key(seed_key, step))
        if pending is not None:  # the previous step's numbers, while this one runs
          handle(*pending)
        elif step == start:
          log(f"first step dispatched (trace + compile) in {time.time() - t0:.1f}s since start")
        step += 1
        pending = (step, metrics)
        if progress is not None:
          progress.update(1)
        stop = preempt.any_process() or (cfg.stop_after > 0 and step >= cfg.stop_after)
        if step % cfg.checkpoint.every == 0 or step == num_steps or stop:
          handle(*pending)
          pending = None
          save(step)
        if stop:
          ckpt.wait()
          why = "SIGTERM" if preempt.requested else f"stop_after={cfg.stop_after}"
          log(f"stopping ({why}): saved checkpoint at step {step} in {ckpt.directory}; exiting cleanly")
          return 0
      if pending is not None:
        handle(*pending)
    ckpt.wait()
    if jax.process_index() == 0:
      export(trainer, trainable, cfg, info, os.path.join(workdir, "final"))
    log(f"finished {num_steps} steps; final weights in {os.path.join(workdir, 'final')}")
  except NonFiniteLoss as e:
    last = state["last_good"]
    ckpt.wait()
    print(f"error: {e}; stopping. The last good checkpoint is "
          f"{'step ' + str(last) + ' in ' + ckpt.directory if last is not None else 'none (no step was saved)'}",
          file=sys.stderr, flush=True)
    code = 1
  finally:
    if progress is not None:
      progress.close()
    writer.close()
    ckpt.close()
  return code


def default_config(task: str):
  """Settings of `task` ("subject" | "girl") from METHODS.md (the authors' code where it and the paper
  differ; the paper's choice stays one key away); configs/*.py start from this."""
  import ml_collections
  if task not in tasks.TASKS:
    raise ValueError(f"task must be one of {tasks.TASKS}, got {task!r}")
  c = ml_collections.ConfigDict()
  c.task = task
  c.model = ""  # a converted vcjax folder (convert/animatediff.py)
  c.seed = 0
  c.num_steps = 10_000
  c.batch_size = 1  # global
  c.resolution = 512
  c.num_frames = 4 if task == "subject" else 16
  c.dtype = "float32"  # compute dtype of UNet + VAE ("bfloat16" for mixed precision; params stay fp32)
  c.remat = False  # gradient checkpointing per resnet / spatial transformer / motion module
  # Attention kernel of every model: "auto" | "xla" | "chunked" | "cudnn" | "splash", optionally with
  # AttentionConfig fields, e.g. "chunked,chunk_bytes=8388608" (vcjax.nn.attention).
  c.attention = "auto"
  c.beta_schedule, c.beta_start, c.beta_end = "linear", 0.00085, 0.012  # AnimateDiff's DDPM schedule
  # scale_lr: learning_rate is per example and multiplied by the global batch_size (the authors' LVDM
  # rule, base lr x GPUs x per-GPU batch: 3e-5 x 4 x 2 = 2.4e-4 for CustomCrafter).
  # grad_clip: global norm, <= 0 off (the CustomCrafter code clips nothing; VideoMaker clips at 1.0).
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-5 if task == "subject" else 1e-5, scale_lr=task == "subject", weight_decay=1e-2,
      b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.0 if task == "subject" else 1.0, warmup_steps=0))
  if task == "subject":
    # Where the CustomCrafter paper and its authors' code differ, the code is the default (METHODS.md §6);
    # the paper: loss_kind "l2", augment "paper", caption_dropout 0 (and scale_lr False).
    c.new_token = "<new1>"
    c.class_word = "dog"
    c.lora_rank = 4
    c.lora_targets = tasks.SUBJECT_LORA_TARGETS
    c.detach_start_token = True
    c.loss_kind = "l1"  # the authors' code (loss_type l1); the paper says "l2"
    c.prior_loss_weight = 1.0
    c.caption_dropout = 0.2  # instance and class captions -> "" (the authors' uncond_prob)
    c.augment = "authors"  # rescale distribution: "authors" (discrete, black canvas) | "paper" (see vcjax.data.customcrafter)
  else:
    c.train_motion = True  # "Update Motion" (the final VideoMaker model)
    c.min_snr_gamma = 5.0  # <= 0 disables Min-SNR weighting
    c.ref_loss_weight = 0.1
    c.remind_divisor = 100  # reference noised at t' = t // 100 = int(0.01 t)
    c.drop_text, c.drop_reference, c.drop_both = 0.05, 0.05, 0.05
  # GIRL folders: each read draws a temporal window from the clip's stored frames (builders.py): frames
  # frame_stride apart (CelebV-Text, stride 8) or, with sampling "window", evenly over `window` (VideoBooth).
  c.data = ml_collections.ConfigDict(dict(kind="folder", dir="", dataset="", num_threads=4, worker_count=0,
                                          num_examples=8, shp="object", frame_stride=8, sampling="stride",
                                          window=64))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, sequence=1, param_sharding="replicate"))
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))
  c.log_every = 10
  c.tensorboard = True
  c.progress = True
  c.compilation_cache = compiler.DEFAULT_CACHE  # JAX's persistent compilation cache; "" turns it off
  c.stop_after = 0  # > 0: save and exit (code 0) once this many steps are done
  c.debug_nan_at_step = 0  # > 0: feed NaN pixels at that step (tests the NaN guard)
  return c
