"""Where metrics go: TensorBoard event files, metrics.jsonl and a console progress line.

clu's writers handle TensorBoard; metrics.jsonl is ours because nothing in clu writes a
machine-readable log that a resumed run can truncate back to its checkpoint.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

from clu import metric_writers
from etils import epath

from bigbatch import workdir as workdir_lib


class JsonlWriter(metric_writers.MetricWriter):
  """One JSON object per write: {"step": s, "train/loss": ..., ...}.

  On resume from step s, lines past s (and a torn last line) are dropped, so each step is
  recorded once. Each write is durable when write_scalars returns.

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
    if self._path.exists():
      for line in self._path.read_text().splitlines(keepends=True):
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          break  # a torn last line from a killed run
        if record.get('step', 0) <= resume_step:
          kept.append(line if line.endswith('\n') else line + '\n')
      if not self._rewrite:
        with self._path.open('w') as f:
          f.writelines(kept)
    if self._rewrite:
      self._lines = kept
      self._write_all()
    else:
      self._file = self._path.open('a')

  def _write_all(self):
    with self._path.open('w') as f:
      f.write(''.join(self._lines))

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
      self._file.flush()

  def close(self):
    if not self._rewrite:
      self._file.close()


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


def create_writer(workdir: epath.PathLike, *, is_main: bool, resume_step: int = 0):
  """TensorBoard events in workdir/tensorboard (tf.summary writes gs:// itself) and
  workdir/metrics.jsonl, on process 0; a writer that drops everything elsewhere."""
  if not is_main:
    return _NullWriter()
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  return metric_writers.MultiWriter([
      metric_writers.SummaryWriter(str(path / 'tensorboard')),
      JsonlWriter(path / 'metrics.jsonl', resume_step=resume_step),
  ])


class Progress:
  """Rates and ETA between logged steps; the clock is passed in, so it is testable."""

  def __init__(self, *, total_steps: int, global_batch: int, start_step: int = 0,
               now: float | None = None):
    self.total_steps = total_steps
    self.global_batch = global_batch
    self._last_step = start_step
    self._last_time = now

  def rates(self, step: int, now: float) -> dict[str, float]:
    if self._last_time is None or step <= self._last_step:
      self._last_step, self._last_time = step, now
      return {}
    steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return {'train/steps_per_sec': steps_per_sec,
            'train/examples_per_sec': steps_per_sec * self.global_batch}

  def line(self, step: int, values: Mapping[str, float]) -> str:
    parts = [f'step {step}/{self.total_steps}']
    for key, fmt in (('train/loss', 'loss {:.4f}'), ('train/accuracy', 'acc {:.3f}'),
                     ('train/lr', 'lr {:.4g}'), ('train/steps_per_sec', '{:.2f} steps/s'),
                     ('train/examples_per_sec', '{:.0f} ex/s')):
      if key in values:
        parts.append(fmt.format(values[key]))
    rate = values.get('train/steps_per_sec')
    if rate:
      parts.append('ETA ' + _duration((self.total_steps - step) / rate))
    return ' | '.join(parts)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'
