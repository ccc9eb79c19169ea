r"""U-Net with a ResNet-50 encoder for chest X-ray segmentation (the study's `unet`).

The model is segmentation_models_pytorch's Unet("resnet50") (decoder channels
256/128/64/32/16, BatchNorm, nearest 2x upsampling, 3x3 head; medbench_jax/models/unet.py).

CPU demo (default): a U-Net on a ResNet-18 encoder trained from scratch on the lungs of
the embedded phantom chest X-rays at 64 px, generated and prepared on first use (one
epoch of 93 steps at batch 32, about 7 minutes on 2 CPU cores; results.json reports
the test Dice and IoU, about 0.96):

  python -m medbench_jax.main --config=configs/unet_resnet50.py --workdir=workdirs/unet_demo

What the demo changes from the paper's setting: see medbench_jax.recipes.segmentation_demo.

Paper setting (the study's protocol, recipes.segmentation_paper: 224 px, Dice loss, AdamW
2e-4, 500 epochs with early stopping; the encoder from any ResNet-50 classification
checkpoint, e.g. torchvision's ImageNet weights; decoder and head start fresh):

  python -m medbench_jax.main \
    --config=configs/unet_resnet50.py:data=montgomery,init=/ckpt/resnet50-11ad3fa6.pth,trials=10 \
    --config.dataset.manual_dir=/data/Montgomery --workdir=workdirs/unet_r50_montgomery

Other encoders: model=unet_<encoder> for resnet18-152, densenet121/161/169/201 and
convnext_tiny/small/base/large. Args (comma-separated): model, data=phantom|montgomery|
jsrt_lungs|jsrt_heart|jsrt_clavicles|siim|drive|... (data/prepare/registry.py),
init=random|SOURCE, trials, label_fraction (or anno_percent), paper. Any key can be
overridden with --config.KEY=VALUE.
"""

from medbench_jax import recipes


def get_config(arg=None):
  return recipes.segmentation_config(arg, paper_model="unet_resnet50",
                                     demo_model="unet_resnet18")
