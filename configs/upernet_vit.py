r"""UperNet with a ViT encoder for chest X-ray segmentation.

Four evenly spaced blocks of the ViT go through mmsegmentation's MultiLevelNeck to
strides 4-32, then the UperNet decoder of configs/upernet_swin.py
(medbench_jax/models/upernet.py). segmentation_models_pytorch has no ViT UperNet; the
study benchmarks Swin and ConvNeXt UperNets.

CPU demo (default): a small ViT (192-dim, 4 blocks, patch 16) at 64 px with a 64-channel
decoder, trained from scratch on the lungs of the embedded phantom chest X-rays:

  python -m medbench_jax.main --config=configs/upernet_vit.py --workdir=workdirs/upernet_vit_demo

What the demo changes from the paper's setting: see medbench_jax.recipes.segmentation_demo.

Paper setting (recipes.segmentation_paper, 224 px; the encoder from any ViT-B/16
classification or self-supervised checkpoint: timm's, DINO's, MAE's, MoCo v3's, ...;
decoder and head start fresh):

  python -m medbench_jax.main \
    --config=configs/upernet_vit.py:data=jsrt_lungs,init=/ckpt/mae_pretrain_vit_base.pth,trials=10 \
    --config.dataset.manual_dir=/data/JSRT --workdir=workdirs/upernet_vitb_jsrt

Other encoders: model=upernet_vit_{small,base,large}_patch{16,32}_224. Args and overrides
as in configs/unet_resnet50.py.
"""

from medbench_jax import recipes


def get_config(arg=None):
  return recipes.segmentation_config(
      arg, paper_model="upernet_vit_base_patch16_224",
      demo_model="upernet_vit_small_patch16_224",
      demo_kw={"img_size": 64, "embed_dim": 192, "depth": 4, "num_heads": 3,
               "decoder_channels": 64})
