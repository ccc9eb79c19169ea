"""The config schema shared by every file in configs/, its arg parser and its checks.

Config files start from `default_config()` and change a few fields, so every run
has the same keys; the dict is locked, so `--config.typo=1` fails naming the key.
`check` and `check_model_name` word every config error alike; `config_checks.validate`
(entry level) has each component check its own section before any work starts. This
module is a leaf: every config file imports it, and it imports nothing of the package
except, inside `normalization`, the model registry.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
from typing import Any

import ml_collections

from medbench_jax.pixel_stats import NORMALIZATIONS

# The mean/std of the model's own pretrained config (e.g. SimCLR's 0/1).
MODEL_NORMALIZATION = "model"
NONFINITE_POLICIES = ("stop", "skip")
# Segmentation models are named <decoder>_<encoder>; the rest classify.
SEGMENTATION_DECODERS = ("unet", "upernet")


def default_config() -> ml_collections.ConfigDict:
  """Every key of a run with its default, one helper per section; the dict is locked."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_trials = 1
  _add_dataset(c)
  _add_input(c)
  _add_model(c)
  _add_segmentation(c)
  _add_mesh(c)
  _add_optim(c)
  _add_train(c)
  _add_eval(c)
  c.lock()
  return c


def _add_dataset(c: ml_collections.ConfigDict) -> None:
  """config.dataset: the data set, where it lives, and its labels' policies."""
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "phantom_cxr"
  # Folder with the data set as its publisher distributes it (generated for the phantom).
  c.dataset.manual_dir = ""  # "" -> generated under paths.CACHE_DIR (phantom sets only)
  c.dataset.data_dir = ""  # prepared ArrayRecords; "" -> paths.CACHE_DIR/tfds
  c.dataset.image_size = 256  # stored resolution of the prepared copy
  # False: images stored image_size x image_size. True: each at its own aspect ratio,
  # shrunk (never enlarged) until its longer side fits image_size; with image_size at
  # the publisher's resolution, training crops come from the original pixels.
  c.dataset.keep_aspect = False
  c.dataset.label_fraction = 1.0
  # stratified: a subset stratified on the label combination; study: the reference
  # study's rule, random.Random(label_fraction_seed).shuffle, first int(N * percent / 100).
  c.dataset.label_fraction_method = "stratified"
  c.dataset.label_fraction_seed = 0  # fixed across models so comparisons are paired
  # Splits the fraction is taken of: "train", or e.g. "train,validation,test".
  c.dataset.label_fraction_splits = "train"
  # Bad files/rows: False fails listing them all; True prepares the rest and counts them.
  c.dataset.skip_bad = False
  # Uncertain (-1) and blank labels (CheXpert, MIMIC-CXR); see data/labels.py.
  c.dataset.uncertain_policy = "u_ones"  # u_ones | u_zeros | lsr_ones | lsr_zeros
  # LSR policies: per_read draws an example's uncertain labels anew whenever it is read
  # (every epoch); once: one draw per run, from label_fraction_seed.
  c.dataset.lsr_draw = "per_read"
  # Validation targets: hard (uncertain -> 1 for *_ones, 0 for *_zeros) or policy
  # (the training policy, LSR included, as the reference applies it).
  c.dataset.validation_labels = "hard"
  c.dataset.blank_label = 0.0
  c.dataset.frontal_only = False
  # Layout of dataset.name="csv_folder" (data/prepare/csv_folder.py); labels: "A,B,C".
  c.dataset.csv = ml_collections.ConfigDict(dict(
      csv="labels.csv", image_dir="", path_column="path", labels="", split_column="split",
      patient_column=""))
  c.dataset.phantom = ml_collections.ConfigDict(dict(
      seed=0, num_train=3000, num_val=500, num_test=1000, image_size=256))


def _add_input(c: ml_collections.ConfigDict) -> None:
  """config.input: batches and the preprocessing specs (data/transforms.py)."""
  c.input = ml_collections.ConfigDict()
  c.input.batch_size = 64  # global, across all devices and processes
  c.input.eval_batch_size = 64
  c.input.num_workers = 2  # grain worker processes per host (training); reader threads (evaluation)
  c.input.pp_train = "random_resized_crop(224)|flip_lr|rotate(7)"
  c.input.pp_eval = "resize(256)|center_crop(224)"
  c.input.pp_test = "resize(256)|ten_crop(224)"
  c.input.normalization = "imagenet"  # imagenet | chestxray | none | model
  # True: the host ships the stored images and pp_train runs inside the jitted train
  # step, on the accelerators (data/device_transforms.py lists the ops it can run).
  c.input.augment_on_device = False


def _add_model(c: ml_collections.ConfigDict) -> None:
  """config.model: the architecture, its initial weights and its compute dtype."""
  c.model = ml_collections.ConfigDict()
  c.model.name = "swin_base_patch4_window7_224"
  # "random", a checkpoint file (format detected; FORMAT:PATH names it, e.g.
  # dino_student:/ckpt/dino.pth), a directory written by medbench_jax.convert,
  # run:WORKDIR[/trial_K] (the encoder of an earlier run's best checkpoint) or
  # timm:NAME.TAG (Hugging Face hub cache). See medbench_jax/weights/__init__.py.
  c.model.init = "random"
  # Compute dtype: bfloat16 computes activations in bf16 while parameters, optimizer state,
  # norm layers' statistics, softmax and losses stay float32.
  c.model.dtype = "float32"
  c.model.kw = ml_collections.ConfigDict()  # extra keyword args for models.create


