r"""UperNet with a Swin Transformer encoder for chest X-ray segmentation (the study's
`swin_upernet`).

The model is segmentation_models_pytorch's UPerNet("tu-swin_...") (pyramid pooling over
the deepest stage, FPN over the four, fused, bilinear upsampling to the input;
medbench_jax/models/upernet.py, whose docstring states how the study's own Swin taps
differ).

CPU demo (default): a small Swin (48-dim, 2-2-2-2 blocks, window 4) at 64 px with a
64-channel decoder, trained from scratch on the lungs of the embedded phantom chest X-rays:

  python -m medbench_jax.main --config=configs/upernet_swin.py --workdir=workdirs/upernet_swin_demo

What the demo changes from the paper's setting: see medbench_jax.recipes.segmentation_demo.

Paper setting (recipes.segmentation_paper, 224 px; the encoder from any Swin-B
classification checkpoint: Microsoft's, timm's, SimMIM's (its relative position tables
resized as SimMIM's fine-tuning does), the study's own; decoder and head start fresh):

  python -m medbench_jax.main \
    --config=configs/upernet_swin.py:data=jsrt_lungs,init=/ckpt/swin_base_patch4_window7_224_22k.pth,trials=10 \
    --config.dataset.manual_dir=/data/JSRT --workdir=workdirs/upernet_swinb_jsrt

Other encoders: model=upernet_swin_{tiny,small,base,large}_patch4_window7_224 and
upernet_swin_{base,large}_patch4_window12_384 (with --config.dataset.image_size=384).
Args and overrides as in configs/unet_resnet50.py.
"""

from medbench_jax import recipes


def get_config(arg=None):
  return recipes.segmentation_config(
      arg, paper_model="upernet_swin_base_patch4_window7_224",
      demo_model="upernet_swin_demo_patch4_window4_96",
      demo_kw={"img_size": 64, "decoder_channels": 64})
