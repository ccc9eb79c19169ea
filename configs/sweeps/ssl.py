r"""Self-supervised against supervised ImageNet pretraining (the study's question iv).

Fourteen self-supervised ResNet-50s (Barlow Twins, SwAV, DeepCluster-v2, SeLa-v2,
InsDis, MoCo-v1/v2, PCL-v1/v2, SimCLR-v1/v2, InfoMin, PIRL, BYOL), each read from its
authors' checkpoint, and the supervised ImageNet-1K ResNet-50, fine-tuned on every
target task (10 trials each). Inputs are normalised as each model was pretrained
(input.normalization=model: ImageNet mean/std, SimCLR's unnormalised [0, 1]):

  python -m medbench_jax.sweep --sweep=configs/sweeps/ssl.py --root=sweeps/ssl \
      [--backend=slurm --slurm=slurm_partition=gpu]
  python -m medbench_jax.report --runs=sweeps/ssl --out=reports/ssl \
      --baseline=resnet50/resnet50-0676ba61.pth

Args (comma-separated): data=cls|seg|all|NAME+NAME (default cls), methods=NAME+NAME
(default all fourteen), trials=N, ckpt=DIR, data_root=DIR (as in
configs/sweeps/architectures.py).
"""

from medbench_jax import config_lib
from medbench_jax.study import sweep
from medbench_jax.study import sweep_catalog as catalog


def _model(method: str) -> str:
  return next(model for model, source in catalog.CHECKPOINTS if source == method)


def get_sweep(arg=None):
  args = config_lib.parse_arg(arg, data="cls", methods="+".join(catalog.SSL_METHODS),
                              trials=10, ckpt="", data_root="")
  ckpt, data_root = catalog.checkpoint_folder(args.ckpt), catalog.data_folder(args.data_root)
  by_model = {"resnet50": {"in1k": catalog.checkpoint("resnet50", "in1k", ckpt)}}
  for method in sweep.split_list(args.methods):
    if method not in catalog.SSL_METHODS:
      raise ValueError(f"Unknown method {method!r}; allowed: {catalog.SSL_METHODS}")
    by_model.setdefault(_model(method), {})[method] = catalog.checkpoint(
        _model(method), method, ckpt)
  points = []
  for dataset in catalog.targets(args.data):
    for model, inits in by_model.items():
      points += catalog.points(dataset, model, inits, trials=args.trials, data_root=data_root,
                               fixed={"input.normalization": "model"})
  return sweep.Sweep("ssl", points)
