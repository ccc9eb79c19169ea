"""paths: default workdirs, and atomic writes (a reader sees the old file or the whole new
one; nothing is left behind)."""

import json
import os
import threading

import pytest

from medbench_jax import paths


def test_default_workdir_names_the_config_and_its_argument():
  assert paths.default_workdir("configs/swin.py") == os.path.join("workdirs", "swin")
  assert paths.default_workdir("configs/swin.py:data=cxr14,trials=3") == os.path.join(
      "workdirs", "swin_data_cxr14_trials_3")


@pytest.mark.parametrize("data,expected", [(b"\x00\xffbytes", b"\x00\xffbytes"),
                                           ("text é", "text é".encode())])
def test_write_atomic_writes_bytes_and_utf8_text_and_leaves_no_temporary_file(
    tmp_path, data, expected):
  path = tmp_path / "out.bin"
  path.write_bytes(b"old content")
  paths.write_atomic(path, data)
  assert path.read_bytes() == expected
  assert os.listdir(tmp_path) == ["out.bin"]


def test_readers_see_the_old_or_the_whole_new_file_never_part_of_one(tmp_path):
  path = tmp_path / "status.json"
  # Large enough that a plain rewrite (truncate, then write) is seen half done.
  versions = [bytes([65 + i]) * 4_000_000 for i in range(2)]
  paths.write_atomic(path, versions[0])
  seen, done = set(), threading.Event()

  def read_until_done():
    while not done.is_set():
      seen.add(path.read_bytes())

  reader = threading.Thread(target=read_until_done)
  reader.start()
  try:
    for i in range(20):
      paths.write_atomic(path, versions[i % 2])
  finally:
    done.set()
    reader.join()
  assert seen and seen <= set(versions)
  assert os.listdir(tmp_path) == ["status.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path,
                                                                         monkeypatch):
  path = tmp_path / "results.json"
  path.write_text("old")

  def full_disk(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fsync", full_disk)
  with pytest.raises(OSError, match="No space left"):
    paths.write_atomic(path, "new")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["results.json"]


def test_the_data_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
  calls = []
  fsync, replace = os.fsync, os.replace
  monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), fsync(fd))[1])
  monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), replace(a, b))[1])
  paths.write_atomic(tmp_path / "a.json", "{}")
  # The file's data, then the rename, then the folder entry that names it.
  assert calls == ["fsync", "replace", "fsync"]


def test_write_json_round_trips_and_refuses_nan(tmp_path):
  path = tmp_path / "r.json"
  paths.write_json(path, {"auc": 0.75, "undefined": None})
  assert paths.read_json(path) == {"auc": 0.75, "undefined": None}
  assert path.read_text() == json.dumps({"auc": 0.75, "undefined": None}, indent=2)
  with pytest.raises(ValueError):
    paths.write_json(path, {"auc": float("nan")})
  assert paths.read_json(path) == {"auc": 0.75, "undefined": None}


def test_read_json_names_a_damaged_file(tmp_path):
  path = tmp_path / "results.json"
  path.write_text('{"summary": ')
  with pytest.raises(ValueError, match=f"{path} is not valid JSON.*Delete it"):
    paths.read_json(path)
