r"""Prepares a data set once: publisher's files -> validated ArrayRecords.

  python -m medbench_jax.prepare --dataset=chestxray14 --manual_dir=/data/ChestX-ray14 \
      [--data_dir=DIR] [--image_size=256] [--keep_aspect] [--skip_bad] [--workers=N]
  python -m medbench_jax.prepare --dataset=csv_folder --manual_dir=DIR --csv=labels.csv \
      --csv_labels=Effusion,Nodule [--csv_path_column=path] [--csv_split_column=split] \
      [--csv_image_dir=images] [--csv_patient_column=patient]
  python -m medbench_jax.prepare --list

Every label row and image is checked before anything is written; all problems come
in one report naming file and line (exit status 1). With --skip_bad the rest is
prepared and the skipped count recorded (it reaches results.json's
skipped_examples). A finished preparation is reused; an interrupted one starts
over. Prints one JSON line per split, e.g.
  {"dataset": "chestxray14", "split": "train", "examples": 75312, "skipped": 0,
   "prevalence": {"Atelectasis": 0.097, ...}}
Training (medbench_jax.main) prepares on first use too; this command does it ahead,
with all cores, and shows the report without starting a run. For the phantom sets
(phantom_cxr, phantom_cxr_seg), --manual_dir is the generated folder: a phantom found
there is prepared as it was generated, an empty folder gets the default one.

--list prints every data set with its task, access tier (open, registration,
credentialed, user), whether its terms allow publishing trained models, licence, URL
and citation (data/prepare/licences.py), and prepares nothing.
"""

import contextlib
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import ml_collections

from medbench_jax import config_lib
from medbench_jax import paths
from medbench_jax.data import prepare
from medbench_jax.data.prepare import licences
from medbench_jax.data.prepare import registry
from medbench_jax.data.prepare.errors import DataFormatError

# The csv_folder layout options and their defaults, as a run's config has them.
_DEFAULTS = config_lib.default_config().dataset

_DATASET = flags.DEFINE_enum("dataset", None, registry.names(), "Data set name.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Folder holding the data set as its publisher distributes it.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "Where the prepared ArrayRecords go (config.dataset.data_dir of the "
    f"runs); default: where runs look ({os.path.join(paths.CACHE_DIR, 'tfds')}, "
    "for the phantom beside its generated folder).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", _DEFAULTS.image_size,
    "Stored resolution (config.dataset.image_size of the runs).")
_KEEP_ASPECT = flags.DEFINE_bool(
    "keep_aspect", _DEFAULTS.keep_aspect,
    "Store each image at its own aspect ratio within image_size, never enlarged "
    "(config.dataset.keep_aspect; the paper setting: --image_size=1024 --keep_aspect).")
_SKIP_BAD = flags.DEFINE_bool(
    "skip_bad", False, "Prepare the good examples and count the bad ones instead of failing.")
_LIST = flags.DEFINE_bool(
    "list", False, "Print the data sets with their licence, access tier and citation; "
    "prepare nothing.")
_WORKERS = flags.DEFINE_integer("workers", None, "Decoding processes; default: all cores.")
# --dataset=csv_folder only: the layout (data/prepare/csv_folder.py CsvConfig).
_CSV = {key: flags.DEFINE_string(f"csv_{key}" if key != "csv" else "csv", default,
                                 f"csv_folder layout: {key}.")
        for key, default in _DEFAULTS.csv.items()}


def dataset_config() -> ml_collections.ConfigDict:
  """The flags as a run's config.dataset."""
  d = config_lib.default_config().dataset
  d.update(name=_DATASET.value, manual_dir=_MANUAL_DIR.value, data_dir=_DATA_DIR.value,
           image_size=_IMAGE_SIZE.value, keep_aspect=_KEEP_ASPECT.value,
           skip_bad=_SKIP_BAD.value)
  d.csv.update({key: flag.value for key, flag in _CSV.items()})
  if d.name in prepare.PHANTOM_DATASETS:
    from medbench_jax.data.prepare import phantom
    generated = phantom.generated_params(os.path.expanduser(d.manual_dir))
    if generated:
      d.phantom.update({key: generated[key] for key in d.phantom.keys()})
  return d


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _LIST.value:
    print(licences.format_table(licences.table()), flush=True)
    return
  missing = [f"--{f.name}" for f in (_DATASET, _MANUAL_DIR) if not f.value]
  if missing:
    raise app.UsageError(f"{' and '.join(missing)} required (or --list)")
  start = time.perf_counter()
  try:
    # TFDS prints progress on stdout, which is kept for the JSON lines.
    with contextlib.redirect_stdout(sys.stderr):
      builder = prepare.prepare_dataset(dataset_config(), workers=_WORKERS.value)
  except DataFormatError as e:
    print(e, file=sys.stderr)
    sys.exit(1)
  logging.info("%s ready in %s (%.1f s)", _DATASET.value, builder.data_dir,
               time.perf_counter() - start)
  print(prepare.summary_lines(_DATASET.value, builder), flush=True)


if __name__ == "__main__":
  app.run(main)
