"""Batch-size studies: a sweep of trials through the one trainer, their results, the report.

`run_study` runs (or, for a cluster, prints or merges) the trials that grid.py builds from a
study config (configs/study_*.py), each one run of `loop.train_and_evaluate` with the study's
hooks, and writes results.jsonl and the report (render_steps.py or render_epochs.py). The study
config's fields, the files a study writes and the cluster mode are in docs/design.md,
"Batch-size studies".
"""
from __future__ import annotations

import json
import math
import os
import shlex
import time
from typing import Iterable

from absl import logging
from etils import epath
import jax
import ml_collections

from bigbatch import config_lib
from bigbatch import data
from bigbatch import jsonl
from bigbatch import schedule
from bigbatch import signals
from bigbatch import trainer
from bigbatch import units
from bigbatch import workdir as workdir_lib
from bigbatch.fields import ConfigError
from bigbatch.study import grid
from bigbatch.study import render_epochs
from bigbatch.study import render_steps

# ----------------------------------------------------------------------------- results


def _read_rows(path: str, key: str) -> list[dict]:
  """The rows of a JSON-lines file (none if it is missing); damaged lines are skipped with a
  warning (bigbatch/jsonl.py)."""
  if not workdir_lib.exists(path):
    return []
  read = jsonl.read(path, key)
  if read.damaged:
    logging.warning('%s.', jsonl.describe_damage(path, read.damaged))
  return read.rows


def _float(v) -> float:
  return float(v)  # JSON holds non-finite values as strings ('nan', 'inf')


def collect(trial: grid.Trial, trial_dir: str, wall_s: float, diverged: bool = False) -> dict:
  """The result row of a finished trial, from its workdir (metrics.jsonl, target.json)."""
  c = trial.config
  rows = _read_rows(os.path.join(trial_dir, 'metrics.jsonl'), 'step')
  metric = c.target.metric
  evals = [r for r in rows if metric in r]
  curve = [[r['step'], _float(r[metric])] for r in evals]
  # Every metric of the last evaluation (e.g. a face run's TAR@FAR beside its accuracy).
  final_metrics = ({k: _float(v) for k, v in evals[-1].items()
                    if k != 'step' and isinstance(v, (int, float, str))
                    and not k.startswith(('train/', 'perf/', 'lr'))} if evals else {})
  values = [v for _, v in curve if math.isfinite(v)]
  losses = [_float(r['train/loss']) for r in rows if 'train/loss' in r]
  eval_losses = [_float(r['eval/loss']) for r in rows if 'eval/loss' in r]
  finite_eval_losses = [v for v in eval_losses if math.isfinite(v)]
  steps_run = max((r['step'] for r in rows), default=0)
  target_path = os.path.join(trial_dir, 'target.json')
  reached = workdir_lib.read_json(target_path) if workdir_lib.exists(target_path) else None
  better = max if c.target.mode == 'max' else min
  num_train = num_train_of(c)
  derived = schedule.resolve(c, num_train)
  return {
      'trial_id': trial.trial_id, 'variant': trial.variant, 'data': c.data.name,
      'batch_size': trial.batch_size, 'lr': derived.peak_lr, 'lr_index': trial.lr_index,
      'seed': trial.seed,
      'target': {'metric': metric, 'value': c.target.value, 'mode': c.target.mode},
      'reached': reached is not None,
      'steps_to_target': reached['step'] if reached else None,
      'examples_to_target': reached['examples'] if reached else None,
      'wall_to_target_s': reached['wall_s'] if reached else None,
      'best_metric': better(values) if values else None,
      'final_metric': values[-1] if values else None,
      'final_metrics': final_metrics,
      'final_train_loss': losses[-1] if losses else None,
      # The held-out loss at the last evaluation and its lowest value (fixed-epoch studies).
      'final_eval_loss': eval_losses[-1] if eval_losses else None,
      'best_eval_loss': min(finite_eval_losses) if finite_eval_losses else None,
      'steps_run': steps_run,
      'budget_steps': derived.total_steps,
      # Examples and epochs trained: what a fixed-epoch study holds equal across batch sizes.
      'num_train': num_train,
      'examples_run': schedule.examples_seen(steps_run, trial.batch_size, derived.phases),
      'epochs_run': schedule.examples_seen(steps_run, trial.batch_size, derived.phases)
                    / num_train,
      'budget_epochs': c.num_epochs,
      'wall_s': wall_s,
      'eval_curve': curve,
      'noise_scale': [[r['step'], _float(r['train/gns/b_simple'])] for r in rows
                      if 'train/gns/b_simple' in r],
      'sharpness': [[r['step'], _float(r['sharpness/top_eigenvalue'])] for r in rows
                    if 'sharpness/top_eigenvalue' in r],
      'diverged': diverged,
      'accumulation_steps': c.accumulation_steps,
  }


