"""The config schema shared by every file in configs/, its arg parser and its checks.

Config files start from `default_config()` and change a few fields, so every run
has the same keys; the dict is locked, so `--config.typo=1` fails naming the key.
"""

from __future__ import annotations

from typing import Any

import ml_collections

NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # ChestX-ray14 statistics used by the reference study's "chestx-ray" option.
    "chestxray": ((0.5056, 0.5056, 0.5056), (0.252, 0.252, 0.252)),
}


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_trials = 1

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "phantom_cxr"
  # Folder with the data set as its publisher distributes it (generated for the phantom).
  c.dataset.manual_dir = ""  # required, except for the phantom (generated in the cache)
  c.dataset.data_dir = ""  # prepared ArrayRecords; "" -> ~/.cache/medbench_jax/tfds
  c.dataset.image_size = 256  # stored resolution of the prepared copy
  c.dataset.label_fraction = 1.0
  c.dataset.label_fraction_seed = 0  # fixed across models so comparisons are paired
  # Bad files/rows: False fails listing them all; True prepares the rest and counts them.
  c.dataset.skip_bad = False
  # Uncertain (-1) and blank labels (CheXpert, MIMIC-CXR); see data/labels.py.
  c.dataset.uncertain_policy = "u_ones"  # u_ones | u_zeros | lsr_ones | lsr_zeros
  c.dataset.blank_label = 0.0
  c.dataset.frontal_only = False
  # Layout of dataset.name="csv_folder" (data/prepare/csv_folder.py); labels: "A,B,C".
  c.dataset.csv = ml_collections.ConfigDict(dict(
      csv="labels.csv", image_dir="", path_column="path", labels="", split_column="split",
      patient_column=""))
  c.dataset.phantom = ml_collections.ConfigDict(dict(
      seed=0, num_train=3000, num_val=500, num_test=1000, image_size=256))

  c.input = ml_collections.ConfigDict()
  c.input.batch_size = 64  # global, across all devices and processes
  c.input.eval_batch_size = 64
  c.input.num_workers = 2  # grain worker processes per host
  c.input.pp_train = "random_resized_crop(224)|flip_lr|rotate(7)"
  c.input.pp_eval = "resize(256)|center_crop(224)"
  c.input.pp_test = "resize(256)|ten_crop(224)"
  c.input.normalization = "imagenet"

  c.model = ml_collections.ConfigDict()
  c.model.name = "swin_base_patch4_window7_224"
  # "random", a checkpoint file (format detected; FORMAT:PATH names it, e.g.
  # dino_student:/ckpt/dino.pth), a directory written by medbench_jax.convert,
  # run:WORKDIR[/trial_K] (the encoder of an earlier run's best checkpoint) or
  # timm:NAME.TAG (Hugging Face hub cache). See medbench_jax/weights/__init__.py.
  c.model.init = "random"
  c.model.dtype = "float32"  # compute dtype; parameters stay float32
  c.model.kw = ml_collections.ConfigDict()  # extra keyword args for models.create

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
  c.optim.min_lr_ratio = 0.0

  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 200
  c.train.eval_every_steps = 0  # 0 = once per epoch
  # Early stopping: stop after this many evaluations without a lower val loss;
  # the plateau schedule halves the lr after patience // 2 (the study's rule).
  c.train.patience = 10
  c.train.log_every_steps = 50
  c.train.max_steps = 0  # 0 = num_epochs worth of steps; >0 caps (smoke tests)
  c.train.test_tta = True  # use input.pp_test (ten crops) instead of pp_eval at test

  c.lock()
  return c


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


