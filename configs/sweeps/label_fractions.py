r"""ConvNets and vision transformers as labels get scarce (the study's question ii).

ResNet-50, ConvNeXt-B and Swin-B from supervised ImageNet-1K, fine-tuned on 1, 2, 5, 10,
25, 50 and 100 % of the training labels (the same subset for every model: it depends on
the fraction and config.dataset.label_fraction_seed only), 10 trials each:

  python -m medbench_jax.sweep --sweep=configs/sweeps/label_fractions.py \
      --root=sweeps/label_fractions [--backend=slurm --slurm=slurm_partition=gpu]
  python -m medbench_jax.report --runs=sweeps/label_fractions --out=reports/label_fractions \
      --baseline=resnet50/resnet50-0676ba61.pth

Args (comma-separated): data=NAME+NAME|cls|seg|all (default chestxray14+chexpert, the
large sets where 1 % still holds hundreds of images), fractions=F+F (default
0.01+0.02+0.05+0.1+0.25+0.5+1), models=NAME+NAME, trials=N, ckpt=DIR, data_root=DIR
(as in configs/sweeps/architectures.py).
"""

from medbench_jax import config_lib
from medbench_jax.study import sweep
from medbench_jax.study import sweep_catalog as catalog

MODELS = ("resnet50", "convnext_base", "swin_base_patch4_window7_224")
FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


def get_sweep(arg=None):
  args = config_lib.parse_arg(arg, data="chestxray14+chexpert", models="+".join(MODELS),
                              fractions="+".join(map(str, FRACTIONS)), trials=10, ckpt="",
                              data_root="")
  ckpt, data_root = catalog.checkpoint_folder(args.ckpt), catalog.data_folder(args.data_root)
  fractions = tuple(float(f) for f in sweep.split_list(args.fractions))
  points = []
  for dataset in catalog.targets(args.data):
    for model in sweep.split_list(args.models):
      points += catalog.points(dataset, model, {"in1k": catalog.checkpoint(model, "in1k", ckpt)},
                               trials=args.trials, data_root=data_root, fractions=fractions)
  return sweep.Sweep("label_fractions", points)
