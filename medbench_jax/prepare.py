r"""Prepares a data set once: publisher's files -> validated ArrayRecords.

  python -m medbench_jax.prepare --dataset=chestxray14 --manual_dir=/data/ChestX-ray14 \
      [--data_dir=DIR] [--image_size=256] [--skip_bad] [--workers=N]
  python -m medbench_jax.prepare --dataset=csv_folder --manual_dir=DIR --csv=labels.csv \
      --csv_labels=Effusion,Nodule [--csv_path_column=path] [--csv_split_column=split] \
      [--csv_image_dir=images] [--csv_patient_column=patient]

Every label row and image is checked before anything is written; all problems come
in one report naming file and line (exit status 1). With --skip_bad the rest is
prepared and the skipped count recorded (it reaches results.json's
skipped_examples). A finished preparation is reused; an interrupted one starts
over. Prints one JSON line per split, e.g.
  {"dataset": "chestxray14", "split": "train", "examples": 75312, "skipped": 0,
   "prevalence": {"Atelectasis": 0.097, ...}}
Training (medbench_jax.main) prepares on first use too; this command does it ahead,
with all cores, and shows the report without starting a run.
"""

import contextlib
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

from medbench_jax import config_lib
from medbench_jax.data import builders

_DATASET = flags.DEFINE_enum("dataset", None, sorted(builders.BUILDERS), "Data set name.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Folder holding the data set as its publisher distributes it.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", os.path.join(config_lib.DEFAULT_CACHE, "tfds"),
    "Where the prepared ArrayRecords go (config.dataset.data_dir of the runs).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", config_lib.default_config().dataset.image_size,
    "Stored resolution (config.dataset.image_size of the runs).")
_SKIP_BAD = flags.DEFINE_bool(
    "skip_bad", False, "Prepare the good examples and count the bad ones instead of failing.")
_WORKERS = flags.DEFINE_integer("workers", None, "Decoding processes; default: all cores.")
# --dataset=csv_folder only: the layout (data/builders.py CsvConfig).
_CSV = {key: flags.DEFINE_string(f"csv_{key}" if key != "csv" else "csv", default,
                                 f"csv_folder layout: {key}.")
        for key, default in builders.CsvConfig.OPTIONS.items()}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  start = time.perf_counter()
  try:
    # TFDS prints progress on stdout, which is kept for the JSON lines.
    with contextlib.redirect_stdout(sys.stderr):
      options = ({key: flag.value for key, flag in _CSV.items()}
                 if builders.takes_options(_DATASET.value) else None)
      builder = builders.prepare(_DATASET.value, os.path.expanduser(_MANUAL_DIR.value),
                                 os.path.expanduser(_DATA_DIR.value), _IMAGE_SIZE.value,
                                 skip_bad=_SKIP_BAD.value, workers=_WORKERS.value,
                                 options=options)
  except builders.DataFormatError as e:
    print(e, file=sys.stderr)
    sys.exit(1)
  logging.info("%s ready in %s (%.1f s)", _DATASET.value, builder.data_dir,
               time.perf_counter() - start)
  print(builders.summary_lines(builder), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["dataset", "manual_dir"])
  app.run(main)