def _check(condition: bool, key: str, value: Any, allowed: Any) -> None:
  if not condition:
    raise ValueError(f"config.{key}={value!r} is not allowed; allowed: {allowed}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails before any work starts, naming the key and the allowed values."""
  from medbench_jax import models  # pylint: disable=g-import-not-at-top
  from medbench_jax import optim  # pylint: disable=g-import-not-at-top
  from medbench_jax.data import labels  # pylint: disable=g-import-not-at-top
  from medbench_jax.data import transforms  # pylint: disable=g-import-not-at-top
  from medbench_jax.data.prepare import registry  # pylint: disable=g-import-not-at-top

  _check(config.model.name in models.list_models(), "model.name", config.model.name,
         models.list_models())
  # The fine-tuning loop trains classifiers; segmentation sets are prepared for decoders.
  classification = [name for name in registry.names()
                    if registry.task_of(name) != "segmentation"]
  _check(config.dataset.name in classification, "dataset.name", config.dataset.name,
         f"classification data sets {classification}")
  _check(0.0 < config.dataset.label_fraction <= 1.0, "dataset.label_fraction",
         config.dataset.label_fraction, "0 < x <= 1")
  _check(config.dataset.uncertain_policy in labels.UNCERTAIN_POLICIES,
         "dataset.uncertain_policy", config.dataset.uncertain_policy,
         labels.UNCERTAIN_POLICIES)
  _check(config.input.normalization in NORMALIZATIONS, "input.normalization",
         config.input.normalization, sorted(NORMALIZATIONS))
  _check(config.optim.optimizer in optim.OPTIMIZERS, "optim.optimizer",
         config.optim.optimizer, optim.OPTIMIZERS)
  _check(config.optim.schedule in optim.SCHEDULES, "optim.schedule",
         config.optim.schedule, optim.SCHEDULES)
  _check(config.model.dtype in ("float32", "bfloat16"), "model.dtype", config.model.dtype,
         ("float32", "bfloat16"))
  for key in ("num_trials", "input.batch_size", "input.eval_batch_size", "train.num_epochs",
              "dataset.image_size"):
    value = config
    for part in key.split("."):
      value = value[part]
    _check(isinstance(value, int) and value > 0, key, value, "a positive integer")
  _check(config.input.num_workers >= 0, "input.num_workers", config.input.num_workers, ">= 0")
  _check(config.train.patience >= 0, "train.patience", config.train.patience, ">= 0")
  for key in ("pp_train", "pp_eval", "pp_test"):
    try:
      transforms.parse(config.input[key])
    except ValueError as e:
      raise ValueError(f"config.input.{key}: {e}") from None


DATASET_ALIASES = {"phantom": "phantom_cxr", "chestxray14": "chestxray14"}


def classification_config(arg: str | None, *, paper_model: str,
                          demo_model: str) -> ml_collections.ConfigDict:
  """The config every classification file in configs/ builds on.

  Args (comma-separated): model=NAME, data=phantom|NAME (a data/prepare/registry.py
  name: chestxray14, chexpert, ...), init=random|PATH,
  trials=N, label_fraction=F (alias anno_percent=P, in percent as the study's
  code takes it), paper (the study's full-size settings even on phantom data).
  With data=phantom and no `paper`, the run is sized for a 2-core CPU (see demo()).
  """
  args = parse_arg(arg, model="", data="phantom", init="random", trials=1,
                   label_fraction=1.0, anno_percent=0.0, paper=False)
  from medbench_jax.data.prepare import registry  # pylint: disable=g-import-not-at-top
  allowed = sorted(set(DATASET_ALIASES) | set(registry.names()))
  if args.data not in allowed:
    raise ValueError(f"Unknown config arg data={args.data!r}; allowed: {allowed}")
  config = default_config()
  config.dataset.name = DATASET_ALIASES.get(args.data, args.data)
  config.model.init = args.init
  config.num_trials = args.trials
  config.dataset.label_fraction = (args.anno_percent / 100.0 if args.anno_percent
                                   else args.label_fraction)
  if args.data == "phantom" and not args.paper:
    demo(config)
    config.model.name = args.model or demo_model
  else:
    config.model.name = args.model or paper_model
  return config


def demo(config: ml_collections.ConfigDict) -> None:
  """Shrinks a run to about 10 minutes on a 2-core CPU, keeping every stage of the study.

  Differences from the paper's setting: a small random-init Swin (48-dim, 2-2-2-2
  blocks) at 96 px instead of an ImageNet-pretrained one at 224 px; 112 px stored images
  (resize 112 / crop 96 mirrors the paper's 256 / 224); training crops are the centre
  crop with horizontal flips instead of random resized crops and rotation, because a
  transformer trained from scratch for a few epochs learns the small findings (nodule,
  pneumothorax) markedly faster without them; AdamW 3e-4 with warmup + cosine over a
  fixed 15 epochs (the paper: Adam 2e-4, reduce-on-plateau, up to 200 epochs with
  early stopping on the validation loss). The paper's augmentation on the demo model:
  `--config.input.pp_train="random_resized_crop(96)|flip_lr|rotate(7)"`.
  """
  config.dataset.image_size = 112
  config.input.batch_size = 32
  config.input.eval_batch_size = 100
  config.input.pp_train = "resize(112)|center_crop(96)|flip_lr"
  config.input.pp_eval = "resize(112)|center_crop(96)"
  config.input.pp_test = "resize(112)|ten_crop(96)"
  config.optim.optimizer = "adamw"
  config.optim.lr = 3e-4
  config.optim.weight_decay = 0.05
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_steps = 100
  config.train.num_epochs = 15
  config.train.patience = 15
  config.train.log_every_steps = 20
