"""Config checks before any work starts: each component checks its own section.

The entry points (main, evaluate, probe, sweep, bench) call `validate`; it sits above
the components it asks (models, data, trainer), so that `config_lib`, which every
config file imports, stays a leaf.
"""

import ml_collections

from medbench_jax import config_lib
from medbench_jax import models
from medbench_jax.config_lib import check
from medbench_jax.data import device_transforms
from medbench_jax.data import sources
from medbench_jax.data import transforms
from medbench_jax.data.prepare import registry as data_registry
from medbench_jax.tasks import classification
from medbench_jax.tasks import segmentation
from medbench_jax.trainer import optim
from medbench_jax.trainer import sharding


def check_task_of_model(model_name: str, dataset_name: str) -> None:
  """Segmentation models go with segmentation data sets, classifiers with the others."""
  if dataset_name not in data_registry.names():
    return  # named by the data set's own check
  segmentation_model = model_name.partition("_")[0] in config_lib.SEGMENTATION_DECODERS
  segmentation_data = data_registry.task_of(dataset_name) == "segmentation"
  if segmentation_model != segmentation_data:
    needs = ("a segmentation model (" + ", ".join(f"{d}_<encoder>" for d in
                                                 config_lib.SEGMENTATION_DECODERS) + ")"
             if segmentation_data else "a classification model")
    raise ValueError(
        f"config.model.name={model_name!r} is a "
        f"{'segmentation' if segmentation_model else 'classification'} model, but "
        f"config.dataset.name={dataset_name!r} is a {data_registry.task_of(dataset_name)} data "
        f"set, which needs {needs}.")


def validate(config: ml_collections.ConfigDict, *, model_fits_task: bool = True) -> None:
  """Fails before any work starts, naming the key and the allowed values.

  model_fits_task: the model must be one the data set's task trains (a segmentation model
  for masks); off where the model is only a feature extractor (probe).
  """
  config_lib.check_model_name(config.model.name, models.list_models())
  if model_fits_task:
    check_task_of_model(config.model.name, config.dataset.name)
  check(config.model.dtype in ("float32", "bfloat16"), "model.dtype", config.model.dtype,
        ("float32", "bfloat16"))
  sources.validate_dataset_config(config.dataset)
  segmentation.validate(config)
  classification.validate(config)
  optim.validate(config.optim)
  sharding.validate(config)
  normalizations = (*config_lib.NORMALIZATIONS, config_lib.MODEL_NORMALIZATION)
  check(config.input.normalization in normalizations, "input.normalization",
        config.input.normalization, normalizations)
  for key in ("num_trials", "input.batch_size", "input.eval_batch_size", "train.num_epochs"):
    value = config
    for part in key.split("."):
      value = value[part]
    check(isinstance(value, int) and value > 0, key, value, "a positive integer")
  check(config.input.num_workers >= 0, "input.num_workers", config.input.num_workers, ">= 0")
  check(config.train.patience >= 0, "train.patience", config.train.patience, ">= 0")
  check(config.train.log_every_steps >= 1, "train.log_every_steps",
        config.train.log_every_steps, ">= 1")
  for key in ("eval_every_steps", "max_steps"):
    check(config.train[key] >= 0, f"train.{key}", config.train[key], ">= 0 (0: default)")
  check(config.train.nonfinite in config_lib.NONFINITE_POLICIES, "train.nonfinite",
        config.train.nonfinite, config_lib.NONFINITE_POLICIES)
  profile = config.train.profile_steps
  check(not profile or (len(parts := profile.split(":")) == 2 and all(
      p.isdigit() for p in parts) and int(parts[0]) < int(parts[1])),
        "train.profile_steps", profile, '"" or "START:STOP" with START < STOP')
  check(config.train.gradcam_images >= 0, "train.gradcam_images",
        config.train.gradcam_images, ">= 0 (0: off)")
  pack = config.train.pack_trials
  check(pack == "auto" or (isinstance(pack, int) and not isinstance(pack, bool) and pack >= 1),
        "train.pack_trials", pack, 'a positive integer or "auto"')
  check(pack == 1 or not profile, "train.pack_trials", pack,
        "1 while train.profile_steps is set (profiles are of one trial's steps)")
  for key in ("pp_train", "pp_eval", "pp_test"):
    try:
      transforms.parse(config.input[key])
    except ValueError as e:
      raise ValueError(f"config.input.{key}: {e}") from None
  if config.input.augment_on_device:
    try:
      device_transforms.device_ops(config.input.pp_train)
    except ValueError as e:
      raise ValueError(f"config.input.pp_train: {e}") from None
