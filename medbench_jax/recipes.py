"""The settings the files in configs/ are made of: a CPU demo on the phantom data and the
reference study's protocol, per task.

Each configs/ file is `get_config(arg)` calling one of these with its model names; the
arg (comma-separated, big_vision style) picks the variant:
  model=NAME          a registered model (timm's names; unet_*/upernet_* for segmentation)
  data=NAME           phantom (default) or a data set of data/prepare/registry.py
  init=SOURCE         random, or any weights source (checkpoint file, FORMAT:PATH, convert
                      folder, run:WORKDIR, timm:NAME.TAG)
  trials=N            repeated trials (seeds seed, seed+1, ...)
  label_fraction=F    share of the training labels (alias anno_percent=P, in percent as
                      the study's code takes it)
  paper               the study's full-size setting even on the phantom data
With data=phantom and no `paper`, the run is sized for a 2-core CPU.
"""

from __future__ import annotations

import ml_collections

from medbench_jax import config_lib

# Short names users type -> data sets.
CLASSIFICATION_ALIASES = {"phantom": "phantom_cxr"}
SEGMENTATION_ALIASES = {"phantom": "phantom_cxr_lungs", "siim": "siim_acr_pneumothorax"}


def _common(arg: str | None, aliases: dict[str, str], task: str
            ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """The default config with the arg's data set, init, trials and label fraction."""
  args = config_lib.parse_arg(arg, model="", data="phantom", init="random", trials=1,
                              label_fraction=1.0, anno_percent=0.0, paper=False)
  from medbench_jax.data.prepare import registry  # pylint: disable=g-import-not-at-top
  names = {n for n in registry.names() if (registry.task_of(n) == "segmentation") ==
           (task == "segmentation")}
  allowed = sorted(set(aliases) | names)
  if args.data not in allowed:
    raise ValueError(f"Unknown config arg data={args.data!r} for {task}; allowed: {allowed}")
  config = config_lib.default_config()
  config.dataset.name = aliases.get(args.data, args.data)
  config.model.init = args.init
  config.num_trials = args.trials
  config.dataset.label_fraction = (args.anno_percent / 100.0 if args.anno_percent
                                   else args.label_fraction)
  return config, args


def classification_config(arg: str | None, *, paper_model: str,
                          demo_model: str) -> ml_collections.ConfigDict:
  """The config every classification file in configs/ builds on (args: module docstring)."""
  config, args = _common(arg, CLASSIFICATION_ALIASES, "classification")
  if args.data == "phantom" and not args.paper:
    classification_demo(config)
    config.model.name = args.model or demo_model
  else:
    config.model.name = args.model or paper_model
  return config


def classification_demo(config: ml_collections.ConfigDict) -> None:
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
  config.input.eval_batch_size = 128  # a multiple of 1, 2, 4, 8, ... devices
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


# The study trains DRIVE at 512 px, every other segmentation set at 224 px.
_SEGMENTATION_SIZE = {"drive": 512}


def segmentation_config(arg: str | None, *, paper_model: str, demo_model: str,
                        demo_kw: dict | None = None) -> ml_collections.ConfigDict:
  """The config every segmentation file in configs/ builds on (args: module docstring).

  demo_kw: model keyword arguments of the CPU demo (a smaller decoder, say).
  """
  config, args = _common(arg, SEGMENTATION_ALIASES, "segmentation")
  if args.data == "phantom" and not args.paper:
    segmentation_demo(config)
    config.model.name = args.model or demo_model
    config.model.kw = ml_collections.ConfigDict(demo_kw or {})
  else:
    segmentation_paper(config)
    config.model.name = args.model or paper_model
  return config


def segmentation_paper(config: ml_collections.ConfigDict) -> None:
  """The study's segmentation protocol (BenchmarkTransferLearning main_segmentation.py,
  engine.py; BenchmarkTransformers for UperNet):

  images and masks at 224 px (DRIVE 512); the study's augmentation (brightness/contrast or
  gamma p=0.3; elastic, grid or optical distortion p=0.3; random sized crop 156-224 -> 224
  p=0.25), none for DRIVE; Dice loss (BCE for DRIVE); AdamW lr 2e-4 with PyTorch's
  default weight decay 0.01, 20 warmup epochs then cosine to 0 over 500 epochs; early
  stopping on the validation loss with patience 50 (evaluated every epoch); batch 32
  (DRIVE's 16 training images: 16); test on the full image, no test-time augmentation.
  """
  size = _SEGMENTATION_SIZE.get(config.dataset.name, 224)
  config.dataset.image_size = size
  config.input.batch_size = 16 if config.dataset.name == "drive" else 32
  config.input.eval_batch_size = 16 if config.dataset.name == "drive" else 48
  config.input.pp_train = "" if config.dataset.name == "drive" else f"seg_augment({size})"
  config.input.pp_eval = ""
  config.input.pp_test = ""
  config.optim.optimizer = "adamw"
  config.optim.lr = 2e-4
  config.optim.weight_decay = 0.01
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_epochs = 20.0
  config.train.num_epochs = 500
  config.train.patience = 50
  config.train.test_tta = False


def segmentation_demo(config: ml_collections.ConfigDict) -> None:
  """Lungs of the phantom chest X-rays at 64 px on a 2-core CPU in a few minutes.

  Differences from the paper's setting (segmentation_paper): 64 px images and masks,
  a model from scratch, flips instead of the study's elastic/grid/optical distortions,
  a fixed short schedule (AdamW 1e-3, warmup + cosine) instead of 500 epochs with
  early stopping. The loss (Dice) and the metrics are the study's.
  """
  config.dataset.image_size = 64
  config.input.batch_size = 32
  config.input.eval_batch_size = 128  # a multiple of 1, 2, 4, 8, ... devices
  config.input.pp_train = "flip_lr"
  config.input.pp_eval = ""
  config.input.pp_test = ""
  config.optim.optimizer = "adamw"
  config.optim.lr = 1e-3
  config.optim.weight_decay = 0.01
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_epochs = 0.5
  config.train.num_epochs = 6
  config.train.patience = 6
  config.train.test_tta = False
  config.train.log_every_steps = 20
