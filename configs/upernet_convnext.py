r"""UperNet with a ConvNeXt encoder for chest X-ray segmentation (the study's
`convnext_upernet`).

The model is segmentation_models_pytorch's UPerNet("tu-convnext_...") (pyramid pooling
over the deepest stage, FPN over the four, fused, bilinear upsampling to the input;
medbench_jax/models/upernet.py).

CPU demo (default): a small ConvNeXt (ConvNeXt-T's layout at 32-64-128-256 channels and
one block per stage) at 64 px with a 64-channel decoder, trained from scratch on the lungs
of the embedded phantom chest X-rays:

  python -m medbench_jax.main --config=configs/upernet_convnext.py --workdir=workdirs/upernet_convnext_demo

What the demo changes from the paper's setting: see medbench_jax.recipes.segmentation_demo.

Paper setting (recipes.segmentation_paper, 224 px; the encoder from any ConvNeXt-B
classification checkpoint, e.g. timm's or Meta's; decoder and head start fresh):

  python -m medbench_jax.main \
    --config=configs/upernet_convnext.py:data=montgomery,init=/ckpt/convnext_base_22k_1k_224.pth,trials=10 \
    --config.dataset.manual_dir=/data/Montgomery --workdir=workdirs/upernet_convnextb_montgomery

Other encoders: model=upernet_convnext_{tiny,small,base,large}. Args and overrides as in
configs/unet_resnet50.py.
"""

from medbench_jax import recipes


def get_config(arg=None):
  return recipes.segmentation_config(
      arg, paper_model="upernet_convnext_base", demo_model="upernet_convnext_tiny",
      demo_kw={"depths": (1, 1, 1, 1), "dims": (32, 64, 128, 256), "decoder_channels": 64})
