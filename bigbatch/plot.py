"""Figures of one run's metrics, or of runs side by side.

  python -m bigbatch.plot /tmp/q1 /tmp/q2 --x=steps,epochs --out_dir=plots

writes OUT_DIR/metrics_vs_<x>.png for each --x (steps, epochs, examples, time): loss, accuracy
and learning rate, one colour per run, read from WORKDIR/metrics.jsonl and derived.json (local or
object-store paths). What each x axis counts, and the exit codes: docs/design.md, "Reading a run
afterwards: plots and exports".
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
from typing import Sequence

from absl import app
from absl import flags
from etils import epath
import numpy as np

from bigbatch import jsonl
from bigbatch import workdir as workdir_lib

X_AXES = ('steps', 'epochs', 'examples', 'time')
_X_LABELS = {'steps': 'steps', 'epochs': 'epochs', 'examples': 'training examples seen',
             'time': 'training wall time (minutes, from logged step rates)'}
_DPI = 110

_X = flags.DEFINE_list('x', ['steps', 'epochs', 'time'],
                       f'x axes, one figure each: any of {", ".join(X_AXES)}.')
_OUT_DIR = flags.DEFINE_string('out_dir', '.', 'Where the PNG files go (local or gs://...).')
_LABELS = flags.DEFINE_list('labels', [], 'Legend labels, one per workdir (default: the '
                            "workdir's name and global batch).")
_SMOOTH = flags.DEFINE_float('smooth', 0.0, 'Exponential moving average weight for the '
                             'training curves (0: raw logged values; 0.6 as TensorBoard).')
_TITLE = flags.DEFINE_string('title', '', 'Figure title (default: none).')


class PlotError(Exception):
  """A workdir or flag that cannot be plotted; the message is the one line the user sees."""


@dataclasses.dataclass
class Series:
  """One metric's values at the steps where it was logged."""
  steps: np.ndarray
  values: np.ndarray


@dataclasses.dataclass
class Curves:
  """A run's scalar metrics by name, and its derived.json (None when it has none)."""
  workdir: str
  label: str
  series: dict[str, Series]
  derived: dict | None

  def x_of(self, steps: np.ndarray, x: str) -> np.ndarray:
    """Steps converted to the x axis `x`."""
    steps = np.asarray(steps, dtype=np.float64)
    if x == 'steps':
      return steps
    if x == 'time':
      return self._minutes_at(steps)
    if self.derived is None:
      raise PlotError(f'{self.workdir} has no derived.json (written when training starts): '
                      f'--x={x} needs its steps per epoch')
    d = self.derived['derived']
    phases = d.get('phases') or [{
        'start_epoch': 0, 'start_step': 0, 'end_step': math.inf,
        'steps_per_epoch': d['steps_per_epoch'], 'global_batch': d['global_batch']}]
    out = np.zeros_like(steps)
    examples_before = 0.0  # training examples seen before each phase
    for i, p in enumerate(phases):
      # Update s (1-based) belongs to the phase holding index s - 1: the last phase's end, and
      # steps past it, continue the last phase.
      last = i == len(phases) - 1
      inside = (steps - 1 >= p['start_step']) & (last | (steps - 1 < p['end_step']))
      if i == 0:
        inside |= steps <= 0
      done = steps[inside] - p['start_step']
      if x == 'epochs':
        out[inside] = p['start_epoch'] + done / p['steps_per_epoch']
      else:
        out[inside] = examples_before + done * p['global_batch']
      examples_before += (p['end_step'] - p['start_step']) * p['global_batch']
    return out

  def _minutes_at(self, steps: np.ndarray) -> np.ndarray:
    rate = self.series.get('train/steps_per_sec')
    if rate is None or not len(rate.steps):
      raise PlotError(f'{self.workdir}/metrics.jsonl has no train/steps_per_sec: --x=time '
                      'needs the logged step rates')
    # Each logged rate covers the updates since the previous logged step (from the run's
    # start, or its resume, for the first).
    previous = np.concatenate([[0.0], rate.steps[:-1]])
    with np.errstate(divide='ignore'):
      seconds = np.cumsum((rate.steps - previous) / np.where(rate.values > 0, rate.values,
                                                              np.inf))
    return np.interp(steps, np.concatenate([[0.0], rate.steps]),
                     np.concatenate([[0.0], seconds])) / 60.0


