"""Reading compiled HLO text: computations, the call graph, how often each computation runs, and
the all-reduces with their operand shapes.

Computation by computation (never by counting matches in the whole text), with while
trip counts: XLA annotates a while whose trip count it knows with
`backend_config={"known_trip_count":{"n":"K"}}`; a computation reached through a while body runs
K times per execution of the while, and nested loops multiply.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_NUMPY_NAMES = {'bool': 'pred', 'int8': 's8', 'uint8': 'u8', 'int16': 's16', 'uint16': 'u16',
                'float16': 'f16', 'bfloat16': 'bf16', 'int32': 's32', 'uint32': 'u32',
                'float32': 'f32', 'int64': 's64', 'uint64': 'u64', 'float64': 'f64',
                'complex64': 'c64', 'complex128': 'c128'}
_CALLEE = re.compile(r'\b(to_apply|body|condition|calls|branch_computations)='
                     r'(\{[^}]*\}|%?[\w.\-]+)')


def dtype_name(dtype) -> str:
  """HLO's name of a numpy/JAX dtype: float32 -> 'f32'."""
  return _NUMPY_NAMES[str(dtype)]


def dtype_bytes(name: str) -> int:
  """Bytes per element of an HLO type name: 'f32' -> 4."""
  return _DTYPE_BYTES[name]


def computations(text: str) -> dict[str, str]:
  """{name: body text} for each computation of an HLO module's text; the entry is under its name
  and also recorded in `entry_name`."""
  comps, name, lines = {}, None, []
  for line in text.splitlines():
    header = re.match(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if header and not line.startswith(' '):
      name, lines = header.group(1), []
      continue
    if line.startswith('}') and name is not None:
      comps[name] = '\n'.join(lines)
      name = None
      continue
    if name is not None:
      lines.append(line)
  return comps


def entry_name(text: str) -> str:
  """The name of the module's ENTRY computation; ValueError if the text has none."""
  m = re.search(r'^ENTRY\s+%?([\w.\-]+)', text, re.M)
  if not m:
    raise ValueError('no ENTRY computation in the HLO text')
  return m.group(1)


def _callees(line: str) -> list[tuple[str, str]]:
  """[(kind, computation)] called by one instruction line."""
  out = []
  for kind, names in _CALLEE.findall(line):
    for n in names.strip('{}').split(','):
      if n.strip():
        out.append((kind, n.strip().lstrip('%')))
  return out


def trip_count(line: str) -> int | None:
  """The trip count XLA annotated on a while instruction's line, or None if unknown."""
  m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?', line)
  return int(m.group(1)) if m else None


def while_bodies(comps: dict[str, str]) -> list[tuple[str, int | None]]:
  """[(body computation, known trip count or None)] of every while instruction."""
  out = []
  for body in comps.values():
    for line in body.splitlines():
      if re.search(r'\bwhile\(', line):
        m = re.search(r'body=%?([\w.\-]+)', line)
        if m:
          out.append((m.group(1), trip_count(line)))
  return out


def reachable(comps: dict[str, str], roots) -> set[str]:
  """The computations called, directly or not, from `roots` (roots included)."""
  seen, todo = set(), list(roots)
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    todo += [n for line in comps[c].splitlines() for _, n in _callees(line)]
  return seen


def executions(comps: dict[str, str], entry: str, default_trip: int | None = None
               ) -> dict[str, int]:
  """How many times each computation runs per execution of `entry`: a while body runs its known
  trip count (or `default_trip` where XLA did not annotate one) times per while execution, nested
  loops multiply, everything else runs once per caller execution. Reductions' `to_apply`
  computations are not counted as executions (they are the combiner, not a run)."""
  counts: dict[str, int] = collections.defaultdict(int)

  def visit(name: str, times: int, stack: tuple[str, ...]):
    if name not in comps or name in stack:
      return
    counts[name] += times
    for line in comps[name].splitlines():
      is_while = re.search(r'\bwhile\(', line) is not None
      trips = trip_count(line) if is_while else None
      if is_while and trips is None:
        if default_trip is None:
          raise ValueError(f'while loop without a known trip count in {name}: {line.strip()}')
        trips = default_trip
      for kind, callee in _callees(line):
        if kind == 'to_apply' and not re.search(r'\b(call|map)\(', line):
          continue
        mult = trips if (is_while and kind == 'body') else (trips + 1 if is_while else 1)
        visit(callee, times * mult, stack + (name,))

  visit(entry, 1, ())
  return dict(counts)


@dataclasses.dataclass(frozen=True)
class AllReduce:
  """One all-reduce: the computation it sits in and the (dtype, shape) of each operand."""
  computation: str
  operands: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) of each result element

  @property
  def bytes(self) -> int:
    """Bytes reduced by one execution: the sum over its operands."""
    return sum(_DTYPE_BYTES[d] * math.prod(s) for d, s in self.operands)


def _shapes(result_text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
  out = []
  for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', result_text):
    if dtype in _DTYPE_BYTES:
      out.append((dtype, tuple(int(d) for d in dims.split(',') if d)))
  return tuple(out)


def all_reduces(comps: dict[str, str]) -> list[AllReduce]:
  """Every all-reduce (or all-reduce-start of an async pair) with its result shapes."""
  out = []
  for name, body in comps.items():
    for line in body.splitlines():
      if re.search(r'\ball-reduce(-start)?\(', line):
        result = line.split('=', 1)[1].split('all-reduce')[0]
        out.append(AllReduce(name, _shapes(result)))
  return out
