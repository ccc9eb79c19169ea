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
  recipe=NAME         classification's training recipe: version2 (default; the study's
                      BenchmarkTransferLearning Version2) or bt (BenchmarkTransformers',
                      where RSNA Pneumonia and VinDr-CXR come from); bt implies `paper`
With data=phantom and no `paper`, the run is sized for a 2-core CPU; every other
data set gets the study's protocol (classification_paper, segmentation_paper), which
for VinDr-CXR and RSNA Pneumonia means the study's own lists (vindr_cxr_study,
rsna_pneumonia_study). docs/protocol.md compares it with the reference code option
by option.
"""

from __future__ import annotations

import ml_collections

from medbench_jax import config_lib
from medbench_jax.data.prepare import PHANTOM_DATASETS

# Short names users type -> data sets.
CLASSIFICATION_ALIASES = {"phantom": "phantom_cxr"}
# The study's tasks on these sets are defined by its own lists (dataset/ of
# jlianglab/BenchmarkTransformers): the paper setting trains on those.
STUDY_LISTS = {"vindr_cxr": "vindr_cxr_study", "rsna_pneumonia": "rsna_pneumonia_study"}
# What the study does differently per data set (its loaders, dataloader.py); every
# paper run also gets the common protocol of classification_paper.
PAPER_DATASETS = {
    "chestxray14": {},
    # The reference's defaults: LSR-Ones (uncertain labels drawn from U(0.55, 0.85)
    # whenever an image is read, validation included), blank = 0; and its CheXpert
    # loader takes anno_percent of the validation and test lists too.
    "chexpert": dict(uncertain_policy="lsr_ones", lsr_draw="per_read",
                     validation_labels="policy", blank_label=0.0,
                     label_fraction_splits="train,validation,test"),
    # As the study's first code release subsets Shenzhen (its second one's Shenzhen
    # loader ignores anno_percent; the transformer benchmark subsets training only).
    "shenzhen_cxr": dict(label_fraction_splits="train,validation,test"),
    "vindr_cxr_study": {},
    "rsna_pneumonia_study": {},
}
# Every original fits within this (ChestX-ray14, RSNA: 1024 x 1024): no crop the
# study takes is upsampled from a stored copy (see classification_paper).
PAPER_STORED_SIZE = 1024
SEGMENTATION_ALIASES = {"phantom": "phantom_cxr_lungs", "siim": "siim_acr_pneumothorax"}
# Classification's training recipes (config arg recipe=): the first is the default.
CLASSIFICATION_RECIPES = ("version2", "bt")


def _common(arg: str | None, aliases: dict[str, str], task: str
            ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """The default config with the arg's data set, init, trials and label fraction."""
  args = config_lib.parse_arg(arg, model="", data="phantom", init="random", trials=1,
                              label_fraction=1.0, anno_percent=0.0, paper=False,
                              recipe=CLASSIFICATION_RECIPES[0])
  allowed_recipes = CLASSIFICATION_RECIPES if task == "classification" else (
      CLASSIFICATION_RECIPES[0],)
  if args.recipe not in allowed_recipes:
    raise ValueError(f"Unknown config arg recipe={args.recipe!r} for {task}; allowed: "
                     f"{list(allowed_recipes)}")
  from medbench_jax.data.prepare import registry
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
  if args.data == "phantom" and not args.paper and args.recipe == "version2":
    classification_demo(config)
    config.model.name = args.model or demo_model
  else:
    config.dataset.name = STUDY_LISTS.get(config.dataset.name, config.dataset.name)
    classification_paper(config)
    if args.recipe == "bt":
      classification_bt(config)
    config.model.name = args.model or paper_model
  return config


def classification_paper(config: ml_collections.ConfigDict) -> None:
  """The study's classification protocol (BenchmarkTransferLearning Version2,
  main_classification.py and dataloader.py; docs/protocol.md has every option):

  images stored at their own aspect ratio within 1024 px: the originals of
  ChestX-ray14 and RSNA, larger originals (Shenzhen, VinDr-CXR, CheXpert) shrunk only
  as far as keeps every crop the study takes a downsampling (the smallest, 8 % of
  the area at aspect 3/4, is 251 x 334 px of a 1024 px square; any image of
  H x W >= 224^2 / 0.06 = 836,267 px, e.g. 1024 x 817, keeps it above 224 px);
  RandomResizedCrop(224),
  horizontal flip, rotation 7 degrees, resampled like torchvision's PIL transforms;
  evaluation on Resize((256, 256)) then the centre 224 crop, ten crops at test;
  ImageNet mean/std; batch 32; Adam lr 2e-4 without weight decay; reduce-on-plateau
  x0.5 at the 6th evaluation in a row without improvement (more than patience // 2 = 5);
  early stopping at the 11th (more than patience = 10); up to 1000 epochs (the
  reference's default); label fractions by the study's rule (random.Random(99), the
  first int(N * percent / 100)); CheXpert's uncertain labels and per-set differences:
  PAPER_DATASETS.

  The project's own choices stay one override away (`--config.KEY=VALUE`):
    dataset.label_fraction_method=stratified   stratified subsets (seed
                                               dataset.label_fraction_seed) instead of
                                               the study's random prefix
    dataset.label_fraction_splits=train        fractions of training data only
    dataset.validation_labels=hard             hard validation targets under LSR
    dataset.lsr_draw=once                      one LSR draw per run
    dataset.keep_aspect=False, image_size=256  a square 256 px copy (7 GB instead of
                                               117 GB for ChestX-ray14; crops at small
                                               scales are then upsampled)
    input.pp_*: interpolation='area'           OpenCV's area filter (faster on large
                                               images) instead of PIL's bilinear
    optim.schedule=warmup_cosine               a warmup + cosine schedule in steps
  """
  d = config.dataset
  d.image_size = PAPER_STORED_SIZE
  d.keep_aspect = True
  if d.name in PHANTOM_DATASETS:  # generated at the resolution of ChestX-ray14
    d.phantom.image_size = PAPER_STORED_SIZE
  d.label_fraction_method = "study"
  d.label_fraction_seed = 99
  d.update(PAPER_DATASETS.get(d.name, {}))
  pil = "interpolation='pil_bilinear'"
  config.input.batch_size = 32
  config.input.eval_batch_size = 32
  config.input.pp_train = f"random_resized_crop(224, {pil})|flip_lr|rotate(7)"
  config.input.pp_eval = f"resize((256, 256), {pil})|center_crop(224)"
  config.input.pp_test = f"resize((256, 256), {pil})|ten_crop(224)"
  config.input.normalization = "imagenet"
  config.optim.optimizer = "adam"
  config.optim.lr = 2e-4
  config.optim.weight_decay = 0.0
  config.optim.schedule = "plateau"
  config.optim.plateau_factor = 0.5
  config.train.num_epochs = 1000
  config.train.patience = 10
  config.train.test_tta = True


