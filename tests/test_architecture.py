"""The package's shape: no import cycles, no lazy imports, short modules, the README's layout
table is the tree and its order is the import order, and the schema is the base config."""

import ast
import os
import re

import ml_collections
import pytest

from experiments import isbi
from unet_jax.config import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'unet_jax')
MAX_LINES = 500


def _modules() -> dict[str, str]:
  """Dotted module name → file, for every module of the package."""
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        found[dotted.removesuffix('.__init__')] = path
  return found


def _imports(path: str, modules: dict[str, str]) -> list[tuple[str, bool]]:
  """(imported package module, at module level?) for every import of a unet_jax module."""
  tree = ast.parse(open(path, encoding='utf-8').read())
  top_level = {id(node) for node in tree.body}
  result = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('unet_jax'):
      # `from unet_jax.x import y` imports the module unet_jax.x.y when y is one.
      names = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules else node.module
               for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names if a.name.startswith('unet_jax')]
    result += [(name, id(node) in top_level) for name in names]
  return result


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    graph[name] = {target for target, _ in _imports(path, modules)
                   if target in modules and target != name and not name.startswith(target + '.')
                   and target != 'unet_jax'}
  return graph


def test_the_package_has_no_import_cycle():
  graph = _graph()
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  cycles = []

  def visit(node, path):
    state[node] = 1
    for target in sorted(graph[node]):
      if state.get(target) == 1:
        cycles.append(path[path.index(target):] + [target])
      elif target not in state:
        visit(target, path + [target])
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycles, 'import cycles: ' + '; '.join(' → '.join(c) for c in cycles)


def test_a_cycle_is_found_by_the_walk(tmp_path):
  """The walk above sees a cycle when there is one (a check of the check)."""
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}}
  state, seen = {}, []

  def visit(node, path):
    state[node] = 1
    for target in sorted(graph[node]):
      if state.get(target) == 1:
        seen.append(path)
      elif target not in state:
        visit(target, path + [target])
    state[node] = 2

  visit('a', ['a'])
  assert seen == [['a', 'b', 'c']]


def test_the_package_imports_its_own_modules_at_module_level():
  """A lazy import of a package module inside a function is how a cycle hides."""
  modules = _modules()
  lazy = [f'{os.path.relpath(path, ROOT)} imports {target}'
          for name, path in modules.items()
          for target, top in _imports(path, modules) if not top]
  assert not lazy, lazy


@pytest.mark.parametrize('folder', ['unet_jax', 'benchmarks', 'experiments', 'data'])
def test_no_module_is_longer_than_500_lines(folder):
  long = []
  for parent, _, files in os.walk(os.path.join(ROOT, folder)):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(parent, name)
        count = sum(1 for _ in open(path, encoding='utf-8'))
        if count > MAX_LINES:
          long.append(f'{os.path.relpath(path, ROOT)}: {count}')
  assert not long, long


def _layout_table() -> list[tuple[str, list[str]]]:
  """(README path, the .py names its description lists) of the package rows, in order."""
  readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
  block = readme.split('## Layout', 1)[1].split('```', 2)[1]
  rows: list[tuple[str, list[str]]] = []
  for line in block.splitlines():
    match = re.match(r'^(unet_jax/\S*)\s+(.*)$', line)
    if match:
      rows.append((match.group(1), re.findall(r'(\w+\.py)', match.group(2))))
    elif rows and line.startswith(' '):
      rows[-1][1].extend(re.findall(r'(\w+\.py)', line))
  return rows


def test_the_readme_layout_table_is_the_tree():
  rows = _layout_table()
  listed = set()
  for path, files in rows:
    if path.endswith('/'):
      assert os.path.isdir(os.path.join(ROOT, path)), f'README lists {path}, which is no folder'
      on_disk = {n for n in os.listdir(os.path.join(ROOT, path))
                 if n.endswith('.py') and n != '__init__.py'}
      assert set(files) == on_disk, f'README row {path}: lists {sorted(files)}, the folder ' \
                                    f'holds {sorted(on_disk)}'
      listed |= {path + f for f in files}
    else:
      assert os.path.isfile(os.path.join(ROOT, path)), f'README lists {path}, which is no file'
      listed.add(path)
  on_disk = {os.path.relpath(p, ROOT) for p in _modules().values()
             if not p.endswith('__init__.py')}
  assert on_disk == listed, (f'missing from the README: {sorted(on_disk - listed)}; '
                             f'listed but absent: {sorted(listed - on_disk)}')


def test_imports_point_down_the_readme_layout():
  """The table's order is a layering: a module imports only rows below its own (or its own)."""
  rank = {}
  for index, (path, _) in enumerate(_layout_table()):
    rank[path.removesuffix('/').removesuffix('.py').replace('/', '.')] = index

  def row(module):
    while module not in rank:
      module = module.rpartition('.')[0]
    return module

  upward = [f'{name} → {target}' for name, targets in _graph().items() for target in targets
            if rank[row(target)] < rank[row(name)]]
  assert not upward, upward


def _leaves(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, object]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and key not in ('terms', 'options'):
      out.update(_leaves(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


@pytest.mark.parametrize('arg', ['', 'cpu'])
def test_the_schema_and_the_base_config_name_the_same_fields(arg):
  """experiments/isbi.py is the base config: every field it sets is typed by the schema, and
  every typed field is set, so the two cannot drift apart."""
  fields = _leaves(isbi.get_config(arg))
  # Option groups of one source or model variant, passed through as keyword arguments.
  passthrough = ('data.procedural.', 'data.tfds.', 'model.unetr.', 'model.unet_plus_plus.',
                 'model.attention_unet.', 'model.res_unet.', 'model.multires_unet.',
                 'data.weight_map.class_weights')
  typed = set(schema.FIELD_TYPES) | {'model.remat', 'model.conv_impl'}
  untyped = sorted(f for f in fields if f not in typed and not f.startswith(passthrough))
  assert not untyped, f'fields of experiments/isbi.py the schema does not type: {untyped}'
  unset = sorted(set(schema.FIELD_TYPES) - set(fields))
  assert not unset, f'fields the schema types that experiments/isbi.py does not set: {unset}'
  for path, (kind, test) in schema.FIELD_TYPES.items():
    assert test(schema.get(isbi.get_config(arg), path)), f'{path} is not {kind}'
