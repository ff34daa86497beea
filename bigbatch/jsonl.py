"""Reading a JSON-lines file (metrics.jsonl, a study's results.jsonl) with one policy for a
damaged line.

A damaged line (not UTF-8, not JSON, not an object, or without the row's integer key) costs that
line only: every reader skips it and gets its line number back, to warn or repair. A torn last
line (a kill in the middle of a write) is the common case; a damaged line in the middle (a
flipped byte, a partial write) is treated alike. The trainer's resume sets damaged lines aside
(bigbatch/metrics.py `cut_back`); the plotter and the study runner warn and go on.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from etils import epath


@dataclasses.dataclass
class Rows:
  """The good rows in file order with their 1-based line numbers, and the numbers of the damaged
  lines."""
  rows: list[dict[str, Any]]
  numbers: list[int]
  damaged: list[int]


# The key every row of a file holds, and its type: metrics.jsonl rows have an integer step, a
# study's results.jsonl rows a trial_id.
KEY_TYPES = {'step': int, 'trial_id': str}


def parse(line: str, key: str) -> dict[str, Any] | None:
  """The row of one line, or None if it is damaged (`key` missing or not of its type)."""
  try:
    row = json.loads(line)
  except (ValueError, UnicodeDecodeError):
    return None
  if not isinstance(row, dict):
    return None
  value = row.get(key)
  if isinstance(value, bool) or not isinstance(value, KEY_TYPES[key]):
    return None
  return row


def read(path: epath.PathLike, key: str = 'step') -> Rows:
  """The rows of the JSON-lines file at `path`. A bad byte damages its line only (decoded with
  replacement). Raises OSError (and FileNotFoundError) as reading the file does."""
  text = epath.Path(path).read_bytes().decode('utf-8', errors='replace')
  out = Rows([], [], [])
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    row = parse(line, key)
    if row is None:
      out.damaged.append(number)
    else:
      out.rows.append(row)
      out.numbers.append(number)
  return out


def describe_damage(path: epath.PathLike, damaged: list[int]) -> str:
  """'metrics.jsonl: 2 damaged line(s) skipped (2, 7)': the warning a reader logs."""
  shown = ', '.join(str(n) for n in damaged[:5]) + (', ...' if len(damaged) > 5 else '')
  return f'{path}: {len(damaged)} damaged line(s) skipped ({shown})'