def _read_text(path: epath.Path, what: str) -> str:
  try:
    return path.read_text()
  except FileNotFoundError:
    raise PlotError(f'{path} does not exist: {what}') from None
  except (OSError, UnicodeDecodeError) as e:
    raise PlotError(f'cannot read {path}: {e}') from None


def read_run(workdir: str, label: str | None = None) -> Curves:
  """A workdir's metrics.jsonl and derived.json; PlotError says what is missing or corrupt."""
  root = epath.Path(workdir)
  if not root.exists():
    raise PlotError(f'{workdir} does not exist')
  if not root.is_dir():
    raise PlotError(f'{workdir} is not a directory (a workdir holds metrics.jsonl)')
  path = root / 'metrics.jsonl'
  try:
    read = jsonl.read(path, 'step')
  except FileNotFoundError:
    raise PlotError(f'{path} does not exist: is it a bigbatch workdir, and has the run logged '
                    f'its first step?') from None
  except OSError as e:
    raise PlotError(f'cannot read {path}: {e}') from None
  damaged = list(read.damaged)
  columns: dict[str, dict[int, float]] = {}
  for record, number in zip(read.rows, read.numbers):
    try:
      # Non-finite values are written as the strings "nan", "inf", "-inf".
      values = {k: float(v) for k, v in record.items() if k != 'step'}
    except (TypeError, ValueError):  # a value that is no number: damaged too
      damaged.append(number)
      continue
    for k, v in values.items():
      columns.setdefault(k, {})[record['step']] = v  # a step logged twice keeps its last value
  if damaged:  # a torn last line of a live or killed run, or a damaged one: that line only
    print(f'warning: {jsonl.describe_damage(path, sorted(damaged))}', file=sys.stderr)
  if not columns:
    raise PlotError(f'{root / "metrics.jsonl"} holds no metrics yet')
  series = {}
  for k, by_step in columns.items():
    steps = np.array(sorted(by_step), dtype=np.float64)
    series[k] = Series(steps, np.array([by_step[s] for s in sorted(by_step)]))
  derived = None
  if (root / 'derived.json').exists():
    try:
      derived = json.loads(_read_text(root / 'derived.json', ''))
      int(derived['derived']['steps_per_epoch'])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      raise PlotError(f'{root / "derived.json"} is not what the trainer writes '
                      f'({type(e).__name__}: {e})') from None
  if label is None:
    label = root.name or str(root)
    if derived is not None:
      label += f' (batch {derived["derived"]["global_batch"]})'
  return Curves(workdir=str(workdir), label=label, series=series, derived=derived)


def _smooth(values: np.ndarray, weight: float) -> np.ndarray:
  """TensorBoard's exponential moving average, debiased at the start; NaN stays NaN."""
  if not weight:
    return values
  out, avg, n = np.empty_like(values), 0.0, 0
  for i, v in enumerate(values):
    if not math.isfinite(v):
      out[i] = v
      continue
    avg, n = avg * weight + (1 - weight) * v, n + 1
    out[i] = avg / (1 - weight ** n)
  return out


def _is_eval_loss(key: str) -> bool:
  return key.endswith('/loss') and not key.startswith('train/')


def _is_eval_accuracy(key: str) -> bool:
  # eval/top1 (classification), verify/<set>/accuracy (face verification); not their _std.
  return key.endswith(('/accuracy', '/top1')) and not key.startswith('train/')


# (panel title, y label, training metric names, which keys are evaluations, y scale)
_PANELS = (
    ('loss', 'loss', ('train/loss',), _is_eval_loss, 'log'),
    ('accuracy', 'accuracy (top-1)', ('train/accuracy',), _is_eval_accuracy, 'linear'),
    ('learning rate', 'learning rate', ('train/lr',), lambda key: False, 'linear'),
)


