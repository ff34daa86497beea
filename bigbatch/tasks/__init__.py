"""Tasks, chosen by name as models are: `config.task` names the module bigbatch.tasks.<name>,
whose `Task` class gives everything that differs between tasks: its config defaults and checks,
the model's output size, extra parameters and their sharding, optimizer wrapping, the per-device
loss, and the evaluator. The step (bigbatch/step.py), the trainer (bigbatch/trainer.py) and the
loop (bigbatch/loop.py) know no task by name.

A new task is a new file here with a `Task` subclass of `base.Task`: the file's name is the
task's name (NAMES lists the modules found in this package).
"""
from __future__ import annotations

import importlib
import pkgutil

from bigbatch.tasks import base

NAMES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != 'base'))


def get(name: str) -> type[base.Task]:
  """The Task class of bigbatch.tasks.<name>."""
  if name not in NAMES:
    raise ValueError(f'unknown task {name!r}; known: {", ".join(NAMES)}')
  return importlib.import_module(f'bigbatch.tasks.{name}').Task
