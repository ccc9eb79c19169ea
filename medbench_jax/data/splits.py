"""Fixed-seed, patient-level splits for data sets whose publishers give none.

A patient's images all land in one split (no patient in both train and test). The
assignment depends only on the set of patient ids, the fractions and the seed, not
on file order, so every machine that prepares the data set gets the same splits.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

SEED = 0


def derive(names: Sequence[str], fractions: Mapping[str, float], *,
           groups: Sequence[str] | None = None, seed: int = SEED) -> dict[str, list[str]]:
  """Splits `names` (grouped by `groups`, e.g. patient ids) by fractions of groups.

  The first split takes what rounding leaves over; every other split with a positive
  fraction gets at least one group when there are enough groups, so a small data
  set never ends with an empty validation split.
  """
  if groups is None:
    groups = names
  if len(groups) != len(names):
    raise ValueError(f"{len(names)} names but {len(groups)} groups")
  if abs(sum(fractions.values()) - 1.0) > 1e-6:
    raise ValueError(f"split fractions must sum to 1, got {dict(fractions)}")
  unique = sorted(set(groups))
  order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
  split_names = list(fractions)
  counts = {s: int(fractions[s] * len(unique)) for s in split_names[1:]}
  if len(unique) >= len(split_names):
    counts = {s: max(c, 1) if fractions[s] > 0 else c for s, c in counts.items()}
  of_group, start = {}, 0
  for split in split_names[1:]:
    for group in order[start:start + counts[split]]:
      of_group[group] = split
    start += counts[split]
  for group in order[start:]:
    of_group[group] = split_names[0]
  result = {split: [] for split in split_names}
  for name, group in sorted(zip(names, groups)):
    result[of_group[group]].append(name)
  return result
