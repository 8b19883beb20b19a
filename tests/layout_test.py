"""The layering the folders draw (DESIGN.md): modes at the edge, one reader of the config, shallow
imports, and a train step that needs neither clu nor TensorFlow.

The import graph is read from the source (every `import` of a jax_ddpm module, those inside
functions included, those under `if TYPE_CHECKING:` left out: annotations only).
"""

import ast
import functools
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "jax_ddpm")
MAX_CHAIN = 6


def module_name(path: str) -> str:
  relative = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
  return relative[: -len(".__init__")] if relative.endswith(".__init__") else relative


def modules() -> dict[str, str]:
  """{module name: file} of every module of the package."""
  found = {}
  for folder, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith(".py"):
        found[module_name(os.path.join(folder, name))] = os.path.join(folder, name)
  return found


def _type_checking_only(node) -> bool:
  return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(path: str) -> set[str]:
  """Every module name an import statement of `path` names, outside TYPE_CHECKING blocks."""
  names = set()

  def visit(node):
    if _type_checking_only(node):
      return
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
    for child in ast.iter_child_nodes(node):
      visit(child)

  with open(path) as f:
    visit(ast.parse(f.read()))
  return names


@functools.cache
def import_graph() -> dict[str, frozenset[str]]:
  """{module: the jax_ddpm modules it imports}: `from a import b` names the submodule a.b where
  there is one, else the package a."""
  known = modules()
  graph = {}
  for name, path in known.items():
    targets = set()
    for imported in imported_names(path):
      if imported in known:
        targets.add(imported)
    # `from a import b` added both a and a.b; keep a only where b is not a submodule of it.
    targets -= {
      t
      for t in targets
      if any(o.startswith(t + ".") for o in targets) and t not in _packages_imported_directly(path)
    }
    graph[name] = frozenset(targets - {name})
  return graph


def _packages_imported_directly(path: str) -> set[str]:
  """Packages an import takes a non-module name from (`from jax_ddpm.samplers import X`)."""
  known = modules()
  packages = set()
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.ImportFrom)
      and node.module in known
      and any(f"{node.module}.{alias.name}" not in known for alias in node.names)
    ):
      packages.add(node.module)
  return packages


def longest_chain() -> list[str]:
  """The longest import path through the package; fails on a cycle."""
  graph = import_graph()

  @functools.cache
  def deepest(name: str, visiting: frozenset = frozenset()) -> tuple[str, ...]:
    assert name not in visiting, f"import cycle through {name}"
    below = [deepest(target, visiting | {name}) for target in graph[name]]
    return (name, *max(below, key=len, default=()))

  return list(max((deepest(name) for name in graph), key=len))


def test_nothing_outside_the_command_line_imports_it():
  importers = sorted(name for name, targets in import_graph().items() if "jax_ddpm.cli" in targets)
  assert importers == [], importers


def test_only_config_and_the_command_line_read_a_config_dict():
  readers = sorted(
    name
    for name, path in modules().items()
    if any(n == "ml_collections" or n.startswith("ml_collections.") for n in imported_names(path))
  )
  print("modules importing ml_collections:", readers)
  assert set(readers) <= {"jax_ddpm.config.run_config", "jax_ddpm.cli"}, readers
  for name, path in modules().items():
    with open(path) as f:
      source = f.read()
    if not name.startswith(("jax_ddpm.config", "jax_ddpm.cli")):
      assert "copy_and_resolve_references" not in source and ".to_dict()" not in source, name


def test_the_longest_import_chain_is_at_most_six_modules():
  chain = longest_chain()
  print(f"longest import chain ({len(chain)} modules):", " -> ".join(chain))
  assert len(chain) <= MAX_CHAIN, chain


@pytest.mark.parametrize(
  "module", ["jax_ddpm.training.step", "jax_ddpm.samplers.program", "jax_ddpm"]
)
def test_the_train_step_and_the_samplers_import_neither_clu_nor_tensorflow(module):
  program = (
    f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
  )
  loaded = subprocess.run(
    [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.split()
  assert "clu" not in loaded and "tensorflow" not in loaded, loaded
