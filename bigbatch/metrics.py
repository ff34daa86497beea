"""Where metrics go: TensorBoard event files, metrics.jsonl and a console progress line.

clu's writers handle TensorBoard; metrics.jsonl is ours because nothing in clu writes a
machine-readable log that a resumed run can truncate back to its checkpoint.
"""
from __future__ import annotations

import collections
import json
import math
import shlex
import statistics
import time
from typing import Any, Callable, Mapping

from absl import logging
from clu import metric_writers
from etils import epath

from bigbatch import jsonl
from bigbatch import units
from bigbatch import workdir as workdir_lib


class JsonlWriter(metric_writers.MetricWriter):
  """One JSON object per write: {"step": s, "train/loss": ..., ...}.

  On resume from step s, rows of steps past s are dropped, so each step is recorded once; every
  row up to s is kept, whatever lies around it (see `cut_back`). Each write is durable when
  write_scalars returns.

  `path` may be local or on an object store (gs://...). Locally the file is appended to and
  flushed per line. An object store has no append, so there the lines since the file was opened
  (those kept from before, then this run's) are held in memory and the whole object is rewritten
  at each write. Rewriting rather than numbered part files keeps one metrics.jsonl for every
  reader and the same resume truncation; each rewrite replaces the object whole, so a reader never
  sees a torn line. It costs a re-upload of the file per logged step: one line of a few hundred
  bytes per log_every_steps, so well under a few MB even for long runs.
  """

  def __init__(self, path: epath.PathLike, resume_step: int = 0):
    self._path = epath.Path(path)
    self._rewrite = workdir_lib.is_object_store(path)
    kept = []
    if workdir_lib.exists(self._path):
      with workdir_lib.storage(self._path):
        kept = cut_back(self._path, resume_step)
      if not self._rewrite:  # replaced whole: a full disk here leaves the old file as it was
        workdir_lib.write_text(self._path, ''.join(kept))
    if self._rewrite:
      self._lines = kept
      self._write_all()
    else:
      with workdir_lib.storage(self._path):
        self._file = self._path.open('a')

  def _write_all(self):
    workdir_lib.write_text(self._path, ''.join(self._lines))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {'step': int(step)}
    for k, v in scalars.items():
      v = float(v)
      record[k] = v if math.isfinite(v) else str(v)  # JSON has no NaN/inf
    line = json.dumps(record) + '\n'
    if self._rewrite:
      self._lines.append(line)
      self._write_all()
    else:
      # A full disk: StorageError (exit 5); the rows before are intact, and a torn last line is
      # set aside by the resume (`cut_back`).
      with workdir_lib.storage(self._path):
        self._file.write(line)
        self._file.flush()

  # metrics.jsonl holds scalars only; images, histograms etc. go to TensorBoard alone.
  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    if not self._rewrite:  # an object store's object is complete after each write
      with workdir_lib.storage(self._path):
        self._file.flush()

  def close(self):
    if not self._rewrite:
      with workdir_lib.storage(self._path):
        self._file.close()


def _row_step(line: str) -> int | None:
  """The step of a metrics.jsonl line, or None if the line is damaged (jsonl's policy)."""
  row = jsonl.parse(line, 'step')
  return None if row is None else row['step']


def cut_back(path: epath.PathLike, resume_step: int) -> list[str]:
  """The lines of metrics.jsonl to keep when resuming from the checkpoint of `resume_step`:
  every row whose step is at most `resume_step`, in file order, by step number, not by position,
  so a damaged line anywhere (a torn last line after a kill, a flipped byte, a partial write in
  the middle) costs that line only. Damaged lines are saved beside the file in
  metrics.jsonl.damaged-<time> rather than lost; what was repaired is logged as a warning."""
  path = epath.Path(path)
  kept, damaged, later = [], [], 0
  text = path.read_bytes().decode('utf-8', errors='replace')  # a bad byte damages one line
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    step = _row_step(line)
    if step is None:
      damaged.append((number, line))
    elif step <= resume_step:
      kept.append(line + '\n')
    else:
      later += 1
  if damaged:
    aside = path.with_name(f'{path.name}.damaged-{time.strftime("%Y%m%d-%H%M%S")}')
    aside.write_text(''.join(f'{line}\n' for _, line in damaged))
    numbers = ', '.join(str(n) for n, _ in damaged[:10]) + (' ...' if len(damaged) > 10 else '')
    logging.warning('%s: %d damaged line(s) (line %s) set aside in %s; the %d row(s) of steps '
                    'up to %d around them are kept.', path, len(damaged), numbers, aside.name,
                    len(kept), resume_step)
  if later:
    logging.warning('%s: dropped %d row(s) of steps after %d, the checkpoint resumed from; the '
                    'run writes them again.', path, later, resume_step)
  return kept


