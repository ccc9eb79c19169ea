r"""Swin Transformer fine-tuned for multi-label chest X-ray classification.

CPU demo (default): a small Swin trained from scratch on the embedded phantom data
set, generated and prepared on first use. On 2 quiet CPU cores it takes 5 min 08 s from
a fresh cache (10 epochs of 93 steps at 64 px, about 145 img/s) and reaches a test mean
AUC of 0.873 (chance 0.5; Cardiomegaly 0.964, Nodule 0.666, Effusion 0.879,
Pneumothorax 0.984):

  python -m medbench_jax.main --config=configs/swin.py --workdir=workdirs/swin_demo

What the demo changes from the paper's setting: see medbench_jax.recipes.classification_demo.

Paper setting (the study's Swin-B on ChestX-ray14, 10 trials; any data=... other than
the phantom gets it, `paper` gets it on the phantom too): crops from the 1024 px
originals, batch 32, Adam 2e-4, reduce-on-plateau x0.5, early stopping on val loss,
ten-crop test (medbench_jax.recipes.classification_paper; docs/protocol.md):

  python -m medbench_jax.main \
    --config=configs/swin.py:data=chestxray14,init=/ckpt/swin_base_patch4_window7_224.pth,trials=10 \
    --config.dataset.manual_dir=/data/ChestX-ray14 --workdir=workdirs/swinb_cxr14

The study's "ImageNet-1K" Swin-B is Microsoft's swin_base_patch4_window7_224.pth
(https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_base_patch4_window7_224.pth),
trained on ImageNet-1K only; Swin-T and Swin-S likewise (model=swin_tiny_patch4_window7_224,
init=.../swin_tiny_patch4_window7_224.pth). Its domain-adapted Swin-B (ImageNet ->
MIMIC) is domain_adapted_swin_base_imagenet_mimic_checkpoint.pth.tar from
https://zenodo.org/records/17627332.

Other data sets of the study: data=chexpert (LSR-Ones redrawn per read, also on
validation), shenzhen_cxr, vindr_cxr (the study's 6-label lists), rsna_pneumonia (its
3-class lists); anno_percent=P (or label_fraction=P/100) takes the study's subset.

Args (comma-separated): model, data=phantom|NAME, init=random|PATH, trials,
label_fraction (or the study's anno_percent), paper. Any key can be overridden with
--config.KEY=VALUE, e.g. the project's stratified label fractions:
--config.dataset.label_fraction_method=stratified.
"""

from medbench_jax import recipes


def get_config(arg=None):
  return recipes.classification_config(
      arg, paper_model="swin_base_patch4_window7_224",
      demo_model="swin_demo_patch4_window4_64")
