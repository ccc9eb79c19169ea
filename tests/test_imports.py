"""Imports run one way: no cycles (imports inside functions count), the layers keep their
direction, leaves stay leaves, and each module imports on its own in a fresh interpreter
(so no module depends on another having been imported first)."""

import ast
import concurrent.futures
import os
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import REPO

PACKAGE = "medbench_jax"
# Modules that everything may import, and that import nothing of the package (at most the
# leaves named beside them).
LEAVES = {
    "medbench_jax.paths": set(),
    "medbench_jax.pixel_stats": set(),
    "medbench_jax.models.registry": {"medbench_jax.pixel_stats"},
    "medbench_jax.data.prepare.registry": set(),
    # Listing the data sets' licences (`prepare --list`) loads no builder, TFDS or OpenCV.
    "medbench_jax.data.prepare.licences": {"medbench_jax.data.prepare.registry"},
    "medbench_jax.study.slots": set(),
    "medbench_jax.tasks.calibration": set(),
    "medbench_jax.tasks.surface": set(),
    # `normalization()` reads a model's pretrained config from the model registry.
    "medbench_jax.config_lib": {"medbench_jax.pixel_stats", "medbench_jax.models"},
}
# Lower layers never import these (the arrows of docs/architecture.md: entry points -> trainer
# -> tasks -> models / weights / data; data never imports models or the trainer; models never
# data).
FORBIDDEN = {
    "medbench_jax.data": ("medbench_jax.models", "medbench_jax.trainer", "medbench_jax.tasks",
                          "medbench_jax.study"),
    "medbench_jax.models": ("medbench_jax.data", "medbench_jax.trainer", "medbench_jax.tasks",
                            "medbench_jax.study"),
    "medbench_jax.weights": ("medbench_jax.data", "medbench_jax.trainer", "medbench_jax.tasks",
                             "medbench_jax.study"),
    "medbench_jax.tasks": ("medbench_jax.trainer", "medbench_jax.study"),
    "medbench_jax.trainer": ("medbench_jax.study",),
}


def modules_of(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every module of `package` (a folder under `root`)."""
  found = {}
  for path in sorted((root / package.replace(".", "/")).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return found


def _under_type_checking(tree: ast.AST) -> set[int]:
  """ids of the import nodes that only type checkers run."""
  skipped = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
  return skipped


def imports_of(path: pathlib.Path, name: str, modules: set[str]) -> set[str]:
  """Package modules `name` imports anywhere: at module level and inside functions.

  `from a.b import c` imports the module a.b.c where there is one, else a.b itself.
  """
  tree = ast.parse(path.read_text())
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  skipped = _under_type_checking(tree)
  imported = set()
  for node in ast.walk(tree):
    if id(node) in skipped:
      continue
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
    else:
      continue
    for target in targets:
      while target and target not in modules:
        target = target.rpartition(".")[0]
      if target and target != name:
        imported.add(target)
  return imported


def import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
  """module -> package modules it imports. A package's __init__ importing its children is
  how families register, and a child importing its parent is implied by Python: neither
  is an edge between modules."""
  modules = modules_of(root, package)
  graph = {name: imports_of(path, name, set(modules)) for name, path in modules.items()}
  return {a: {b for b in bs if not b.startswith(a + ".") and not a.startswith(b + ".")}
          for a, bs in graph.items()}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  cycles, state = [], {}

  def visit(node, stack):
    state[node] = "active"
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == "active":
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for node in sorted(edges):
    if node not in state:
      visit(node, [node])
  return cycles


def test_no_import_cycles_lazy_imports_included():
  edges = import_graph(REPO, PACKAGE)
  # The graph sees imports inside functions: config_checks imports trainer.optim at module
  # level, and evaluate's main() imports the trainer lazily.
  assert "medbench_jax.trainer.optim" in edges["medbench_jax.config_checks"]
  cycles = find_cycles(edges)
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("lazy_in", ["function", "method", "try"])
def test_a_planted_lazy_cycle_is_found(tmp_path, lazy_in):
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "__init__.py").write_text("")
  (tmp_path / "pkg" / "schema.py").write_text("from pkg import checks\n")
  lazy = {
      "function": "def f():\n  from pkg import schema\n",
      "method": "class C:\n  def f(self):\n    import pkg.schema\n",
      "try": "def f():\n  try:\n    from pkg.schema import X\n  except ImportError:\n    pass\n",
  }[lazy_in]
  (tmp_path / "pkg" / "checks.py").write_text(lazy)
  cycles = find_cycles(import_graph(tmp_path, "pkg"))
  assert cycles == [["pkg.checks", "pkg.schema", "pkg.checks"]]


def test_imports_under_type_checking_are_not_edges(tmp_path):
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "__init__.py").write_text("")
  (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n")
  (tmp_path / "pkg" / "b.py").write_text(
      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from pkg import a\n")
  assert find_cycles(import_graph(tmp_path, "pkg")) == []


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaves_import_nothing_else_of_the_package(leaf):
  edges = import_graph(REPO, PACKAGE)
  assert edges[leaf] <= LEAVES[leaf]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_one_way(layer):
  edges = import_graph(REPO, PACKAGE)
  wrong = {(a, b) for a, bs in edges.items() if a == layer or a.startswith(layer + ".")
           for b in bs if any(b == f or b.startswith(f + ".") for f in FORBIDDEN[layer])}
  assert not wrong, sorted(wrong)


def _import_alone(name: str) -> tuple[str, int, str]:
  env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  return name, proc.returncode, proc.stderr[-2000:]


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_every_module_imports_first_in_a_fresh_interpreter():
  names = sorted(modules_of(REPO, PACKAGE))
  assert len(names) > 30
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    failures = [(n, err) for n, rc, err in pool.map(_import_alone, names) if rc]
  assert not failures, "\n\n".join(f"{n}:\n{err}" for n, err in failures)


def test_no_module_is_over_600_lines():
  long = {name: n for name, path in modules_of(REPO, PACKAGE).items()
          if (n := len(path.read_text().splitlines())) > 600}
  assert not long, long