class _NullWriter(JsonlWriter):
  """Processes other than 0 write nothing."""

  def __init__(self):  # pylint: disable=super-init-not-called
    pass

  def write_scalars(self, step, scalars):
    pass

  def flush(self):
    pass

  def close(self):
    pass


class _Guarded(metric_writers.MetricWriter):
  """A writer whose storage failures (TensorFlow's ResourceExhaustedError on a full disk, an
  OSError) become workdir.StorageError naming `path`, from its creation on."""

  def __init__(self, path: epath.PathLike, make: Callable[[], metric_writers.MetricWriter]):
    self._path = path
    with workdir_lib.storage(path):
      self._writer = make()

  def _call(self, name, *args, **kwargs):
    with workdir_lib.storage(self._path):
      return getattr(self._writer, name)(*args, **kwargs)

  def write_summaries(self, step, values, metadata=None):
    self._call('write_summaries', step, values, metadata)

  def write_scalars(self, step, scalars):
    self._call('write_scalars', step, scalars)

  def write_images(self, step, images):
    self._call('write_images', step, images)

  def write_videos(self, step, videos):
    self._call('write_videos', step, videos)

  def write_audios(self, step, audios, *, sample_rate):
    self._call('write_audios', step, audios, sample_rate=sample_rate)

  def write_texts(self, step, texts):
    self._call('write_texts', step, texts)

  def write_histograms(self, step, arrays, num_buckets=None):
    self._call('write_histograms', step, arrays, num_buckets)

  def write_hparams(self, hparams):
    self._call('write_hparams', hparams)

  def flush(self):
    self._call('flush')

  def close(self):
    self._call('close')


def create_writer(workdir: epath.PathLike, *, is_main: bool, resume_step: int = 0):
  """TensorBoard events in workdir/tensorboard (tf.summary writes gs:// itself) and
  workdir/metrics.jsonl, on process 0; a writer that drops everything elsewhere. A file that
  cannot be written raises workdir.StorageError (bigbatch/main.py: exit 5)."""
  if not is_main:
    return _NullWriter()
  path = epath.Path(workdir)
  with workdir_lib.storage(path):
    path.mkdir(parents=True, exist_ok=True)
  tensorboard = path / 'tensorboard'
  return metric_writers.MultiWriter([
      _Guarded(tensorboard, lambda: metric_writers.SummaryWriter(str(tensorboard))),
      JsonlWriter(path / 'metrics.jsonl', resume_step=resume_step),
  ])


