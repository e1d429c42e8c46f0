"""What the training loop asks of an objective: one `Task` object per objective, found by name.

    task = get_task(cfg)                        # e.g. cfg.task == "girl" -> videomaker.GirlTask
    built = task.build(cfg, rngs=nnx.Rngs(0))   # models + tokenizer + what is trainable
    loss, aux = task.loss(built.model, batch, key)            # pure; traced inside the jitted step
    data = task.data(cfg, built.tokenizer, batch_size=b, seed=s)   # resumable batch iterator
    task.export(built.model, out_dir, built.info, cfg)        # the task's own final files

A task owns its hyper-parameters as a frozen dataclass (`HParams`, built from the config's keys of the same
names by `hparams_from_config`), so the jitted step closes over static Python values, never over an
untyped ConfigDict. The loop (train/loop.py) knows nothing about any method.

Tasks by name: `TASKS` maps the built-in short names to "module:Class" (imported only when used); a config
may also name any task class directly, `--config.task=my_package.my_module:MyTask`. A new objective is then
one file (a Task subclass) plus a config in configs/.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any, ClassVar

from flax import nnx

from vcjax.diffusion import timestep_sampling
from vcjax.diffusion.schedulers import SchedulerConfig

TASKS = {
    "subject": "vcjax.methods.customcrafter.training:SubjectTask",  # CustomCrafter subject LoRA
    "girl": "vcjax.methods.videomaker.training:GirlTask",  # VideoMaker GIRL
    "vae": "vcjax.train.objectives.vae:VAETask",  # AutoencoderKL: reconstruction + KL
    "t2v": "vcjax.train.objectives.text_to_video:TextToVideoTask",  # AnimateDiff's eps objective
}


@dataclasses.dataclass
class Built:
  """What `Task.build` returns. model: an nnx.Module holding every network the loss calls (parameter paths
  start with their names, e.g. unet.*, vae.*); trainable: an nnx filter (everything else is frozen);
  tokenizer: the transformers tokenizer the data needs (None if none); info: JSON-able facts for the logs
  and final/info.json."""
  model: nnx.Module
  trainable: Any
  tokenizer: Any = None
  info: dict = dataclasses.field(default_factory=dict)


class Task:
  """Base class of a training objective. Subclasses set `name`, `HParams` and implement the methods."""

  name: ClassVar[str] = ""
  HParams: ClassVar[type] = type(None)

  def __init__(self, hparams):
    self.hp = hparams

  @classmethod
  def from_config(cls, cfg) -> "Task":
    return cls(hparams_from_config(cls.HParams, cfg))

  def build(self, cfg, *, rngs: nnx.Rngs) -> Built:
    raise NotImplementedError

  def loss(self, model: nnx.Module, batch: dict, key) -> tuple[Any, dict]:
    """-> (scalar loss, {name: scalar}). Draws every random number from `key`."""
    raise NotImplementedError

  def data(self, cfg, tokenizer, *, batch_size: int, seed: int):
    """An iterator of numpy batch dicts with get_state() / set_state(state) (this process's share)."""
    raise NotImplementedError

  def export(self, model: nnx.Module, out: str, info: dict, cfg) -> None:
    """Write the task's final files into `out` (the loop writes trainable.safetensors and, after this,
    info.json with what this adds to `info`)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionHParams:
  """The training noise schedule, shared by every diffusion objective's HParams (subclass it)."""
  beta_schedule: str = "linear"  # AnimateDiff's DDPM schedule
  beta_start: float = 0.00085
  beta_end: float = 0.012
  # The model's output: "epsilon" (AnimateDiff, SD1.5) or "v_prediction" (SD2-v; weights the x0 error at
  # high noise, where the eps loss gives the layout almost no gradient). Exported scheduler configs carry it.
  prediction_type: str = "epsilon"
  # Which timesteps training draws (vcjax.diffusion.timestep_sampling; diffusers' SDXL trainer flags):
  # "none" uniform; "later" / "earlier" multiply the weight of the last / first `portion` of the schedule by
  # `multiplier`; "range" that of begin <= t < end.
  timestep_bias_strategy: str = "none"
  timestep_bias_multiplier: float = 1.0
  timestep_bias_portion: float = 0.25
  timestep_bias_begin: int = 0
  timestep_bias_end: int = 1000

  def __post_init__(self):
    self.timestep_weights()  # a bad bias fails when the config is read, not at the first step

  def timestep_weights(self):
    """The training timesteps' sampling probabilities `(T,)`, or None for uniform."""
    if self.timestep_bias_strategy == "none":
      return None
    return timestep_sampling.timestep_weights(
        self.scheduler.num_train_timesteps, self.timestep_bias_strategy,
        multiplier=self.timestep_bias_multiplier, portion=self.timestep_bias_portion,
        begin=self.timestep_bias_begin, end=self.timestep_bias_end)

  def sample_timesteps(self, key, batch: int):
    """`(batch,)` training timesteps, uniform or biased as configured."""
    return timestep_sampling.sample_timesteps(key, batch, self.scheduler.num_train_timesteps,
                                              self.timestep_weights())

  @property
  def scheduler(self) -> SchedulerConfig:
    return SchedulerConfig(beta_schedule=self.beta_schedule, beta_start=self.beta_start, beta_end=self.beta_end,
                           prediction_type=self.prediction_type)

  def check_matches_base(self, model_dir: str, task: str) -> None:
    """Fine-tuning objectives (girl, subject) export no scheduler: their weights are sampled with the base
    folder's `scheduler/scheduler_config.json`. Training another target or another beta range than the base
    was trained with makes a model that samples wrong, so refuse it here, naming the overrides. The beta
    *schedule* may differ: AnimateDiff trains "linear" over SD's range while SD folders say "scaled_linear"."""
    from vcjax.loading import load_scheduler_config
    base = load_scheduler_config(model_dir)
    if base is None:
      return
    wrong = [f"--config.{key}={base[key]!r} (config has {getattr(self, key)!r})"
             for key in ("prediction_type", "beta_start", "beta_end")
             if key in base and base[key] != getattr(self, key)]
    if wrong:
      raise ValueError(f"task {task}: {model_dir}/scheduler/scheduler_config.json was trained with another "
                       f"schedule than this config; the fine-tuned weights are sampled with the base's, so set "
                       + ", ".join(wrong))


def task_class(name: str) -> type[Task]:
  """A registered short name, or "package.module:Class"."""
  target = TASKS.get(name, name)
  if ":" not in target:
    raise ValueError(f"unknown task {name!r}: one of {sorted(TASKS)} or 'package.module:Class'")
  module, attr = target.split(":", 1)
  try:
    cls = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"task {name!r}: cannot import {target} ({e})") from None
  if not (isinstance(cls, type) and issubclass(cls, Task)):
    raise ValueError(f"task {name!r}: {target} is not a vcjax.train.task.Task")
  return cls


def get_task(cfg) -> Task:
  return task_class(cfg.task).from_config(cfg)


def hparams_from_config(cls: type, cfg) -> Any:
  """The frozen dataclass `cls` filled from the config keys of the same names (lists become tuples).
  A key the config lacks keeps the field's default; a field without a default must be in the config."""
  hints = typing.get_type_hints(cls)
  values = {}
  for f in dataclasses.fields(cls):
    if f.name not in cfg:
      if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        raise ValueError(f"the config has no key {f.name!r}, which {cls.__name__} needs")
      continue
    v = cfg[f.name]
    if isinstance(v, list):
      v = tuple(v)
    if hints.get(f.name) is float and isinstance(v, int) and not isinstance(v, bool):
      v = float(v)
    values[f.name] = v
  return cls(**values)
