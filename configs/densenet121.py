r"""DenseNet-121 fine-tuned for multi-label chest X-ray classification.

CPU demo (default): DenseNet-121 from scratch on the embedded phantom data, with the
demo's schedule (medbench_jax.recipes.classification_demo); slower than the Swin
and ResNet demos on a CPU:

  python -m medbench_jax.main --config=configs/densenet121.py --workdir=workdirs/dn121_demo

Paper setting (the study's DenseNet-121 on ChestX-ray14, 10 trials;
medbench_jax.recipes.classification_paper, docs/protocol.md), e.g. from torchvision's
ImageNet weights (https://download.pytorch.org/models/densenet121-a639ec97.pth):

  python -m medbench_jax.main \
    --config=configs/densenet121.py:data=chestxray14,init=/ckpt/densenet121-a639ec97.pth,trials=10 \
    --config.dataset.manual_dir=/data/ChestX-ray14 --workdir=workdirs/dn121_cxr14

The study's classifier for DenseNet (and ResNet) is re-drawn from N(0, 0.01) with a
zero bias, as its models.py does; the model registry does the same.

Args and overrides as in configs/swin.py.
"""

from medbench_jax import recipes


def get_config(arg=None):
  return recipes.classification_config(
      arg, paper_model="densenet121", demo_model="densenet121")