_NUM_TRAIN: dict[str, int] = {}


def num_train_of(c) -> int:
  """The training set's size of config `c`, read once per data set and cached."""
  key = json.dumps([c.data.name, c.data.num_train, c.data.train_split, c.data.tfds_name])
  if key not in _NUM_TRAIN:
    _NUM_TRAIN[key] = data.create(c).num_train
  return _NUM_TRAIN[key]


def read_results(workdir: str) -> dict[str, dict]:
  """Finished trials by id: results.jsonl, plus result.json files not merged into it yet."""
  out = {}
  for row in _read_rows(os.path.join(workdir, 'results.jsonl'), 'trial_id'):
    out[row['trial_id']] = row
  trials_dir = epath.Path(workdir) / 'trials'
  if trials_dir.is_dir():
    for name in sorted(p.name for p in trials_dir.iterdir()):
      path = trials_dir / name / 'result.json'
      if name not in out and path.exists():
        try:
          out[name] = json.loads(path.read_text())
        except json.JSONDecodeError:
          logging.warning('Ignoring the unreadable %s: the trial will run again.', path)
  return out


def _is_main() -> bool:
  return jax.process_index() == 0  # multi-host trials: every process trains, one writes


def _append_result(workdir: str, row: dict) -> None:
  if not _is_main():
    return
  path = epath.Path(workdir) / 'results.jsonl'
  line = json.dumps(row) + '\n'
  if workdir_lib.is_object_store(workdir):  # no append there: rewrite the object
    with workdir_lib.storage(path):
      before = path.read_text() if path.exists() else ''
    workdir_lib.write_text(path, before + line)
  else:  # appended: a full disk (StorageError) leaves the rows before intact
    with workdir_lib.storage(path), path.open('a') as f:
      f.write(line)


def _write_json(path: str, obj) -> None:
  if not _is_main():
    return
  # Replaced whole: a killed write or a full disk never leaves a torn result.json.
  workdir_lib.write_json(path, obj, indent=1)


# ----------------------------------------------------------------------------- running


def run_trial(trial: grid.Trial, workdir: str, cache=None) -> dict:
  """Runs (or resumes) one trial through the trainer and writes its result.json. `cache`: a
  trainer.CompileCache shared by the study's trials."""
  # pylint: disable-next=g-import-not-at-top  (imports TensorFlow; --print_commands needs none)
  from bigbatch import loop
  from bigbatch.study import hooks as study_hooks
  trial_dir = os.path.join(workdir, 'trials', trial.trial_id)
  with workdir_lib.storage(trial_dir):
    epath.Path(trial_dir).mkdir(parents=True, exist_ok=True)
  start = time.monotonic()
  diverged = False
  try:
    loop.train_and_evaluate(trial.config, trial_dir, cache=cache,
                            hooks=study_hooks.hooks_for(trial.config, trial_dir))
  except loop.NonFiniteError as e:
    logging.warning('Trial %s diverged: %s', trial.trial_id, e)
    diverged = True
  row = collect(trial, trial_dir, time.monotonic() - start, diverged=diverged)
  _write_json(os.path.join(trial_dir, 'result.json'), row)
  return row


