"""The interface a task implements (bigbatch/tasks/__init__.py chooses one by name)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections

from bigbatch import optim


class Task:
  """One task of one build: created by the trainer with the config and the data set's class
  count. The defaults below are those of plain data-parallel training; subclasses override what
  differs."""

  # Prefix of the evaluator's metric names ('eval/top1', 'verify/lfw/accuracy').
  eval_prefix = 'eval'
  # The mesh axes one update is data-parallel over; the gradient reduction runs over them.
  axes: tuple[str, ...] = ('data',)

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    self.config = config
    self.num_classes = num_classes

  # ------------------------------------------------------------------- config (class level)

  @staticmethod
  def defaults() -> dict[str, Any]:
    """Dotted config fields this task owns, with their defaults (merged into the base config
    with an overlap check). Every task's fields exist in every config, so that an override of
    another task's field is not an error until the task is chosen."""
    return {}

  @staticmethod
  def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises fields.ConfigError for a config this task cannot run, before anything is built.
    Called for every config (a task also refuses data meant for another)."""

  @staticmethod
  def runlocal(config: ml_collections.ConfigDict) -> None:
    """config_lib.runlocal's shrinking of what the task owns (it has already made the data
    synthetic and small)."""

  # ------------------------------------------------------------------- construction

  @property
  def outputs(self) -> int:
    """The model's output size."""
    return self.num_classes

  def param_rules(self) -> tuple:
    """Extra (regex, PartitionSpec) sharding rules for the task's parameters."""
    return ()

  def init_params(self, key: jax.Array, model_params: Any, num_devices: int) -> Any:
    """The trained parameters from the model's (the task may add its own)."""
    del key, num_devices
    return model_params

  def backbone(self, params: Any) -> Any:
    """The parameters the model applies, out of the trained ones."""
    return params

  def wrap_optimizer(self, optimizer: optim.Optimizer) -> optim.Optimizer:
    """The optimizer the task trains with, built around the config's (default: unchanged)."""
    return optimizer

  def loss_fn(self, model) -> Callable:
    """Per-device loss of one microbatch share (step.LossFn), for the training model."""
    raise NotImplementedError

  def objective(self, model) -> Callable:
    """The training loss as a fixed function of the parameters: (params, batch_stats, images,
    labels) -> scalar on global arrays, BN in inference mode with the statistics given, no
    dropout, no sampling. What sharpness (bigbatch/study/sharpness.py) differentiates twice.
    Returns the same object for the same model and config, so its Hessian-vector product
    compiles once per run."""
    raise NotImplementedError

  # ------------------------------------------------------------------- evaluation

  def eval_fn(self, model) -> Callable:
    """The per-batch evaluation function (state, batch) -> outputs, jitted by the trainer."""
    raise NotImplementedError

  def evaluate(self, trainer, state, dataset, prefix: str) -> dict[str, float]:
    """Runs trainer.eval_step over the evaluation data; metrics named `prefix`/...."""
    raise NotImplementedError

  def check_startup(self) -> None:
    """Reads and checks what evaluation needs, so a bad file fails at start, not hours in."""