def plot(runs: Sequence[Curves], x: str, path: str, *, smooth: float = 0.0,
         title: str = '') -> None:
  """Writes one PNG to `path`: loss, accuracy and learning rate of every run against `x`
  (steps, epochs, examples or time), training values smoothed by an exponential moving average
  of weight `smooth` (the lr never), with `title` above the panels if given."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top

  if x not in X_AXES:
    raise PlotError(f'--x={x} is not one of {", ".join(X_AXES)}')
  panels = _PANELS
  fig = Figure(figsize=(5.0 * len(panels), 4.2), dpi=_DPI, layout='constrained')
  FigureCanvasAgg(fig)
  axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
  cmap = colormaps['tab10']
  drawn_eval = False
  for (name, ylabel, train_keys, is_eval, scale), ax in zip(panels, axes):
    positive = True
    for i, run in enumerate(runs):
      color = cmap(i % 10)
      for k in train_keys:
        if k in run.series:
          s = run.series[k]
          values = _smooth(s.values, smooth if k != 'train/lr' else 0.0)
          ax.plot(run.x_of(s.steps, x), values, color=color, lw=1.4, label=run.label)
          positive &= bool(np.all(values[np.isfinite(values)] > 0))
      evals = sorted(k for k in run.series if is_eval(k))
      for j, k in enumerate(evals):
        s = run.series[k]
        ax.plot(run.x_of(s.steps, x), s.values, color=color, lw=1.2, ls='--',
                marker='os^v'[j % 4], ms=4)
        positive &= bool(np.all(s.values[np.isfinite(s.values)] > 0))
        drawn_eval = True
    if not ax.lines:
      ax.text(0.5, 0.5, f'no {name} logged', ha='center', va='center',
              transform=ax.transAxes, color='0.4')
    elif scale == 'log' and positive:
      ax.set_yscale('log')
    ax.set_title(name)
    ax.set_xlabel(_X_LABELS[x])
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
  # One legend: the colours are the runs; the line styles say what is training and evaluation.
  handles = [Line2D([], [], color=cmap(i % 10), lw=1.4, label=r.label)
             for i, r in enumerate(runs)]
  handles.append(Line2D([], [], color='0.3', lw=1.4, label='train'))
  if drawn_eval:
    handles.append(Line2D([], [], color='0.3', lw=1.2, ls='--', marker='o', ms=4,
                          label='eval (' + ', '.join(_eval_names(runs)) + ')'))
  axes[-1].legend(handles=handles, fontsize=8, loc='best')
  if title:
    fig.suptitle(title)
  out = epath.Path(path)
  png = io.BytesIO()
  fig.savefig(png, format='png')
  with workdir_lib.storage(out.parent):
    out.parent.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_text(out, png.getvalue())  # whole: a full disk keeps the previous figure


def _eval_names(runs: Sequence[Curves]) -> list[str]:
  names = set()
  for _, _, _, is_eval, _ in _PANELS:
    for run in runs:
      names.update(k for k in run.series if is_eval(k))
  return sorted(names)


def main(argv: Sequence[str]) -> None:
  """The command line (module docstring): exit 1 for unreadable input, 5 for an unwritable
  figure."""
  workdirs = list(argv[1:])
  if not workdirs:
    raise app.UsageError('Give one or more workdirs: python -m bigbatch.plot WORKDIR ...')
  labels = _LABELS.value
  try:
    if labels and len(labels) != len(workdirs):
      raise PlotError(f'--labels has {len(labels)} names for {len(workdirs)} workdirs')
    bad = [x for x in _X.value if x not in X_AXES]
    if bad or not _X.value:
      raise PlotError(f'--x={",".join(_X.value)}: each must be one of {", ".join(X_AXES)}')
    runs = [read_run(w, labels[i] if labels else None) for i, w in enumerate(workdirs)]
    for x in _X.value:
      path = os.path.join(_OUT_DIR.value, f'metrics_vs_{x}.png')
      plot(runs, x, path, smooth=_SMOOTH.value, title=_TITLE.value)
      print(path)
  except PlotError as e:
    print(f'bigbatch.plot: error: {e}', file=sys.stderr)
    sys.exit(1)
  except workdir_lib.StorageError as e:  # the figure could not be written (full disk, ...)
    print(f'bigbatch.plot: storage error: {e}', file=sys.stderr)
    sys.exit(5)


if __name__ == '__main__':
  app.run(main)