def run_study(study: ml_collections.ConfigDict, workdir: str, *, only: Iterable[str] = (),
        echo=print, cache=None) -> list[dict]:
  """Runs every unfinished trial (or those named in `only`), then writes the report (not for
  `only`). Returns all results known in the workdir. `cache`: a trainer.CompileCache for the
  trials (None: a new one, shared by this call's trials)."""
  workdir = workdir_lib.absolute(workdir)  # the trials' checkpoints need an absolute path
  all_trials = grid.trials(study)
  by_id = {t.trial_id: t for t in all_trials}
  unknown = sorted(set(only) - set(by_id))
  if unknown:
    raise ConfigError(f'--trial {", ".join(unknown)}: not a trial of this study; '
                      f'--print_commands lists them')
  _check_workdir(workdir)
  with workdir_lib.storage(workdir):
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  _write_json(os.path.join(workdir, 'study_config.json'), json.loads(study.to_json_best_effort()))
  done = read_results(workdir)
  todo = [t for t in all_trials if t.trial_id not in done and (not only or t.trial_id in only)]
  if done and not only:
    echo(f'[study] {len(done)} of {len(all_trials)} trials already have results in {workdir}; '
         f'running the other {len(todo)}')
  started = time.monotonic()
  if cache is None:
    cache = trainer.CompileCache()  # trials that differ in the peak lr or seed share a step
  for i, trial in enumerate(todo):
    # A signal's line names the trial; SIGTERM during it checkpoints its current update
    # (loop.Preempted), and the rerun skips the trials with results and resumes this one.
    signals.set_context(f' in trial {trial.trial_id} ({i + 1} of {len(todo)})')
    try:
      row = run_trial(trial, workdir, cache)
      done[trial.trial_id] = row
      if not only:
        with signals.critical():  # a signal's hard exit waits: no torn line in results.jsonl
          _append_result(workdir, row)
    finally:
      signals.set_context('')
    elapsed = time.monotonic() - started
    eta = elapsed / (i + 1) * (len(todo) - i - 1)
    if study.get('kind') == 'fixed_epochs':
      outcome = (f'diverged at step {row["steps_run"]}' if row['diverged'] else
                 f'{row["steps_run"]} steps ({row["epochs_run"]:.2f} epochs), final '
                 f'{row["target"]["metric"]} {row["final_metric"]}')
    else:
      outcome = (f'target at step {row["steps_to_target"]}' if row['reached'] else
                 'diverged' if row['diverged'] else 'target not reached')
    echo(f'[study] trial {i + 1}/{len(todo)} {trial.trial_id}: {outcome}, best '
         f'{row["target"]["metric"]} {row["best_metric"]}, {row["wall_s"]:.1f} s | elapsed '
         f'{units.duration(elapsed)}, ETA {units.duration(eta)}')
  if only:
    return list(done.values())
  return finish(study, workdir, all_trials, done, echo=echo)


def finish(study, workdir: str, all_trials: list[grid.Trial], done: dict[str, dict],
           echo=print) -> list[dict]:
  """Writes the report of the study's kind from the results in `done` (process 0 only);
  returns those of `all_trials`."""
  results = [done[t.trial_id] for t in all_trials if t.trial_id in done]
  missing = [t.trial_id for t in all_trials if t.trial_id not in done]
  notes = study.notes
  if missing:
    notes += (f'\n\n**Incomplete**: {len(missing)} of {len(all_trials)} trials have no result '
              f'yet: {", ".join(missing[:20])}{" ..." if len(missing) > 20 else ""}.')
  if not _is_main():
    return results
  if study.get('kind') == 'fixed_epochs':
    path = render_epochs.write(results, workdir, title=study.title, notes=notes,
                               extra_metrics=tuple(study.get('report_metrics', ())))
  else:
    path = render_steps.write(results, workdir, title=study.title, notes=notes)
  echo(f'[study] {len(results)} trials; report: {path}')
  return results


