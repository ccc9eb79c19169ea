r"""ResNet-50 fine-tuned for multi-label chest X-ray classification.

CPU demo (default): resnet18-sized run from scratch on the embedded phantom data:

  python -m medbench_jax.main --config=configs/resnet50.py --workdir=workdirs/resnet_demo

Paper setting (the study's ResNet-50 on ChestX-ray14, e.g. from torchvision's
ImageNet weights, 10 trials):

  python -m medbench_jax.main \
    --config=configs/resnet50.py:data=chestxray14,init=/ckpt/resnet50-11ad3fa6.pth,trials=10 \
    --config.dataset.manual_dir=/data/ChestX-ray14 --workdir=workdirs/r50_cxr14

Args and overrides as in configs/swin.py.
"""

from medbench_jax import recipes


def get_config(arg=None):
  return recipes.classification_config(
      arg, paper_model="resnet50", demo_model="resnet18")
