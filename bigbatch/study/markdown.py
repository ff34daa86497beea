"""Markdown pieces shared by the study reports (render_steps.py, render_epochs.py): number
formats, table cells, the target in words, the figures section, and writing report.md."""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

from bigbatch import workdir as workdir_lib

NOT_DRAWN = 'Figure not drawn:'  # the start of the line that replaces a missing figure


def number(x: float | None, kind: str = 'g') -> str:
  """`x` in a table: kind 'int' (thousands separated), 'wall' (seconds, one decimal) or 'g'."""
  if x is None:
    return '—'
  if math.isinf(x):
    return '∞'
  if kind == 'int':
    return f'{x:,.0f}' if abs(x) < 1e7 else f'{x:.3g}'
  if kind == 'wall':
    return f'{x:.1f}'
  return f'{x:.3g}'


def summary(s: dict | None, kind: str = 'g') -> str:
  """An aggregate.summarize() dict: the value alone, `mean [min, max]` or `mean ± std`."""
  if s is None:
    return '—'
  if s['kind'] == 'single':
    return number(s['mean'], kind)
  if s['kind'] == 'min-max':
    return f'{number(s["mean"], kind)} [{number(s["lo"], kind)}, {number(s["hi"], kind)}]'
  return f'{number(s["mean"], kind)} ± {number(s["std"], kind)}'


def cell(text: str) -> str:
  """`text` made safe for one table cell."""
  return str(text).replace('|', '\\|').replace('\n', ' ')


def metric_label(target: Mapping[str, Any] | None) -> str:
  """The target's metric for people: 'top-1 accuracy', 'eval/loss (nats)', or its name."""
  metric = (target or {}).get('metric') or 'final metric'
  if metric.endswith('top1'):
    return 'top-1 accuracy'
  if metric.endswith('loss'):
    return f'{metric} (nats)'
  return metric


def target_text(target: Mapping[str, Any] | None) -> str:
  """'eval/top1 ≥ 0.9', or 'not recorded'."""
  if not target:
    return 'not recorded'
  op = '≥' if target.get('mode', 'max') == 'max' else '≤'
  return f'{target.get("metric")} {op} {target.get("value")}'


def figures_section(figures: Sequence[tuple[str, str]], why_not: dict) -> list[str]:
  """The report's figure links ((stem, title) each), or why a figure was not drawn."""
  md = ['## Figures', '']
  for stem, fig_title in figures:
    md += [f'### {fig_title}', '']
    if why_not[stem]:
      md += [f'_{NOT_DRAWN} {why_not[stem]}_', '']
    else:
      md += [f'![{fig_title}](figures/{stem}.png)', '']
  return md


def write(workdir: str, md: Sequence[str]) -> str:
  """Writes the lines `md` to workdir/report.md, whole (StorageError when it cannot be
  written); returns its path."""
  path = os.path.join(workdir, 'report.md')
  workdir_lib.write_text(path, '\n'.join(md))
  return path
