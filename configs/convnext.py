r"""ConvNeXt fine-tuned for multi-label chest X-ray classification.

CPU demo (default): ConvNeXt-T from scratch on the embedded phantom data, with the
demo's schedule (medbench_jax.recipes.classification_demo); slower than the Swin
demo on a CPU:

  python -m medbench_jax.main --config=configs/convnext.py --workdir=workdirs/convnext_demo

Paper setting (the study's ConvNeXt-B on ChestX-ray14 from its ImageNet-1K weights, 10
trials; medbench_jax.recipes.classification_paper, docs/protocol.md):

  python -m medbench_jax.main \
    --config=configs/convnext.py:data=chestxray14,init=/ckpt/convnext_base_1k_224_ema.pth,trials=10 \
    --config.dataset.manual_dir=/data/ChestX-ray14 --workdir=workdirs/convnextb_cxr14

The study's ImageNet-1K ConvNeXts are Meta's files
(https://dl.fbaipublicfiles.com/convnext/convnext_base_1k_224_ema.pth; _tiny_ and
_small_ with model=convnext_tiny / convnext_small); its domain-adapted ConvNeXt-B
(ImageNet -> MIMIC) is domain_adapted_convnext_base_imagenet_mimic_checkpoint.pth.tar
from https://zenodo.org/records/17627332.

Args and overrides as in configs/swin.py.
"""

from medbench_jax import recipes


def get_config(arg=None):
  return recipes.classification_config(
      arg, paper_model="convnext_base", demo_model="convnext_tiny")