class Progress:
  """Rates between logged steps, and the progress line; the clock is passed in, so it is
  testable.

  The ETA is (steps left) / (the median step rate of the last few log intervals), and the
  interval that holds the step function's compilation is left out of it: the first ETA of a run
  is not minutes too long, and one interval slowed by an evaluation or a checkpoint does not make
  it jump. `restart_clock` (the Log hook calls it once the first update was dispatched, i.e.
  compiled) moves the interval's start past the compilation.
  """

  RECENT = 8  # log intervals the ETA's median rate is taken over

  def __init__(self, *, total_steps: int, global_batch: int, start_step: int = 0,
               now: float | None = None, epoch_of: Callable[[int], float] | None = None):
    self.total_steps = total_steps
    self.global_batch = global_batch
    self.epoch_of = epoch_of
    self._last_step = start_step
    self._last_time = now
    self._recent: collections.deque[float] = collections.deque(maxlen=self.RECENT)

  def restart_clock(self, step: int, now: float) -> None:
    """Starts the next interval at (`step`, `now`)."""
    self._last_step, self._last_time = step, now

  def rates(self, step: int, now: float) -> dict[str, float]:
    """train/steps_per_sec and train/examples_per_sec since the last call ({} on the first)."""
    if self._last_time is None or step <= self._last_step:
      self._last_step, self._last_time = step, now
      return {}
    steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    self._recent.append(steps_per_sec)
    return {'train/steps_per_sec': steps_per_sec,
            'train/examples_per_sec': steps_per_sec * self.global_batch}

  def eta_seconds(self, step: int) -> float | None:
    """Seconds left at the recent median step rate, or None before the first rate."""
    if not self._recent:
      return None
    return (self.total_steps - step) / statistics.median(self._recent)

  def line(self, step: int, values: Mapping[str, float]) -> str:
    """The console progress line of `step`: epoch, loss, accuracy, lr, examples/s, ETA."""
    parts = [f'step {step}/{self.total_steps}' + (
        f' (epoch {self.epoch_of(step):.1f})' if self.epoch_of else '')]
    for key, fmt in (('train/loss', 'loss {:.4f}'), ('train/accuracy', 'acc {:.3f}'),
                     ('train/lr', 'lr {:.4g}'), ('train/examples_per_sec', '{:,.0f} ex/s')):
      if key in values:
        parts.append(fmt.format(values[key]))
    eta = self.eta_seconds(step)
    if eta is not None:
      parts.append('ETA ' + units.duration(eta))
    return ' | '.join(parts)


# Evaluation values that are counts, not metrics (no "best"; printed as integers).
COUNTS = ('examples', 'pairs')


def _lower_is_better(key: str) -> bool:
  return 'loss' in key or 'error' in key or 'eer' in key.split('/')[-1]


def read_rows(path: epath.PathLike) -> list[dict[str, Any]]:
  """metrics.jsonl's rows in file order; damaged lines are skipped (bigbatch/jsonl.py; the
  resume sets them aside)."""
  return jsonl.read(path, 'step').rows


def summary(workdir: str, final: Mapping[str, float], seconds: float) -> str:
  """The table a finished run prints: each evaluation metric's final value and its best (with
  the step), the last training loss, the wall time, and where the files are. Higher is better
  but for losses and error rates; counts (eval/examples) are left out."""
  root = epath.Path(workdir)
  rows = []
  if (root / 'metrics.jsonl').exists():
    try:
      rows = read_rows(root / 'metrics.jsonl')
    except OSError:  # the summary is a courtesy: the run itself has succeeded
      rows = []
  best: dict[str, tuple[float, int]] = {}
  last_train: dict[str, float] = {}
  for row in rows:
    for k, v in row.items():
      if not isinstance(v, (int, float)) or k == 'step':
        continue
      if k.startswith('train/'):
        last_train[k] = v
      elif k in final:
        lower = _lower_is_better(k)
        if k not in best or (v < best[k][0] if lower else v > best[k][0]):
          best[k] = (v, row['step'])
  keys = [k for k in final if k.rsplit('/', 1)[-1] not in COUNTS]
  table = [('metric', 'final', 'best (step)')]
  for k in keys:
    b = None if k.endswith('_std') else best.get(k)  # a spread over folds has no "best"
    table.append((k, f'{final[k]:.4f}', f'{b[0]:.4f} ({b[1]})' if b else '-'))
  for k in ('train/loss', 'train/accuracy'):
    if k in last_train:
      table.append((k, f'{last_train[k]:.4f}', '-'))
  widths = [max(len(r[i]) for r in table) for i in range(3)]
  lines = [f'Finished in {units.duration(seconds)}.' + (
      f' {int(final["eval/examples"]):,} held-out examples.' if 'eval/examples' in final else '')]
  lines += ['  ' + '  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
  present = [name for name in ('metrics.jsonl', 'tensorboard', 'checkpoints', 'derived.json')
             if (root / name).exists()]
  lines.append(f'Files in {workdir}: {", ".join(present) or "none"}.')
  if 'metrics.jsonl' in present:
    lines.append(f'Plot: python -m bigbatch.plot {shlex.quote(str(workdir))}')
  return '\n'.join(lines)
