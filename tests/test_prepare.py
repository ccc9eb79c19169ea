"""data/prepare's prepare_dataset and `python -m medbench_jax.prepare` (JSON summary
lines, one report, peak memory)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

from absl.testing import flagsaver
import numpy as np
import pytest

from medbench_jax import config_lib
from medbench_jax import paths
from medbench_jax import prepare as prepare_cli
from medbench_jax.data import prepare
from medbench_jax.data.prepare import phantom
from tests import layouts


def _phantom_config(manual_dir, **phantom_params):
  d = config_lib.default_config().dataset
  d.update(manual_dir=str(manual_dir), image_size=16)
  d.phantom.update(num_train=6, num_val=3, num_test=3, image_size=32, **phantom_params)
  return d


def test_prepare_dataset_generates_the_phantom_and_prepares_once(tmp_path):
  d = _phantom_config(tmp_path / "phantom")
  builder = prepare.prepare_dataset(d, workers=1)
  assert phantom.generated_params(tmp_path / "phantom")["num_train"] == 6
  assert builder.is_prepared() and len(builder.as_data_source("train")) == 6
  assert pathlib.Path(builder.data_dir).is_relative_to(tmp_path / "phantom" / "prepared")
  info = pathlib.Path(builder.data_dir) / "dataset_info.json"
  stamp = info.stat().st_mtime_ns
  assert prepare.prepare_dataset(d, workers=1).data_dir == builder.data_dir
  assert info.stat().st_mtime_ns == stamp
  # The segmentation variant reads the same generated folder.
  d.name = "phantom_cxr_seg"
  seg = prepare.prepare_dataset(d, workers=1)
  assert seg.info.metadata["task"] == "segmentation"
  assert len(seg.as_data_source("test")) == 3
  # A folder generated with other parameters is not silently reused.
  with pytest.raises(ValueError, match="already holds a phantom data set"):
    prepare.prepare_dataset(_phantom_config(tmp_path / "phantom", seed=5), workers=1)


def test_default_folders():
  d = config_lib.default_config().dataset
  p = d.phantom
  assert prepare.manual_dir_for(d) == os.path.join(
      paths.CACHE_DIR, "phantom_cxr", f"seed{p.seed}_{p.num_train}-{p.num_val}-"
      f"{p.num_test}_{p.image_size}px_v{phantom.FORMAT_VERSION}")
  assert prepare.data_dir_for(d) == os.path.join(prepare.manual_dir_for(d), "prepared")
  d.name = "chexpert"
  assert prepare.data_dir_for(d) == os.path.join(paths.CACHE_DIR, "tfds")
  with pytest.raises(ValueError, match="config.dataset.manual_dir is required for 'chexpert'"):
    prepare.manual_dir_for(d)


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
  manual = layouts.broken_phantom(tmp_path)
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
  rows, expected = layouts.csv_folder_rows(tmp_path / "m")
  layouts.write_csv(tmp_path / "m" / "table.csv", ["file", "A", "B", "part", "id"], rows)
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
    from medbench_jax.data import pipeline, prepare
    from medbench_jax.data.prepare import staging

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
    builder = prepare.get_builder("chestxray14", 8, root / "tfds").prepare_once(manual)
    prepared = time.perf_counter() - start
    start = time.perf_counter()
    train = builder.as_data_source("train")
    ds = pipeline.train_dataset(train, pp_spec="flip_lr", keys=("image", "labels"),
                                local_batch_size=256, seed=0, num_workers=2)
    it = iter(ds)
    for _ in range(len(train) // 256):
      next(it)
    it.close()
    iterated = time.perf_counter() - start
    print(json.dumps({
        "examples": index, "write_s": round(written, 1), "prepare_s": round(prepared, 1),
        "iterate_s": round(iterated, 1), "workers": staging.default_workers(),
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


@pytest.mark.slow
def test_prepare_cli_prints_split_summaries(tmp_path):
  """python -m medbench_jax.prepare, with worker processes, on a Montgomery miniature."""
  layouts.montgomery(tmp_path / "raw", np.random.default_rng(7), count=20)
  result = subprocess.run(
      [sys.executable, "-m", "medbench_jax.prepare", "--dataset=montgomery_lr",
       f"--manual_dir={tmp_path / 'raw'}", f"--data_dir={tmp_path / 'tfds'}",
       "--image_size=16", "--workers=2"],
      capture_output=True, text=True, timeout=600,
      cwd=pathlib.Path(__file__).resolve().parent.parent)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [line["split"] for line in lines] == ["train", "validation", "test"]
  assert sum(line["examples"] for line in lines) == 20
  # Every drawn mask has some lung: presence (the label table) is 1 everywhere.
  assert all(line["prevalence"] == {"left_lung": 1.0, "right_lung": 1.0} for line in lines)
