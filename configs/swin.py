r"""Swin Transformer fine-tuned for multi-label chest X-ray classification.

CPU demo (default): a small Swin trained from scratch on the embedded phantom data
set, generated and prepared on first use. On 2 CPU cores it takes about 10 minutes
and reaches a test mean AUC of about 0.8 (chance 0.5):

  python -m medbench_jax.main --config=configs/swin.py --workdir=workdirs/swin_demo

What the demo changes from the paper's setting: see medbench_jax.recipes.classification_demo.

Paper setting (the study's Swin-B on ChestX-ray14: 224 px crops of 256 px images,
Adam 2e-4, reduce-on-plateau x0.5, early stopping on val loss, ten-crop test):

  python -m medbench_jax.main \
    --config=configs/swin.py:model=swin_base_patch4_window7_224,data=chestxray14,init=/ckpt/swin_base_patch4_window7_224_22kto1k.pth,trials=10 \
    --config.dataset.manual_dir=/data/ChestX-ray14 --workdir=workdirs/swinb_cxr14

Args (comma-separated): model, data=phantom|chestxray14, init=random|PATH, trials,
label_fraction (or the study's anno_percent), paper. Any key can be overridden with
--config.KEY=VALUE, e.g. --config.input.batch_size=128.
"""

from medbench_jax import recipes


def get_config(arg=None):
  return recipes.classification_config(
      arg, paper_model="swin_base_patch4_window7_224",
      demo_model="swin_demo_patch4_window4_96")