def merge(study: ml_collections.ConfigDict, workdir: str, echo=print) -> list[dict]:
  """Gathers the result.json files of trials run separately (--trial) into results.jsonl and
  writes the report."""
  workdir = workdir_lib.absolute(workdir)
  all_trials = grid.trials(study)
  _check_workdir(workdir)
  in_jsonl = {r['trial_id']
              for r in _read_rows(os.path.join(workdir, 'results.jsonl'), 'trial_id')}
  done = read_results(workdir) if workdir_lib.isdir(workdir) else {}
  if not done:
    raise workdir_lib.WorkdirError(
        f'{workdir} holds no trial results to merge (no results.jsonl, no '
        f'trials/<id>/result.json); run the trials first (--print_commands lists one command '
        f'per trial), or point --workdir at the study directory')
  for t in all_trials:
    if t.trial_id in done and t.trial_id not in in_jsonl:
      _append_result(workdir, done[t.trial_id])
  return finish(study, workdir, all_trials, done, echo=echo)


def _check_workdir(workdir: str) -> None:
  """WorkdirError (exit 2) if --workdir names something that is not a directory."""
  if workdir_lib.exists(workdir) and not workdir_lib.isdir(workdir):
    raise workdir_lib.WorkdirError(
        f'--workdir {workdir} is a file, not a directory: the study writes its trials, results '
        f'and report there; choose another --workdir')


def commands(study: ml_collections.ConfigDict, workdir: str, config_arg: str) -> list[str]:
  """One command per unfinished trial, for a SLURM array or several TPU slices."""
  workdir = workdir_lib.absolute(workdir)  # the commands may run in another directory
  _check_workdir(workdir)
  done = read_results(workdir)
  return [shlex.join(['python', '-m', 'bigbatch.study', f'--config={config_arg}',
                       f'--workdir={workdir}', f'--trial={t.trial_id}'])
          for t in grid.trials(study) if t.trial_id not in done]


def base_study() -> ml_collections.ConfigDict:
  """Defaults of a study config; configs/study_*.py start from this."""
  s = ml_collections.ConfigDict()
  s.title = 'Batch-size study'
  s.kind = 'steps_to_target'
  s.notes = ''
  s.base = config_lib.base_config()
  s.batch_sizes = (32, 128)
  s.variants = ml_collections.ConfigDict({'default': {}})
  s.lr_search = ml_collections.ConfigDict(
      {'mode': 'grid', 'num_trials': 3, 'range': (0.5, 2.0), 'relative_to': 'rule'})
  s.num_seeds = 1
  s.target = ml_collections.ConfigDict({'metric': 'eval/top1', 'value': 0.9, 'mode': 'max'})
  s.budget = ml_collections.ConfigDict({'epochs': None, 'steps': None})
  s.eval_every_epochs = 1.0
  s.log_every_steps = 5
  s.microbatch = ml_collections.config_dict.placeholder(int)
  s.noise_scale = True
  s.sharpness = True
  s.report_metrics = ()
  return s


def fixed_epochs_comparison(s: ml_collections.ConfigDict, *, epochs: float,
                            warmup_epochs: float) -> None:
  """The fixed-epoch-budget comparison's study fields (configs/study_epochs_*.py): final
  eval/top1 reported with no target, one lr per variant set by its rule (no search), and the four
  variants: no remedy (the base lr at every batch), linear scaling + warmup, LARS (eta 0.001,
  lr 0.5 at the base batch, linear + warmup) and ghost BN over 32 (linear + warmup)."""
  s.kind = 'fixed_epochs'
  s.target.metric, s.target.mode = 'eval/top1', 'max'  # the metric reported; no target
  s.target.value = None
  s.budget.epochs = epochs
  s.noise_scale = False
  s.sharpness = False
  s.lr_search = ml_collections.ConfigDict(
      {'mode': 'grid', 'num_trials': 1, 'range': (1.0, 1.0), 'relative_to': 'rule'})
  warmup = {'warmup_epochs': warmup_epochs}
  s.variants = ml_collections.ConfigDict({
      'no_remedy': {'lr': {'scaling': 'none'}},
      'linear_warmup': {'lr': {'scaling': 'linear', **warmup}},
      'lars': {'optimizer': {'name': 'lars', 'trust_coefficient': 0.001},
               'lr': {'base_lr': 0.5, 'scaling': 'linear', **warmup}},
      'ghost_bn': {'lr': {'scaling': 'linear', **warmup}, 'model': {'bn_group_size': 32}},
  })
