"""Where metrics go: TensorBoard event files, metrics.jsonl and a console progress line.

clu's writers handle TensorBoard; metrics.jsonl is ours because nothing in clu writes a
machine-readable log that a resumed run can truncate back to its checkpoint.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """One JSON object per write: {"step": s, "train/loss": ..., ...}.

  On resume from step s, lines past s (and a torn last line) are dropped, so each step is
  recorded once.
  """

  def __init__(self, path: str, resume_step: int = 0):
    self._path = path
    if os.path.exists(path):
      kept = []
      with open(path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            break  # a torn last line from a killed run
          if record.get('step', 0) <= resume_step:
            kept.append(line if line.endswith('\n') else line + '\n')
      with open(path, 'w') as f:
        f.writelines(kept)
    self._file = open(path, 'a')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {'step': int(step)}
    for k, v in scalars.items():
      v = float(v)
      record[k] = v if math.isfinite(v) else str(v)  # JSON has no NaN/inf
    self._file.write(json.dumps(record) + '\n')
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
    self._file.flush()

  def close(self):
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


def create_writer(workdir: str, *, is_main: bool, resume_step: int = 0):
  if not is_main:
    return _NullWriter()
  os.makedirs(workdir, exist_ok=True)
  return metric_writers.MultiWriter([
      metric_writers.SummaryWriter(os.path.join(workdir, 'tensorboard')),
      JsonlWriter(os.path.join(workdir, 'metrics.jsonl'), resume_step=resume_step),
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
