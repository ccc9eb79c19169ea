"""The package has no import cycles, and each module imports on its own in a fresh
interpreter (so no module depends on another having been imported first)."""

import ast
import concurrent.futures
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "medbench_jax"


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for path in sorted((REPO / PACKAGE).rglob("*.py")):
    parts = path.relative_to(REPO).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    found[name] = path
  return found


def _module_level_imports(path: pathlib.Path, name: str, modules: set[str]) -> set[str]:
  """Package modules imported when `name` is imported (function-level imports excluded)."""
  tree = ast.parse(path.read_text())
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  imported = set()
  for node in tree.body:
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                        ([base] if base else []))
      targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
    else:
      continue
    for target in targets:
      # `from pkg import mod` names a module; `from mod import function` names its module.
      while target and target not in modules:
        target = target.rpartition(".")[0]
      if target and target != name:
        imported.add(target)
  return imported


def test_no_import_cycles():
  modules = _modules()
  graph = {name: _module_level_imports(path, name, set(modules))
           for name, path in modules.items()}
  # A package's __init__ importing its own children is how families register; a child
  # importing its parent package is implied by Python. Neither is a cycle of modules.
  edges = {a: {b for b in bs if not b.startswith(a + ".") and not a.startswith(b + ".")}
           for a, bs in graph.items()}
  cycles, state = [], {}

  def visit(node, stack):
    state[node] = "active"
    for nxt in sorted(edges[node]):
      if state.get(nxt) == "active":
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for node in sorted(edges):
    if node not in state:
      visit(node, [node])
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _import_alone(name: str) -> tuple[str, int, str]:
  env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  return name, proc.returncode, proc.stderr[-2000:]


def test_every_module_imports_first_in_a_fresh_interpreter():
  names = sorted(_modules())
  assert len(names) > 30
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    failures = [(n, err) for n, rc, err in pool.map(_import_alone, names) if rc]
  assert not failures, "\n\n".join(f"{n}:\n{err}" for n, err in failures)


def test_no_module_is_over_600_lines():
  long = {name: n for name, path in _modules().items()
          if (n := len(path.read_text().splitlines())) > 600}
  assert not long, long
