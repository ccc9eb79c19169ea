"""Data problems: the error type, and the report that collects every problem of a run.

A preparation never stops at the first bad row or image: each goes to a `Problems`
report naming file and line, and the report is raised (or, with skip_bad, logged and
counted) once everything has been read.
"""

from __future__ import annotations

from absl import logging


class DataFormatError(ValueError):
  """A data set file that does not follow its published format (file and line named)."""


class RowError(ValueError):
  """Raised while parsing one row; the row loop turns it into a `Problems` entry."""


class Problems:
  """Every data problem of one preparation, so that a single report lists them all.

  `add(split, where, message)`: a bad row or image ("file:line"); `--skip_bad`
  drops it and counts it under its split. `fatal(where, message)`: something no
  row can be skipped over (a missing label file, a missing CSV column).
  """

  def __init__(self):
    self.rows: dict[str, dict[str, str]] = {}
    self.fatal_errors: list[str] = []

  def add(self, split: str, where: str, message: str) -> None:
    split_rows = self.rows.setdefault(split, {})
    # One entry per row: a row is skipped once however many problems it has.
    split_rows[where] = split_rows[where] + "; " + message if where in split_rows else message

  def fatal(self, where: str, message: str) -> None:
    self.fatal_errors.append(f"{where}: {message}")

  def is_bad(self, split: str, where: str) -> bool:
    return where in self.rows.get(split, {})

  def skipped(self) -> dict[str, int]:
    return {split: len(rows) for split, rows in self.rows.items()}

  def report(self) -> str:
    lines = list(self.fatal_errors)
    lines += [f"{where}: {message}" for rows in self.rows.values()
              for where, message in rows.items()]
    return f"{len(lines)} data problem(s):\n" + "\n".join("  " + line for line in lines)

  def raise_fatal(self) -> None:
    if self.fatal_errors:
      raise DataFormatError(self.report())

  def check(self, skip_bad: bool) -> None:
    """Raises the report unless skip_bad, in which case it is logged and counted."""
    self.raise_fatal()
    if not self.rows:
      return
    if not skip_bad:
      raise DataFormatError(self.report() + "\nFix these files, or pass --skip_bad to "
                            "prepare the rest and record the skipped count.")
    logging.warning("Skipping %d example(s) (--skip_bad): %s",
                    sum(self.skipped().values()), self.report())
