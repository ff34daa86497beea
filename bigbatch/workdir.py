"""Workdir protection: a workdir belongs to one experiment.

A workdir records the config it was started with (config.json). Restarting in it with a config
that changes the experiment is refused, listing the fields; changes that only observe or extend
the run are allowed: logging/eval/checkpoint intervals, and a longer (or shorter) run as long as
every step already taken would have had the same learning rate.
"""
from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np

from bigbatch import optim

CONFIG_FILE = 'config.json'

# Fields that observe the run (or say where to find data) without changing any update.
OBSERVING = frozenset({
    'log_every_steps', 'eval_every_epochs', 'eval_every_steps', 'checkpoint_every_steps',
    'keep_checkpoints', 'data.prefetch', 'data.data_dir', 'eval_batch', 'profile_steps',
    'compilation_cache_dir', 'mode', 'precise_bn_batches',
})
# Fields that set the run's length; allowed to change if past learning rates do not.
LENGTH = frozenset({'num_steps', 'num_epochs'})


class WorkdirError(RuntimeError):
  """The workdir holds another experiment. The message lists the differences and the way out."""


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def recorded_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_compatible(workdir: str, config, *, num_train: int, resume_step: int) -> None:
  """Raises WorkdirError if `config` would change the experiment recorded in `workdir`."""
  old = recorded_config(workdir)
  if old is None:
    return
  new = json.loads(config.to_json_best_effort())
  a, b = _flatten(old), _flatten(new)
  changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  refused = [k for k in changed if k not in OBSERVING and k not in LENGTH]
  if not refused and any(k in LENGTH for k in changed) and resume_step > 0:
    if not _same_past_lr(ml_collections.ConfigDict(old), config, num_train, resume_step):
      refused = [k for k in changed if k in LENGTH] + ['(the lr of steps already run)']
  if refused:
    shown = ', '.join(f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in refused[:6]
                      if not k.startswith('('))
    more = f' (+{len(refused) - 6} more)' if len(refused) > 6 else ''
    raise WorkdirError(
        f'{workdir} holds another experiment; the config changes {shown}{more}'
        f'{" and the lr of steps already run" if refused[-1].startswith("(") else ""}. '
        f'Use a new --workdir, or pass --restart_from_scratch to set the old run aside')


def _same_past_lr(old_config, new_config, num_train: int, resume_step: int) -> bool:
  old = optim.make(old_config, num_train)
  new = optim.make(new_config, num_train)
  steps = np.arange(resume_step)
  lr_old = np.asarray(old.lr_fn(steps, old.derived.peak_lr))
  lr_new = np.asarray(new.lr_fn(steps, new.derived.peak_lr))
  return bool(np.array_equal(lr_old, lr_new))


def set_aside(workdir: str) -> str | None:
  """Moves an existing workdir to '<workdir>.old-<time>' (nothing is deleted); returns it."""
  if not os.path.exists(workdir):
    return None
  target = f'{workdir.rstrip(os.sep)}.old-{time.strftime("%Y%m%d-%H%M%S")}'
  os.rename(workdir, target)
  return target


def ensure_writable(workdir: str) -> None:
  """Creates the workdir, or raises WorkdirError saying why it cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.bigbatch-write-test')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'cannot write to the workdir {workdir}: {e.strerror or e}; choose a '
                       f'writable --workdir') from None


def record(workdir: str, config) -> None:
  with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
