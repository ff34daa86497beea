"""The package's organisation as properties: module-level imports form a tree (no cycle), no
module reaches into another's private names, and every config field has one owner."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import ml_collections
import pytest

from bigbatch import config_lib
from bigbatch import fields

ROOT = os.path.join(os.path.dirname(__file__), '..', 'bigbatch')


def _modules() -> dict[str, ast.Module]:
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, '.')
        name = rel[:-len('.__init__')] if rel.endswith('.__init__') else rel
        with open(path) as fh:
          out[name] = ast.parse(fh.read(), path)
  return out


def _imports(tree: ast.Module, top_level_only: bool):
  """(module, imported names) of `from bigbatch... import ...` / `import bigbatch...`."""
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  for node in nodes:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('bigbatch'):
      yield node.module, [a.name for a in node.names]
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith('bigbatch'):
          yield a.name, []


def _edges(modules) -> dict[str, set[str]]:
  graph = {name: set() for name in modules}
  for name, tree in modules.items():
    for target, names in _imports(tree, top_level_only=True):
      for n in names or [None]:
        sub = f'{target}.{n}' if n else target
        dest = sub if sub in modules else target
        graph[name].add(dest)
        # Importing a submodule runs its packages' __init__ first (a package's own modules
        # import their siblings while it initializes, which Python allows).
        parts = dest.split('.')
        graph[name].update(p for p in ('.'.join(parts[:i]) for i in range(2, len(parts)))
                           if not name.startswith(p + '.'))
  return graph


def test_module_level_imports_have_no_cycle():
  graph = _edges(_modules())
  state = {}

  def visit(node, path):
    state[node] = 'open'
    for nxt in graph.get(node, ()):
      if nxt == node or nxt not in graph:
        continue
      if state.get(nxt) == 'open':
        cycle = path[path.index(nxt):] + [nxt]
        pytest.fail('import cycle: ' + ' -> '.join(cycle))
      if nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = 'done'

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])


def test_no_private_name_is_imported_across_modules():
  offenders = [f'{name}: from {target} import {n}'
               for name, tree in _modules().items()
               for target, names in _imports(tree, top_level_only=False)
               for n in names if n.startswith('_') and n != '__version__']
  assert not offenders, offenders


def test_every_config_field_has_one_owner():
  c = ml_collections.ConfigDict({'a': 1})
  fields.merge(c, {'b.c': 2}, 'first')
  assert c.b.c == 2
  with pytest.raises(ValueError, match=r"'b.c' of second is already defined"):
    fields.merge(c, {'b.c': 3}, 'second')
  config_lib.base_config()  # the modules' defaults merge without a clash


def test_non_finite_numbers_are_refused_by_name():
  c = config_lib.base_config()
  c.num_steps = 10
  for path, value in (('lr.base_lr', float('inf')), ('optimizer.weight_decay', float('nan')),
                      ('label_smoothing', float('nan')), ('model.bn_momentum', float('inf'))):
    bad = ml_collections.ConfigDict(c.to_dict())
    config_lib.override(bad, **{path: value})
    with pytest.raises(fields.ConfigError, match=rf'config\.{path}='):
      config_lib.validate(bad, 8)


# The layers, top down. The research layer (bigbatch.study) and the experiment config and entry
# point above the core may import the core; the core imports neither.
TOP = ('bigbatch.main', 'bigbatch.advise', 'bigbatch.config_lib', 'bigbatch.console')


def _in(name: str, package: str) -> bool:
  return name == package or name.startswith(package + '.')


def _is_core(name: str) -> bool:
  return not _in(name, 'bigbatch.study') and name not in TOP


def test_the_core_imports_nothing_from_the_study_or_the_entry_point():
  offenders = [f'{name} imports {sub}'
               for name, tree in _modules().items() if _is_core(name)
               for target, names in _imports(tree, top_level_only=False)
               for sub in ([f'{target}.{n}' for n in names] or [target])
               if not _is_core(target) or not _is_core(sub)]
  assert not offenders, offenders


def test_importing_the_core_loads_no_study_module():
  # The static test above, checked on the running interpreter: every core module imported, and
  # not one module of bigbatch.study or the entry point loaded by any of them.
  core = sorted(name for name in _modules() if _is_core(name) and name != 'bigbatch.__main__')
  code = ('import importlib, sys\n'
          f'for name in {core!r}:\n'
          '  importlib.import_module(name)\n'
          'print(sorted(m for m in sys.modules if m.startswith("bigbatch.study") or m in '
          f'{TOP!r}))\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.stdout.strip().splitlines()[-1] == '[]', out.stdout + out.stderr


def test_no_module_is_over_500_lines():
  long = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        with open(os.path.join(dirpath, f)) as fh:
          n = len(fh.read().splitlines())
        if n > 500:
          long[os.path.relpath(os.path.join(dirpath, f), ROOT)] = n
  assert not long, long