def _add_segmentation(c: ml_collections.ConfigDict) -> None:
  """config.segmentation: the loss of segmentation tasks."""
  # Segmentation data sets only (tasks/segmentation.py): "auto" is the reference study's
  # choice, Dice (BCE for DRIVE); or dice | bce | bce_dice | softmax_ce_dice. val_loss,
  # the validation loss early stopping watches: per_image (each image's own loss, averaged)
  # or pooled (the study's: pooled over batches of input.batch_size images).
  c.segmentation = ml_collections.ConfigDict(dict(loss="auto", val_loss="per_image"))


def _add_mesh(c: ml_collections.ConfigDict) -> None:
  """config.mesh: how devices share the batch and the parameters."""
  # Devices: data parallel over `data`; fsdp > 1 shards the large parameters and their
  # optimizer state over groups of that many devices (trainer/sharding.py).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1
  c.mesh.fsdp_rules = (
      (r"(^|/)(kernel|embedding|pos_embed|relative_position_bias_table)$", "largest"),
      (r".*", "replicate"))
  c.mesh.fsdp_min_size = 2**20  # elements; smaller tensors stay replicated


def _add_optim(c: ml_collections.ConfigDict) -> None:
  """config.optim: optimizer and learning-rate schedule (trainer/optim.py)."""
  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = "adam"
  c.optim.lr = 2e-4
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.momentum = 0.9  # sgd only
  c.optim.nesterov = False
  c.optim.grad_clip_norm = 0.0  # 0 = off
  c.optim.schedule = "plateau"
  c.optim.plateau_factor = 0.5
  c.optim.warmup_steps = 0
  c.optim.warmup_epochs = 0.0  # > 0: warmup in epochs (overrides warmup_steps)
  c.optim.min_lr_ratio = 0.0


def _add_train(c: ml_collections.ConfigDict) -> None:
  """config.train: the loop's length, cadence, early stopping and failure policy."""
  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 200
  c.train.eval_every_steps = 0  # 0 = once per epoch
  # Early stopping (the study's rule): stop at the (patience + 1)-th evaluation in a row
  # without a lower val loss; the plateau schedule multiplies the lr by
  # optim.plateau_factor at the (patience // 2 + 1)-th (ReduceLROnPlateau, patience // 2).
  c.train.patience = 10
  c.train.log_every_steps = 50
  # A step whose loss or gradients are not finite: "stop" ends the run naming the step,
  # its learning rate and its batch's statistics (the latest checkpoint is from before
  # it); "skip" leaves the state as it was and counts the step in results.json.
  c.train.nonfinite = "stop"
  c.train.max_steps = 0  # 0 = num_epochs worth of steps; >0 caps (smoke tests)
  c.train.test_tta = True  # use input.pp_test (ten crops) instead of pp_eval at test
  # "START:STOP": capture a profiler trace of steps [START, STOP) into the trial's
  # TensorBoard folder (TensorBoard's profile plugin shows it); "" = off.
  c.train.profile_steps = ""
  # Trials trained together as one vmapped program (trainer/packed.py): 1 = one after
  # another; N = groups of N; "auto" = as many as the compiled step's memory allows.
  c.train.pack_trials = ml_collections.FieldReference(1, field_type=object)  # int | "auto"
  # Grad-CAM overlays of this many fixed validation images at every validation
  # (TensorBoard val/gradcam; classification); 0 = off.
  c.train.gradcam_images = 8


def _add_eval(c: ml_collections.ConfigDict) -> None:
  """config.eval: what each trial adds to its result.json after its test (Task.post_hoc)."""
  c.eval = ml_collections.ConfigDict()
  # Classification: per-class thresholds chosen on validation, "youden" (max sensitivity +
  # specificity - 1), "f1", "sensitivity:T" or "specificity:T" (a target T in (0, 1]).
  c.eval.threshold_rule = "youden"
  # Percentile bootstrap resamples of the test set behind the operating points' intervals
  # (0: no intervals).
  c.eval.bootstrap_resamples = 1000


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses big_vision-style config args: "model=swin_base_patch4_window7_224,paper".

  A bare word sets a boolean flag. Every key must be one of `defaults`.
  """
  result = dict(defaults)
  for part in (arg or "").split(","):
    if not part.strip():
      continue
    key, sep, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config arg {key!r} in {arg!r}; allowed: {sorted(defaults)}")
    if not sep:
      result[key] = True
    elif isinstance(defaults[key], bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config arg {key}={value!r} must be a boolean")
      result[key] = value.lower() in ("true", "1")
    else:
      result[key] = type(defaults[key])(value)
  return ml_collections.ConfigDict(result)


def check(condition: bool, key: str, value: Any, allowed: Any) -> None:
  """Raises a ValueError naming config.`key`, its value and what is allowed."""
  if not condition:
    raise ValueError(f"config.{key}={value!r} is not allowed; allowed: {allowed}")


def check_model_name(name: str, available: Sequence[str]) -> None:
  """A registered model, or an error listing the names of its family (upernet_*, ...)."""
  if name in available:
    return
  family, _, rest = name.partition("_")
  members = [m for m in available if m.startswith(family + "_")] if rest else []
  if not members:
    check(False, "model.name", name, list(available))
  note = (f" {rest} is a registered model, but not with {family}." if rest in available
          else "")
  raise ValueError(f"config.model.name={name!r} is not a registered model.{note} The "
                   f"registered {family}_* models: {', '.join(members)}")


def normalization(config: ml_collections.ConfigDict) -> dict[str, tuple[float, ...]]:
  """{"mean", "std"} (RGB) of `config.input.normalization`."""
  name = config.input.normalization
  if name == MODEL_NORMALIZATION:
    from medbench_jax import models
    cfg = models.pretrained_cfg(config.model.name)
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
  mean, std = NORMALIZATIONS[name]
  return {"mean": mean, "std": std}


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """The resolved config as plain JSON types (config.json, results.json)."""
  return json.loads(config.to_json_best_effort())
