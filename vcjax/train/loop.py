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
  * at the end, workdir/final/: the trained parameters and what the task exports (the LoRA and token
    embedding for "subject", the diffusers UNet for "girl"); with `optimizer.ema_decay` > 0 the
    parameters' EMA is what is exported (as diffusers' training scripts save the EMA model; unless
    `optimizer.export_ema` is False), and info.json says which.

The loop knows no method: the objective is a `vcjax.train.task.Task` named by `cfg.task`.
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
from vcjax.train.checkpoint import Checkpointer, flatten
from vcjax.train.metrics import MetricsWriter
from vcjax.train.models import count_remat_blocks
from vcjax.train.state import OptimizerConfig, Trainer, ema_params, parse_lr_multipliers, step_key
from vcjax.train.task import get_task


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
                         grad_clip=o.grad_clip, warmup_steps=o.warmup_steps,
                         ema_decay=o.get("ema_decay", 0.0),
                         lr_multipliers=parse_lr_multipliers(o.get("lr_multipliers", "")))


def build(cfg, *, mesh=None):
  """-> (trainer, task, built) for a train config."""
  task = get_task(cfg)
  built = task.build(cfg, rngs=nnx.Rngs(cfg.seed))
  if cfg.get("remat", False) and hasattr(built.model, "unet"):
    built.info["remat_blocks"] = count_remat_blocks(built.model.unet)
  opt = optimizer_config(cfg)
  built.info["learning_rate"] = opt.learning_rate
  if mesh is None:
    mesh = parallel.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, sequence=cfg.mesh.sequence)
  trainer = Trainer(built.model, built.trainable, task.loss, opt, mesh=mesh, param_mode=cfg.mesh.param_sharding)
  return trainer, task, built


def export(trainer: Trainer, trainable, task, built, cfg, out: str, exported: str = "last") -> None:
  """workdir/final: trainable.safetensors (vcjax paths), info.json, and the task's own files; `exported`
  says in info.json which values `trainable` holds ("last", or "ema": the parameters' EMA)."""
  from vcjax.weights.sources import save_safetensors
  os.makedirs(out, exist_ok=True)
  host = jax.device_get(trainable)
  save_safetensors({k: np.asarray(v) for k, v in flatten(host).items()}, os.path.join(out, "trainable.safetensors"))
  task.export(trainer.model(host), out, built.info, cfg)
  with open(os.path.join(out, "info.json"), "w") as f:
    json.dump({"task": cfg.task, **built.info, "exported": exported}, f, indent=2)


def run(cfg, workdir: str) -> int:
  parallel.initialize_distributed()
  compiler.use_compilation_cache(cfg.compilation_cache)  # a resumed or repeated run loads its executables
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json(indent=2))
  t0 = time.time()
  trainer, task, built = build(cfg)
  log(f"task {cfg.task}: {trainer.num_trainable:,} trainable / {trainer.num_frozen:,} frozen parameters; "
      f"mesh {dict(trainer.mesh.shape)}, params {cfg.mesh.param_sharding}, dtype {cfg.dtype}, remat {cfg.remat}; "
      f"built in {time.time() - t0:.1f}s")
  if cfg.batch_size % jax.process_count():
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {jax.process_count()} processes")
  data = task.data(cfg, built.tokenizer, batch_size=cfg.batch_size // jax.process_count(), seed=cfg.seed)
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
      ema = ema_params(opt_state) if cfg.optimizer.get("export_ema", True) else None
      export(trainer, trainable if ema is None else ema, task, built, cfg, os.path.join(workdir, "final"),
             "last" if ema is None else "ema")
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
