r"""ResNet-50 fine-tuned for multi-label chest X-ray classification.

CPU demo (default): resnet18-sized run from scratch on the embedded phantom data:

  python -m medbench_jax.main --config=configs/resnet50.py --workdir=workdirs/resnet_demo

Paper setting (the study's ResNet-50 on ChestX-ray14 from its supervised ImageNet
weights, 10 trials; medbench_jax.recipes.classification_paper, docs/protocol.md):

  python -m medbench_jax.main \
    --config=configs/resnet50.py:data=chestxray14,init=/ckpt/resnet50-0676ba61.pth,trials=10 \
    --config.dataset.manual_dir=/data/ChestX-ray14 --workdir=workdirs/r50_cxr14

The study's "ImageNet" ResNet-50 is torchvision's IMAGENET1K_V1 weights
(`models.resnet50(pretrained=True)`:
https://download.pytorch.org/models/resnet50-0676ba61.pth), not the newer
IMAGENET1K_V2 (resnet50-11ad3fa6.pth). Its self-supervised ResNet-50s (MoCo, SwAV,
Barlow Twins, BYOL, ...) and iNat2021 models are the publishers' files listed in the
study's README; domain-adapted ones (ImageNet -> ChestX-ray14 / CheXpert / MIMIC) are
on Zenodo (records 5205234 and 17627332).

Args and overrides as in configs/swin.py.
"""

from medbench_jax import recipes


def get_config(arg=None):
  return recipes.classification_config(
      arg, paper_model="resnet50", demo_model="resnet18")
