r"""Domain-adaptive continued pretraining (the study's question v).

A chain of two runs per source: the ImageNet-1K model is first fine-tuned on a large
chest X-ray set (the source stage: ChestX-ray14, CheXpert or MIMIC-CXR, all labels,
one trial), then every target task is fine-tuned from that run's best checkpoint
(init run:<source workdir>), against the same model from ImageNet-1K directly. The
study's chains: ResNet-50 through all three sources, Swin-B and ConvNeXt-B through
MIMIC-CXR. A target step starts once its source finished; if the source fails, its
targets are marked blocked.

  python -m medbench_jax.sweep --sweep=configs/sweeps/domain_adaptive.py \
      --root=sweeps/domain_adaptive [--backend=slurm --slurm=slurm_partition=gpu]
  python -m medbench_jax.report --runs=sweeps/domain_adaptive --out=reports/domain_adaptive \
      --baseline=resnet50/resnet50-0676ba61.pth

Args (comma-separated): data=cls|seg|all|NAME+NAME (targets; default
shenzhen_cxr+vindr_cxr, the classification tasks no source contains; data=all adds the
segmentation tasks), released (start the targets
from the study's published domain-adapted checkpoints instead of training the source
stage), trials=N, ckpt=DIR, data_root=DIR (as in configs/sweeps/architectures.py).
"""

from medbench_jax import config_lib
from medbench_jax.study import sweep
from medbench_jax.study import sweep_catalog as catalog

CHAINS = {
    "resnet50": ("chestxray14", "chexpert", "mimic_cxr_jpg"),
    "swin_base_patch4_window7_224": ("mimic_cxr_jpg",),
    "convnext_base": ("mimic_cxr_jpg",),
}


def get_sweep(arg=None):
  args = config_lib.parse_arg(arg, data="shenzhen_cxr+vindr_cxr", released=False,
                              trials=10, ckpt="", data_root="")
  ckpt, data_root = catalog.checkpoint_folder(args.ckpt), catalog.data_folder(args.data_root)
  points = []
  for model, sources in CHAINS.items():
    imagenet = catalog.checkpoint(model, "in1k", ckpt)
    adapted = {}
    for source in sources:
      label = f"in1k_{source}"
      if args.released:
        adapted[source] = (label, catalog.checkpoint(model, label, ckpt))
      else:
        (step,) = catalog.points(source, model, {"in1k": imagenet}, trials=1,
                                 data_root=data_root, stage="source")
        points.append(step)
        adapted[source] = (label, sweep.run_of(step))
    for dataset in catalog.targets(args.data):
      inits = {"in1k": imagenet, **{label: init for source, (label, init) in adapted.items()
                                    if source != dataset}}
      points += catalog.points(dataset, model, inits, trials=args.trials, data_root=data_root,
                               stage="target")
  return sweep.Sweep("domain_adaptive", points)
