"""A trial's metric writer: log lines, and TensorBoard event files in a local or remote folder.

TensorFlow's summary writer writes through TensorFlow's own file systems. For a URL
(gs://...) the event files are written to a local scratch folder and copied to the URL
through etils.epath at every flush and at close, like every other file of a run: one
storage layer for all of it, and TensorFlow's GCS client (which has no setting for
another endpoint, so no emulator can stand in for the bucket) stays out of the run. A
bucket stores whole objects, so each copy uploads a changed event file whole, as
TensorFlow's own GCS writer does at each flush.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

from clu import metric_writers
from etils import epath

from medbench_jax import paths


class MirroredWriter(metric_writers.MultiWriter):
  """Writes like `writer`, whose event files go to `local`; copies them to `remote` at
  every flush and at close (then deletes `local`)."""

  def __init__(self, writer: metric_writers.MetricWriter, local: pathlib.Path,
               remote: epath.Path):
    super().__init__([writer])
    self.local = local
    self.remote = remote
    self._copied: dict[pathlib.Path, int] = {}  # file -> size when last copied

  def _copy(self) -> None:
    for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
      size = path.stat().st_size
      if self._copied.get(path) != size:
        target = self.remote / path.relative_to(self.local).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
        self._copied[path] = size

  def flush(self) -> None:
    super().flush()
    self._copy()

  def close(self) -> None:
    super().close()
    self._copy()
    shutil.rmtree(self.local, ignore_errors=True)


def create_writer(tb_dir: str | os.PathLike, *, just_logging: bool
                  ) -> metric_writers.MetricWriter:
  """clu's default writer (logging, and TensorBoard unless `just_logging`) for `tb_dir`,
  a local folder or a URL."""
  if just_logging or not paths.is_remote(tb_dir):
    return metric_writers.create_default_writer(tb_dir, just_logging=just_logging)
  local = pathlib.Path(tempfile.mkdtemp(prefix="medbench_tb_"))
  return MirroredWriter(metric_writers.create_default_writer(local), local,
                        paths.as_path(tb_dir))
