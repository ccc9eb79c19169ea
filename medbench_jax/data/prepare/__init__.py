"""Everything that turns a publisher's files into ArrayRecords, and the calls that run it.

  registry.py     data-set name -> builder, and its task (a leaf: cheap to import)
  errors.py       DataFormatError, RowError, Problems (the one report of a preparation)
  parsing.py      Record; CSVs, label lists, numbers
  images.py       image files -> stored uint8 arrays; finding files by name
  masks.py        mask files, SIIM's RLE, JSRT raw images -> stored channels (SegDecoder)
  dicom.py        DICOM -> grayscale as a radiology viewer shows it
  staging.py      Decoder; decoding every image once, in a process pool
  decoders.py     classification images (files or DICOM) -> stored arrays, square or
                  at their own aspect ratio (keep_aspect)
  base.py         the common builder, ClassificationBuilder, SegmentationBuilder;
                  pixel_tensor; the label table
  phantom.py      the generated phantom chest X-ray set (the default data set)
  families        cxr_lists.py (phantom_cxr, chestxray14, chestxray14_nih, shenzhen_cxr),
                  csv_folder.py, chexpert.py (chexpert, mimic_cxr_jpg), medmnist.py
                  (medmnist_<flag>), dicom_sets.py (vindr_cxr*, rsna_pneumonia*, and
                  the study's lists: vindr_cxr_study, rsna_pneumonia_study),
                  seg_cxr.py (montgomery*, jsrt_*, siim_acr_pneumothorax,
                  phantom_cxr_seg, phantom_cxr_lungs), seg_folders.py (drive, busi,
                  segmentation_folder)

A run's lead process calls `prepare_dataset(config.dataset)` before training (the
others wait at a barrier), then every process reads with data/sources.py. Importing
this package loads neither TFDS nor OpenCV, so that the registry can be read while a
config is parsed: a builder's module loads when `registry.get` first asks for it.

For another data set: subclass ClassificationBuilder or SegmentationBuilder (base.py)
in a family module; set LABELS (CLASSES for segmentation), and EVAL_LABELS, TASK,
CHANNELS, OFFICIAL_SPLITS where they differ; implement `read_records` (report bad
rows with `Problems.add`; parsing.read_csv, read_label_list, parse_number,
images.ImageIndex and data/splits.py's split_by_group help); optionally replace
`decoder()` (a picklable `Decoder`; raise DataFormatError for a bad example, e.g. a
mask whose size differs from its image's) / `example()` / `features()`; add the class
to the module's BUILDERS and a row to registry.py. prepare_dataset, the prepare CLI
and sources.open_splits then work for it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
from typing import Any, TYPE_CHECKING

import ml_collections

from medbench_jax import paths
from medbench_jax.data.prepare import registry

if TYPE_CHECKING:
  from medbench_jax.data.prepare import base

# Generated on first use instead of downloaded; both read the same generated folder.
PHANTOM_DATASETS = ("phantom_cxr", "phantom_cxr_seg", "phantom_cxr_lungs")


def manual_dir_for(dataset_config: ml_collections.ConfigDict) -> str:
  """The folder holding the data set as its publisher distributes it.

  For the phantom, by default a cache folder named after its generation parameters
  and format version, so that each variant is its own data set.
  """
  d = dataset_config
  if d.manual_dir:
    return os.path.expanduser(d.manual_dir)
  if d.name in PHANTOM_DATASETS:
    # OpenCV loads with the phantom module: only phantom runs pay for it here.
    from medbench_jax.data.prepare import phantom
    p = d.phantom
    return os.path.join(paths.CACHE_DIR, "phantom_cxr",
                        f"seed{p.seed}_{p.num_train}-{p.num_val}-{p.num_test}_{p.image_size}px"
                        f"_v{phantom.FORMAT_VERSION}")
  raise ValueError(f"config.dataset.manual_dir is required for {d.name!r}: "
                   "the folder holding the data set as its publisher distributes it.")


def data_dir_for(dataset_config: ml_collections.ConfigDict) -> str:
  """Where the prepared ArrayRecords of the data set live."""
  d = dataset_config
  if d.data_dir:
    return os.path.expanduser(d.data_dir)
  if d.name in PHANTOM_DATASETS:
    # Each generated variant is its own data set: keep its prepared copy beside it.
    return os.path.join(manual_dir_for(d), "prepared")
  return os.path.join(paths.CACHE_DIR, "tfds")


def get_builder(name: str, image_size: int, data_dir: str | os.PathLike,
                options: Mapping[str, Any] | None = None, *,
                keep_aspect: bool = False) -> base.PreparedBuilder:
  """The TFDS builder of a registry name at a stored resolution (prepared or not).

  options: the layout description of builders that take one (csv_folder: see
  csv_folder.CsvConfig); an error for the others. keep_aspect: images at their own
  aspect ratio within image_size (decoders.py) instead of square.
  """
  builder_cls = registry.get(name)
  if options and not builder_cls.TAKES_OPTIONS:
    raise ValueError(f"Dataset {name!r} takes no options, got {dict(options)}")
  return builder_cls(data_dir=os.fspath(data_dir),
                     config=builder_cls.config_for(image_size, options, keep_aspect),
                     file_format="array_record")


def builder_for(dataset_config: ml_collections.ConfigDict) -> base.PreparedBuilder:
  """The builder of the configured data set, resolution and data_dir (prepared or not)."""
  d = dataset_config
  options = d.csv.to_dict() if registry.get(d.name).TAKES_OPTIONS else None
  return get_builder(d.name, d.image_size, data_dir_for(d), options,
                     keep_aspect=d.keep_aspect)


def prepare_dataset(dataset_config: ml_collections.ConfigDict, *,
                    workers: int | None = None) -> base.PreparedBuilder:
  """Generates the phantom (idempotent) and prepares the data set once; returns the builder.

  A finished preparation is reused; an interrupted one is redone. workers: decoding
  processes (default: every core of this machine). Raises DataFormatError listing
  every problem of the publisher's files (unless dataset_config.skip_bad).
  """
  d = dataset_config
  manual_dir = manual_dir_for(d)
  if d.name in PHANTOM_DATASETS:

    from medbench_jax.data.prepare import phantom
    from medbench_jax.data.prepare import staging
    p = d.phantom
    phantom.generate(manual_dir, seed=p.seed, num_train=p.num_train, num_val=p.num_val,
                     num_test=p.num_test, image_size=p.image_size,
                     workers=workers or staging.default_workers())
  return builder_for(d).prepare_once(manual_dir, skip_bad=d.skip_bad, workers=workers)


def split_summaries(name: str, builder: base.PreparedBuilder) -> list[dict[str, Any]]:
  """One summary per split (examples, skipped, prevalence) from the prepared metadata."""
  meta = builder.info.metadata
  return [{"dataset": name, "split": split, "examples": meta["examples"][split],
           "skipped": meta["skipped"][split], "prevalence": meta["prevalence"][split]}
          for split in meta["examples"]]


def summary_lines(name: str, builder: base.PreparedBuilder) -> str:
  """The summaries as JSON lines, as the prepare CLI prints them."""
  return "\n".join(json.dumps(s) for s in split_summaries(name, builder))
