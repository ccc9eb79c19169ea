"""Publishers' label and split files -> `Record`s: CSVs, label lists, numbers.

Every parser reports a bad row to a `Problems` report as "file:line" and goes on,
so that one report lists every problem of a data set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import csv
import dataclasses
import gzip
import os
import pathlib

import numpy as np

from medbench_jax.data.prepare.errors import DataFormatError
from medbench_jax.data.prepare.errors import Problems
from medbench_jax.data.prepare.errors import RowError


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
  """One example as the publisher's files describe it.

  labels: float32 (K,) as published: 1 positive, 0 negative, and where the data set
  has them -1 uncertain and NaN blank (data/labels.py applies the label policy).
  patient: "" where the data set has no patient ids. where: "file:line".
  """
  name: str
  path: str
  labels: np.ndarray
  where: str
  patient: str = ""
  frontal: bool = True

  @property
  def group(self) -> str:
    """The unit splits keep whole: the patient, or the image where ids are missing."""
    return self.patient or self.name


def parse_number(value: str, column: str, blank: float | None = None) -> float:
  """A label field as float; an empty field is `blank` (an error when None)."""
  value = value.strip()
  if not value:
    if blank is None:
      raise RowError(f"empty value in column {column!r}")
    return blank
  try:
    return float(value)
  except ValueError:
    raise RowError(f"non-numeric value {value!r} in column {column!r}") from None


def _open_text(path: pathlib.Path):
  if path.suffix == ".gz":
    return gzip.open(path, "rt", newline="")
  return open(path, newline="")


def find_file(folder: pathlib.Path, name: str, problems: Problems) -> pathlib.Path | None:
  """`folder/name`, or its gzipped copy (PhysioNet serves CSVs either way)."""
  for candidate in (folder / name, folder / (name + ".gz")):
    if candidate.exists():
      return candidate
  problems.fatal(str(folder / name), "file not found (nor its .gz)")
  return None


def read_csv(path: pathlib.Path, split: str, problems: Problems,
             required: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
  """Yields ("file:line", row dict) for every well-formed row of a CSV (or .csv.gz).

  A row with another number of fields than the header goes to `problems`. A header
  ending in a comma (NIH's Data_Entry_2017.csv) may be matched with or without the
  empty last field.
  """
  with _open_text(path) as f:
    reader = csv.reader(f)
    header = next(reader, [])
    names = list(header)
    while names and not names[-1].strip():
      names.pop()
    names = [n.strip() for n in names]
    missing = [c for c in required if c not in names]
    if missing:
      problems.fatal(f"{path}:1", f"missing column(s) {missing}; the header is {names}")
      return
    for row in reader:
      where = f"{path}:{reader.line_num}"
      if not any(field.strip() for field in row):
        continue
      if len(row) not in (len(names), len(header)):
        problems.add(split, where, f"expected {len(names)} fields as in the header, "
                     f"got {len(row)}")
        continue
      yield where, dict(zip(names, row))


@dataclasses.dataclass(frozen=True)
class ListEntry:
  name: str
  labels: np.ndarray
  source: str  # "file:line", for error messages


def read_label_list(path: str | os.PathLike, num_labels: int,
                    problems: Problems | None = None, split: str = "",
                    separator: str | None = None) -> list[ListEntry]:
  """Parses `name l1 ... lK` lines (ChestX-ray14 lists; `name,label` with separator=",").

  Returns an entry per good line. Without `problems`, the first bad
  line raises; with it, every bad line is recorded and parsing goes on.
  """
  own = problems is None
  problems = Problems() if own else problems
  entries = []
  with open(path) as f:
    for line_no, line in enumerate(f, start=1):
      fields = [x.strip() for x in line.split(separator)] if line.strip() else []
      if not fields:
        continue
      where = f"{path}:{line_no}"
      if len(fields) != num_labels + 1:
        problems.add(split, where, f"expected an image name and {num_labels} labels, got "
                     f"{len(fields)} fields: {line.strip()!r}")
        continue
      try:
        labels = np.array([float(v) for v in fields[1:]], np.float32)
      except ValueError:
        problems.add(split, where, f"labels must be numbers, got {line.strip()!r}")
        continue
      entries.append(ListEntry(fields[0], labels, where))
  if not entries and not problems.rows.get(split):
    problems.fatal(str(path), "the list is empty")
  if own and (problems.rows or problems.fatal_errors):
    raise DataFormatError(problems.report())
  return entries
