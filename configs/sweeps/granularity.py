r"""Finer-grained or larger pretraining data (the study's question iii).

ImageNet-1K against iNat2021 (and its mini version) for ResNet-50, and against
ImageNet-22K (21,841 classes; alone and followed by ImageNet-1K) for Swin-B and
ConvNeXt-B, all supervised, fine-tuned on every target task (10 trials each):

  python -m medbench_jax.sweep --sweep=configs/sweeps/granularity.py \
      --root=sweeps/granularity [--backend=slurm --slurm=slurm_partition=gpu]
  python -m medbench_jax.report --runs=sweeps/granularity --out=reports/granularity \
      --baseline=resnet50/resnet50-0676ba61.pth

Args (comma-separated): data=cls|seg|all|NAME+NAME (default cls; the study finds
finer-grained data helping segmentation more than classification, so data=all is the
full question), trials=N, ckpt=DIR, data_root=DIR (as in configs/sweeps/architectures.py).
"""

from medbench_jax import config_lib
from medbench_jax.study import sweep
from medbench_jax.study import sweep_catalog as catalog

SOURCES = {
    "resnet50": ("in1k", "inat2021", "inat2021_mini"),
    "swin_base_patch4_window7_224": ("in1k", "in22k", "in22k_in1k"),
    "convnext_base": ("in1k", "in22k", "in22k_in1k"),
}


def get_sweep(arg=None):
  args = config_lib.parse_arg(arg, data="cls", trials=10, ckpt="", data_root="")
  ckpt, data_root = catalog.checkpoint_folder(args.ckpt), catalog.data_folder(args.data_root)
  points = []
  for dataset in catalog.targets(args.data):
    for model, sources in SOURCES.items():
      inits = {source: catalog.checkpoint(model, source, ckpt) for source in sources}
      points += catalog.points(dataset, model, inits, trials=args.trials, data_root=data_root)
  return sweep.Sweep("granularity", points)
