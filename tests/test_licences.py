"""data/prepare/licences.py and `prepare --list`: every data set has its terms; listing
them loads neither TFDS nor OpenCV."""

import subprocess
import sys

import pytest

from medbench_jax.data.prepare import licences
from medbench_jax.data.prepare import registry
from tests.helpers import REPO

_LIST_IN_A_FRESH_PROCESS = """
import sys
from absl import flags
from medbench_jax import prepare
flags.FLAGS(["prepare", "--list"])
prepare.main(["prepare"])
print(sorted(m for m in ("tensorflow_datasets", "tensorflow", "cv2", "albumentations")
             if m in sys.modules))
"""


def test_every_data_set_has_a_source_and_nothing_else_does():
  assert licences.names() == registry.names()


@pytest.mark.parametrize("name", registry.names())
def test_each_source_is_complete(name):
  source = licences.of(name)
  assert source.access in licences.ACCESS_TIERS
  assert source.licence and source.title
  if source.access != "user":
    assert source.citation
  if source.access in ("registration", "credentialed"):
    assert source.url.startswith("https://") or source.url.startswith("http://")


def test_terms_of_the_study_data_sets():
  assert licences.of("chestxray14").licence == "CC0 1.0"
  assert licences.of("chestxray14").redistribute_models
  for name in ("mimic_cxr_jpg", "vindr_cxr"):
    assert licences.of(name).access == "credentialed"
    assert licences.of(name).licence == "PhysioNet Credentialed Health Data License 1.5.0"
    assert not licences.of(name).redistribute_models
  assert licences.of("chexpert").access == "registration"
  assert not licences.of("chexpert").redistribute_models
  assert licences.of("medmnist_pathmnist").licence == "CC BY 4.0"
  assert licences.of("medmnist_dermamnist").licence == "CC BY-NC 4.0"
  assert not licences.of("medmnist_dermamnist").redistribute_models
  assert licences.of("phantom_cxr").redistribute_models
  assert not licences.of("csv_folder").redistribute_models


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(ValueError, match="Unknown dataset 'nope'.*chexpert"):
    licences.of("nope")


def test_prepare_list_prints_the_table_without_loading_data_code():
  result = subprocess.run([sys.executable, "-c", _LIST_IN_A_FRESH_PROCESS], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[-1] == "[]"
  header, rows = lines[0].split(), lines[1:-1]
  assert header == ["name", "task", "access", "models", "licence", "url", "citation"]
  assert [row.split()[0] for row in rows] == registry.names()
  mimic = next(row for row in rows if row.startswith("mimic_cxr_jpg "))
  assert mimic.split()[1:4] == ["multi-label", "credentialed", "no"]
  assert "PhysioNet Credentialed Health Data License 1.5.0" in mimic
  assert "https://physionet.org/content/mimic-cxr-jpg/" in mimic
