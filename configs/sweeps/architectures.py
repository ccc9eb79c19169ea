r"""Which architecture transfers best (the study's question i).

ConvNets (ResNet-50, DenseNet-121, ConvNeXt-T/S/B) and vision transformers (Swin-T/S/B),
each from its supervised ImageNet-1K checkpoint, fine-tuned on every target task
(10 trials each):

  python -m medbench_jax.sweep --sweep=configs/sweeps/architectures.py \
      --root=sweeps/architectures [--backend=slurm --slurm=slurm_partition=gpu]
  python -m medbench_jax.report --runs=sweeps/architectures --out=reports/architectures \
      --baseline=resnet50/resnet50-0676ba61.pth

Args (comma-separated): data=cls|seg|all|NAME+NAME (cls: ChestX-ray14, CheXpert,
Shenzhen, VinDr-CXR; seg: SIIM-ACR, Montgomery, DRIVE, JSRT heart and clavicles, with
U-Net for ResNet/DenseNet and UperNet for ConvNeXt/Swin), models=NAME+NAME, trials=N,
ckpt=DIR (checkpoint folder, default $MEDBENCH_CHECKPOINTS), data_root=DIR (default
$MEDBENCH_DATA). `python -m medbench_jax.study.sweep_catalog` lists the checkpoints and
where they go.
"""

from medbench_jax import config_lib
from medbench_jax.study import sweep
from medbench_jax.study import sweep_catalog as catalog

MODELS = ("resnet50", "densenet121", "convnext_tiny", "convnext_small", "convnext_base",
          "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
          "swin_base_patch4_window7_224")


def get_sweep(arg=None):
  args = config_lib.parse_arg(arg, data="cls", models="+".join(MODELS), trials=10, ckpt="",
                              data_root="")
  ckpt, data_root = catalog.checkpoint_folder(args.ckpt), catalog.data_folder(args.data_root)
  points = []
  for dataset in catalog.targets(args.data):
    for model in sweep.split_list(args.models):
      points += catalog.points(dataset, model, {"in1k": catalog.checkpoint(model, "in1k", ckpt)},
                               trials=args.trials, data_root=data_root)
  return sweep.Sweep("architectures", points)
