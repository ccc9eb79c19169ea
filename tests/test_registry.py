"""data/prepare/registry.py: names and tasks without loading any builder; import hygiene."""

import subprocess
import sys

import pytest

from medbench_jax.data.prepare import registry
from tests.helpers import REPO

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
