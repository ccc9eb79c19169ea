"""Patient-level splits: the one rule that makes the splits publishers do not give, and
the check that no patient sits in two splits.

Where a publisher gives no split (or no validation split), each group of examples (a
patient; an image where a data set has no patient ids) is assigned by a salted hash of
its own id, so that
* a patient's images all land in one split;
* a group's split depends on its id, the fractions and the salt only: not on file
  order, not on the other rows, so a data set that gains rows keeps every existing
  assignment, and every machine that prepares it gets the same splits;
* every variant of a data set (another aggregation, another class set) that uses
  the same salts gets the same splits.

The rule, for holdouts (split, fraction, salt) taken in order: a group still left
goes to the split when the first 8 bytes of sha1(f"{salt}:{group}"), read as a
big-endian integer, fall below `fraction / share still left` x 2^64; groups no
holdout takes go to the remaining split. The shares are therefore approximate (a
binomial draw around each fraction). Where that leaves a split with a positive
fraction empty and there are at least as many groups as splits, the split takes one
group from the split holding the most: the one closest to its own draw (smallest
hash under its salt; for the remaining split, the donor's group drawn last).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
import dataclasses
import hashlib
from typing import TypeVar

from absl import logging

from medbench_jax.data.prepare.errors import DataFormatError

T = TypeVar("T")
# Every prepared data set has these three splits.
SPLITS = ("train", "validation", "test")
# Share of a publisher's training patients held out for validation where the
# publisher gives no validation split (CheXpert, NIH's ChestX-ray14 lists, VinDr-CXR).
VALIDATION_FRACTION = 0.1
_HASH_RANGE = 2**64


@dataclasses.dataclass(frozen=True)
class Holdout:
  """`fraction` of all groups go to `split`, drawn by a hash salted with `salt`.

  A salt is part of a data set's identity: changing it reshuffles its splits.
  """
  split: str
  fraction: float
  salt: str


def holdouts(salt: str, **fractions: float) -> list[Holdout]:
  """Holdouts salted "{salt}:{split}", e.g. holdouts("drive", validation=0.2)."""
  return [Holdout(split, fraction, f"{salt}:{split}") for split, fraction in fractions.items()]


def salted_hash(salt: str, group: str) -> int:
  """The draw of `group` under `salt`: sha1(f"{salt}:{group}")'s first 8 bytes, big-endian."""
  return int.from_bytes(hashlib.sha1(f"{salt}:{group}".encode()).digest()[:8], "big")


def assign(groups: Iterable[str], draws: Sequence[Holdout], rest: str = "train"
           ) -> dict[str, str]:
  """group -> split by the module's rule; the groups no holdout takes go to `rest`."""
  fractions = [d.fraction for d in draws]
  if any(not 0.0 <= f <= 1.0 for f in fractions) or sum(fractions) > 1.0 + 1e-9:
    raise ValueError(f"holdout fractions must lie in [0, 1] and sum to at most 1, got "
                     f"{fractions}")
  names = [d.split for d in draws] + [rest]
  if len(set(names)) != len(names):
    raise ValueError(f"split names must differ, got {names}")
  members = _draw(sorted(set(groups)), draws, rest)
  _fill_empty_splits(members, draws, rest)
  return {group: split for split, of_split in members.items() for group in of_split}


def _draw(groups: list[str], draws: Sequence[Holdout], rest: str) -> dict[str, list[str]]:
  """Each holdout takes, of the groups still left, those its salted hash draws."""
  members, share_left = {}, 1.0
  for draw in draws:
    threshold = draw.fraction / share_left * _HASH_RANGE if share_left > 0 else 0.0
    members[draw.split] = [g for g in groups if salted_hash(draw.salt, g) < threshold]
    taken = set(members[draw.split])
    groups = [g for g in groups if g not in taken]
    share_left -= draw.fraction
  members[rest] = groups
  return members


def _fill_empty_splits(members: dict[str, list[str]], draws: Sequence[Holdout],
                       rest: str) -> None:
  """Gives a group to each split with a positive fraction that the draw left empty."""
  wanted = [d.split for d in draws if d.fraction > 0]
  if sum(d.fraction for d in draws) < 1.0 - 1e-9:
    wanted.append(rest)
  if sum(len(m) for m in members.values()) < len(wanted):
    return  # too few groups for every split
  salt_of = {d.split: d.salt for d in draws}
  for split in (s for s in wanted if not members[s]):
    donors = [s for s in members if len(members[s]) > 1]
    if not donors:
      return
    donor = max(donors, key=lambda s: len(members[s]))
    if split == rest:  # the donor's group drawn last
      group = max(members[donor], key=lambda g: salted_hash(salt_of[donor], g))
    else:  # the group closest to this split's draw
      group = min(members[donor], key=lambda g: salted_hash(salt_of[split], g))
    members[donor].remove(group)
    members[split].append(group)


def split_by_group(items: Sequence[T], draws: Sequence[Holdout], rest: str = "train"
                   ) -> dict[str, list[T]]:
  """Items per split, in their given order, whole groups at a time (see `assign`).

  items: anything with a `group` attribute (a prepare.parsing.Record: its patient).
  """
  split_of = assign((item.group for item in items), draws, rest)
  result: dict[str, list[T]] = {rest: [], **{d.split: [] for d in draws}}
  for item in items:
    result[split_of[item.group]].append(item)
  return result


def check_patients(patients: Mapping[str, Iterable[str]], official: Collection[str]
                   ) -> list[str]:
  """No patient may appear in two splits.

  An overlap between two of the publisher's official splits is the publisher's
  choice: returned as a warning. One involving a split made here or by the user
  is an error (a DataFormatError naming the splits and some patients).
  """
  sets = {split: {p for p in ids if p} for split, ids in patients.items()}
  warnings, errors = [], []
  names = list(sets)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      shared = sorted(sets[a] & sets[b])
      if not shared:
        continue
      message = (f"{len(shared)} patient(s) appear in both {a!r} and {b!r}, e.g. "
                 f"{shared[:5]}")
      (warnings if a in official and b in official else errors).append(message)
  if errors:
    raise DataFormatError("Patient-level leakage between splits:\n  " + "\n  ".join(errors))
  for message in warnings:
    logging.warning("Official splits share patients (kept as published): %s", message)
  return warnings
