"""`python -m medbench_jax.prepare`: JSON summary lines, one report, peak memory."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from absl.testing import flagsaver

from medbench_jax import prepare as prepare_cli
from tests import test_builders


def _run_cli(capsys, **flag_values):
  with flagsaver.flagsaver(workers=1, **flag_values):
    prepare_cli.main(["prepare"])
  return capsys.readouterr()


def test_prints_one_json_line_per_split(tmp_path, phantom_dir, capsys):
  out = _run_cli(capsys, dataset="phantom_cxr", manual_dir=str(phantom_dir),
                 data_dir=str(tmp_path), image_size=16).out
  lines = [json.loads(line) for line in out.splitlines()]
  assert [(x["dataset"], x["split"], x["examples"], x["skipped"]) for x in lines] == [
      ("phantom_cxr", "train", 96, 0), ("phantom_cxr", "validation", 40, 0),
      ("phantom_cxr", "test", 40, 0)]
  labels = np.loadtxt(phantom_dir / "phantom_train.txt", usecols=range(1, 5))
  assert lines[0]["prevalence"]["Nodule"] == round(float(labels[:, 1].mean()), 4)


def test_bad_files_exit_1_with_the_report_and_skip_bad_counts(tmp_path, capsys):
  manual = test_builders._broken_phantom(tmp_path)  # pylint: disable=protected-access
  with pytest.raises(SystemExit) as e:
    _run_cli(capsys, dataset="phantom_cxr", manual_dir=str(manual), data_dir=str(tmp_path),
             image_size=16)
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert "5 data problem(s)" in err and "phantom_train.txt:6: labels must be numbers" in err
  out = _run_cli(capsys, dataset="phantom_cxr", manual_dir=str(manual),
                 data_dir=str(tmp_path), image_size=16, skip_bad=True).out
  assert json.loads(out.splitlines()[0])["skipped"] == 5


def test_csv_folder_layout_comes_from_csv_flags(tmp_path, capsys):
  rows, expected = test_builders._csv_folder(tmp_path / "m")  # pylint: disable=protected-access
  test_builders._csv(tmp_path / "m" / "table.csv", ["file", "A", "B", "part", "id"], rows)  # pylint: disable=protected-access
  out = _run_cli(capsys, dataset="csv_folder", manual_dir=str(tmp_path / "m"),
                 data_dir=str(tmp_path / "tfds"), image_size=16, csv="table.csv",
                 csv_image_dir="pics", csv_path_column="file", csv_labels="A,B",
                 csv_split_column="part", csv_patient_column="id").out
  lines = [json.loads(line) for line in out.splitlines()]
  assert [x["examples"] for x in lines] == [len(expected[s]) for s in
                                            ("train", "validation", "test")]
  assert set(lines[0]["prevalence"]) == {"A", "B"}


# Writes a ChestX-ray14-sized list (112,120 images, the official split sizes) of 8x8
# PNGs in NIH's archive folders, prepares it at 8 px in a process pool and iterates
# the training split once through the grain pipeline with 2 workers; prints peak RSS
# of this process and of its largest child (pool and grain workers).
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, pathlib, resource, sys, time
    import cv2, numpy as np
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from medbench_jax.data import builders, pipeline

    root = pathlib.Path(sys.argv[1])
    manual = root / "manual"
    rng = np.random.default_rng(0)
    pngs = [cv2.imencode(".png", np.full((8, 8), v, np.uint8))[1].tobytes()
            for v in range(256)]
    start = time.perf_counter()
    for k in range(1, 13):
      (manual / f"images_{k:03d}" / "images").mkdir(parents=True)
    index = 0
    for split, count in (("train", 75312), ("val", 11212), ("test", 25596)):
      lines = []
      for _ in range(count):
        name = f"{index // 10:08d}_{index % 10:03d}.png"
        folder = manual / f"images_{index * 12 // 112120 + 1:03d}" / "images"
        (folder / name).write_bytes(pngs[index % 256])
        labels = (rng.random(14) < 0.05).astype(int)
        lines.append(name + " " + " ".join(map(str, labels)))
        index += 1
      (manual / f"Xray14_{split}_official.txt").write_text("\\n".join(lines) + "\\n")
    written = time.perf_counter() - start
    start = time.perf_counter()
    builder = builders.prepare("chestxray14", manual, root / "tfds", 8)
    prepared = time.perf_counter() - start
    start = time.perf_counter()
    train = builder.as_data_source("train")
    ds = pipeline.train_dataset(train, pp_spec="flip_lr", local_batch_size=256, seed=0,
                                num_workers=2)
    it = iter(ds)
    for _ in range(len(train) // 256):
      next(it)
    it.close()
    iterated = time.perf_counter() - start
    print(json.dumps({
        "examples": index, "write_s": round(written, 1), "prepare_s": round(prepared, 1),
        "iterate_s": round(iterated, 1), "workers": builders.default_workers(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "peak_child_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
    }))
""")


@pytest.mark.slow
def test_chestxray14_sized_list_prepares_and_iterates_within_2_gib(tmp_path):
  result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, check=False,
                          cwd=pathlib.Path(__file__).parent.parent,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  print(figures)
  assert figures["examples"] == 112120
  assert figures["peak_rss_mib"] <= 2048 and figures["peak_child_rss_mib"] <= 2048
