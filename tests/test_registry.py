"""data/prepare/registry.py: names and tasks without loading any builder; import hygiene."""

import ast
import pathlib
import subprocess
import sys

import pytest

from medbench_jax.data.prepare import registry

REPO = pathlib.Path(__file__).resolve().parents[1]

# Parsing a config file, checking its data set and listing the data sets.
_LIST_IN_A_FRESH_PROCESS = """
import sys
from configs import swin
from medbench_jax.data import sources
from medbench_jax.data.prepare import registry
config = swin.get_config("data=chexpert")
sources.validate_dataset_config(config.dataset)
names = registry.names()
tasks = {registry.task_of(name) for name in names}
print(len(names), sorted(tasks))
print(sorted(m for m in ("tensorflow_datasets", "tensorflow", "cv2", "albumentations")
             if m in sys.modules))
"""


def test_names_and_tasks_load_neither_tfds_nor_opencv():
  result = subprocess.run([sys.executable, "-c", _LIST_IN_A_FRESH_PROCESS], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  counts, loaded = result.stdout.strip().splitlines()[-2:]
  assert counts == f"{len(registry.names())} {sorted(registry.TASKS)}"
  assert loaded == "[]"


@pytest.mark.parametrize("name", registry.names())
def test_each_name_gets_its_builder_with_the_task_it_stores(name):
  builder_cls = registry.get(name)
  assert builder_cls.TASK == registry.task_of(name) in registry.TASKS


def test_segmentation_and_medmnist_tasks():
  assert registry.task_of("medmnist_pathmnist") == "multi-class"
  assert registry.task_of("medmnist_breastmnist") == "binary"
  assert registry.task_of("drive") == "segmentation"
  assert "phantom_cxr" in registry.names() and "phantom_cxr_seg" in registry.names()


def test_unknown_dataset_lists_available():
  with pytest.raises(ValueError, match="Unknown dataset 'chexpert_v9'.*phantom_cxr"):
    registry.get("chexpert_v9")
  with pytest.raises(ValueError, match="available"):
    registry.task_of("chexpert_v9")


def _import_time_edges(root: pathlib.Path, package: str) -> dict[str, set[str]]:
  """module -> the package modules it imports when imported (not in functions, not
  under TYPE_CHECKING). `from a.b import c` imports a.b.c where that is a module, else
  the names of a.b's __init__."""
  files = {}
  for path in root.rglob("*.py"):
    parts = path.relative_to(root.parents[1]).with_suffix("").parts
    files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  edges = {}
  for name, path in files.items():
    targets = set()
    body = list(ast.parse(path.read_text()).body)
    while body:
      node = body.pop()
      if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
        continue
      if isinstance(node, (ast.If, ast.Try)):
        body += node.body + node.orelse + getattr(node, "handlers", []) + getattr(
            node, "finalbody", [])
      elif isinstance(node, ast.Import):
        targets |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:
        targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files
                    else node.module for a in node.names}
    edges[name] = {t for t in targets if t in files and t != name}
  return edges


def test_no_import_cycles_under_data():
  edges = _import_time_edges(REPO / "medbench_jax" / "data", "medbench_jax.data")
  assert edges["medbench_jax.data.prepare.seg_cxr"] >= {"medbench_jax.data.prepare.base",
                                                        "medbench_jax.data.splits"}
  state, cycles = {}, []

  def visit(module, stack):
    state[module] = "open"
    for target in sorted(edges.get(module, ())):
      if state.get(target) == "open":
        cycles.append(stack[stack.index(target):] + [target])
      elif target not in state:
        visit(target, stack + [target])
    state[module] = "done"

  for module in sorted(edges):
    if module not in state:
      visit(module, [module])
  assert not cycles


def test_registry_imports_nothing_of_the_package():
  tree = ast.parse((REPO / "medbench_jax/data/prepare/registry.py").read_text())
  imported = [n.module if isinstance(n, ast.ImportFrom) else a.name
              for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
              for a in n.names]
  assert not [m for m in imported if m and m.startswith("medbench_jax")]
