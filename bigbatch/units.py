"""How durations are printed, in one format everywhere (progress lines, summaries, the study's
progress): `2m05s`, `1h02m03s`."""
from __future__ import annotations


def duration(seconds: float) -> str:
  """`seconds`, rounded to the second, as `1h02m03s` (or `2m05s` under an hour)."""
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'