def classification_bt(config: ml_collections.ConfigDict) -> None:
  """BenchmarkTransformers' training recipe over the paper setting (config arg recipe=bt).

  Its main_classification.py defaults, which its engine.py builds with timm's
  create_optimizer / create_scheduler: SGD with momentum 0.9 (`--opt momentum`), no
  weight decay, lr 1e-2, cosine over 200 epochs after 20 warmup epochs, floor 1e-5;
  batch 64; early stopping after more than 10 epochs without a lower validation loss.
  Data, transforms, losses and label fractions stay the paper setting's (they match).

  Differences: timm warms up from 1e-6 per epoch and its cosine spans the warmup too
  (t_initial = 200); optax's warms up from 0 per step and its cosine spans the epochs
  after the warmup. Not reproduced: the published engine.py calls
  `lr_scheduler.step(val_loss)`, which timm reads as step(epoch=val_loss), so the code as
  published keeps the rate in its warmup at 1e-6 + val_loss * (1e-2 - 1e-6) / 20 (about
  1e-4 to 3.5e-4 for validation losses of 0.2-0.7) and never reaches the cosine.
  """
  config.input.batch_size = 64
  config.input.eval_batch_size = 64
  config.optim.optimizer = "sgd"
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.weight_decay = 0.0
  config.optim.lr = 1e-2
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_epochs = 20.0
  config.optim.min_lr_ratio = 1e-5 / 1e-2
  config.train.num_epochs = 200
  config.train.patience = 10


def classification_demo(config: ml_collections.ConfigDict) -> None:
  """Shrinks a run to about 6.5 minutes on a 2-core CPU, keeping every stage of the study.

  Differences from the paper's setting: a small random-init Swin (48-dim, 2-2-2-2
  blocks) at 64 px instead of an ImageNet-pretrained one at 224 px; 72 px stored images
  (resize 72 / crop 64 mirrors the paper's 256 / 224); training crops are the centre
  crop with horizontal flips instead of random resized crops and rotation, because a
  transformer trained from scratch for a few epochs learns the small findings (nodule,
  pneumothorax) markedly faster without them; AdamW 5e-4 with a one-epoch warmup and
  a cosine decay over a fixed 10 epochs (the paper: Adam 2e-4, reduce-on-plateau, up to
  1000 epochs with early stopping on the validation loss). A transformer from scratch
  needs epochs more than pixels: at 64 px a step costs 0.42 of one at 96 px (tokens
  16 x 16 instead of 24 x 24), so the budget that trained 4 epochs at 96 px (AdamW 3e-4,
  test mean AUC 0.694) trains 10 (0.873); at 1e-3 the same 10 epochs reach 0.76 on
  validation.
  The paper's augmentation on the demo model:
  `--config.input.pp_train="random_resized_crop(64)|flip_lr|rotate(7)"`.
  """
  config.dataset.image_size = 72
  config.input.batch_size = 32
  config.input.eval_batch_size = 128  # a multiple of 1, 2, 4, 8, ... devices
  config.input.pp_train = "resize(72)|center_crop(64)|flip_lr"
  config.input.pp_eval = "resize(72)|center_crop(64)"
  config.input.pp_test = "resize(72)|ten_crop(64)"
  config.optim.optimizer = "adamw"
  config.optim.lr = 5e-4
  config.optim.weight_decay = 0.05
  config.optim.schedule = "warmup_cosine"
  config.optim.warmup_epochs = 1.0
  config.train.num_epochs = 10
  config.train.patience = 10
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
  stopping with patience 50 (evaluated every epoch) on the validation loss as the study
  computes it, pooled over each batch (`segmentation.val_loss=pooled`; `per_image` is the
  project's batching-independent one); batch 32 (DRIVE's 16 training images: 16); test on
  the full image, no test-time augmentation.
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
  config.segmentation.val_loss = "pooled"


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
  config.optim.warmup_epochs = 0.25
  config.train.num_epochs = 1
  config.train.patience = 2
  config.train.eval_every_steps = 47  # two evaluations: Dice and overlays as it learns
  config.train.test_tta = False
  config.train.log_every_steps = 20
