"""Writes benchmark results into docs/performance.md, one marked section per benchmark, each
stamped with the machine and library versions it was measured on."""
from __future__ import annotations

import datetime
import os
import platform
import re
from typing import Sequence

PATH = os.path.join(os.path.dirname(__file__), '..', 'docs', 'performance.md')
HEADER = ('# Performance\n\nWritten by the scripts in `benchmarks/`; each section says how it '
          'was measured. Ratios are measured within one run, so they hold on a noisy machine.\n')


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def machine() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
          f'{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}); '
          f'jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}; '
          f'{datetime.date.today().isoformat()}')


def update_section(key: str, title: str, body: str) -> None:
  """Replaces (or appends) the section marked `key` in docs/performance.md."""
  text = open(PATH).read() if os.path.exists(PATH) else HEADER
  section = (f'<!-- {key} -->\n## {title}\n\nMachine: {machine()}\n\n{body.strip()}\n'
             f'<!-- /{key} -->')
  pattern = re.compile(rf'<!-- {re.escape(key)} -->.*?<!-- /{re.escape(key)} -->', re.S)
  text = pattern.sub(lambda _: section, text) if pattern.search(text) else (
      text.rstrip() + '\n\n' + section + '\n')
  os.makedirs(os.path.dirname(PATH), exist_ok=True)
  with open(PATH, 'w') as f:
    f.write(text)
