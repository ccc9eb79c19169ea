"""Medical image data: a publisher's files -> prepared ArrayRecords -> batches.

  prepare/        publishers' layouts -> validated ArrayRecords, once (TFDS builders per
                  family, the phantom, DICOM); prepare/registry.py lists the data sets
  splits.py       the one rule for splits publishers do not give; the patient check
  labels.py       label policies (uncertain, blank) and label-fraction subsets
  sources.py      a prepared data set opened for a run: splits, DatasetInfo, subset
  pipeline.py     grain pipelines: shuffle, shard by process, augment, batch `keys`
  transforms.py   preprocessing ops on an example (image, mask, FOV), composed by spec
  seg_augment.py  the study's segmentation augmentation (albumentations), an op

Data flow: prepare.prepare_dataset (a run's lead process, or `python -m
medbench_jax.prepare`) writes the ArrayRecords and the label table; every process then
calls sources.open_splits, which reads them and applies labels.py; pipeline.py turns
a split into batches with transforms.py. Imports run one way (no module here imports
one that imports it back): the builders -> splits -> prepare/errors.py; sources ->
prepare, labels, splits; pipeline -> transforms -> seg_augment. prepare/registry.py
imports nothing of the package.
"""
