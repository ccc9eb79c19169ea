"""data/splits.py: salted-hash splits by patient, stable under added rows; the patient check."""

import hashlib

import numpy as np
import pytest

from medbench_jax.data import splits
from medbench_jax.data.prepare.errors import DataFormatError

DRAWS = splits.holdouts("set", validation=0.1, test=0.2)


class _Item:

  def __init__(self, name, group):
    self.name, self.group = name, group


def _items(n, per_group=2):
  return [_Item(f"img{i}", f"patient{i // per_group}") for i in range(n)]


def _published_rule(salt, group, fraction):
  """The rule the module docstring states, written out with hashlib."""
  digest = hashlib.sha1(f"{salt}:{group}".encode()).digest()
  return int.from_bytes(digest[:8], "big") < fraction * 2**64


def test_patients_stay_whole_and_shares_follow_the_fractions():
  items = _items(40000)  # 20,000 patients
  result = splits.split_by_group(items, DRAWS)
  shares = {s: len(v) / len(items) for s, v in result.items()}
  assert shares == pytest.approx({"train": 0.7, "validation": 0.1, "test": 0.2}, abs=0.01)
  patient_split = {}
  for split, members in result.items():
    for item in members:
      assert patient_split.setdefault(item.group, split) == split


def test_order_of_the_files_does_not_matter_and_items_keep_it():
  items = _items(30, per_group=1)
  order = np.random.default_rng(0).permutation(30)
  shuffled = [items[i] for i in order]
  a, b = splits.split_by_group(items, DRAWS), splits.split_by_group(shuffled, DRAWS)
  assert {s: {i.name for i in v} for s, v in a.items()} == {
      s: {i.name for i in v} for s, v in b.items()}
  for split, members in b.items():
    assert members == [i for i in shuffled if i in members], split


def test_added_patients_leave_every_assignment_in_place():
  groups = [f"p{i}" for i in range(500)]
  before = splits.assign(groups, DRAWS)
  after = splits.assign(groups + [f"new{i}" for i in range(300)], DRAWS)
  assert all(after[g] == split for g, split in before.items())


def test_the_rule_is_the_published_hash():
  """The hash-based splits of chexpert, chestxray14_nih, vindr_cxr and rsna_pneumonia
  depend on this rule: it must not change without a new builder version."""
  groups = [f"patient{i:05d}" for i in range(3000)]
  single = splits.assign(groups, [splits.Holdout("validation", 0.1, "chexpert")])
  assert {g for g, s in single.items() if s == "validation"} == {
      g for g in groups if _published_rule("chexpert", g, 0.1)}
  # Two holdouts: the second draws from what the first left, at its share of the rest.
  nested = splits.assign(groups, [splits.Holdout("test", 0.2, "rsna:test"),
                                  splits.Holdout("validation", 0.1, "rsna:val")])
  test = {g for g in groups if _published_rule("rsna:test", g, 0.2)}
  validation = {g for g in groups if g not in test and _published_rule("rsna:val", g, 0.1 / 0.8)}
  assert {g for g, s in nested.items() if s == "test"} == test
  assert {g for g, s in nested.items() if s == "validation"} == validation
  assert {g for g, s in nested.items() if s == "train"} == set(groups) - test - validation


@pytest.mark.parametrize("count", [3, 4, 5, 8])
def test_small_sets_get_an_example_in_every_split(count):
  for salt in ("a", "b", "c", "d"):
    groups = [f"case{i}" for i in range(count)]
    result = splits.assign(groups, splits.holdouts(salt, validation=0.1, test=0.2))
    sizes = {s: list(result.values()).count(s) for s in ("train", "validation", "test")}
    assert min(sizes.values()) >= 1 and sum(sizes.values()) == count, (salt, sizes)
    assert splits.assign(groups[::-1], splits.holdouts(salt, validation=0.1,
                                                       test=0.2)) == result


def test_fewer_groups_than_splits_are_all_assigned():
  assert set(splits.assign(["only"], DRAWS)) == {"only"}
  assert splits.assign([], DRAWS) == {}


@pytest.mark.parametrize("draws,message", [
    ([splits.Holdout("test", 0.8, "x"), splits.Holdout("validation", 0.3, "y")],
     "sum to at most 1"),
    ([splits.Holdout("test", -0.1, "x")], "lie in"),
    ([splits.Holdout("train", 0.1, "x")], "must differ"),
])
def test_bad_holdouts_are_named(draws, message):
  with pytest.raises(ValueError, match=message):
    splits.assign(["a", "b"], draws)


def test_patient_check_warns_for_official_splits_and_fails_for_made_ones():
  patients = {"train": ["1", "2"], "validation": ["3"], "test": ["2", "4"]}
  warnings = splits.check_patients(patients, official=("train", "validation", "test"))
  assert len(warnings) == 1 and "'train' and 'test'" in warnings[0]
  with pytest.raises(DataFormatError, match="1 patient.*'train' and 'test'"):
    splits.check_patients(patients, official=("validation", "test"))
  assert splits.check_patients({"train": ["1", ""], "test": ["", "2"]}, ()) == []
