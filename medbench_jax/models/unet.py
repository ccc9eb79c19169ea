"""U-Net on the package's pretrained encoders, as segmentation_models_pytorch 0.6 builds it.

    model = models.create("unet_resnet50", num_classes=1)
    logits = model.apply(variables, images, train=False)       # (N, H, W, 1) float32
    variables = weights.load("unet_resnet50", "/ckpt/moco_v2.pth", num_classes=1)

`unet_<encoder>` is `smp.Unet(<encoder>, encoder_depth=5)` with smp's defaults, the
configuration the reference study fine-tunes (its engine calls `smp.Unet(backbone,
encoder_weights=...)`): the encoder's maps at strides 32, 16, 8, 4, 2 feed five decoder
blocks of 256, 128, 64, 32, 16 channels; each block upsamples 2x by nearest neighbour,
concatenates the encoder map of that resolution (the last block has none) and applies two
3x3 conv + BatchNorm + ReLU; a 3x3 conv (the segmentation head) gives the logits at the
input resolution. Inputs need not be multiples of 32: each block upsamples to the size of
the skip it joins, as smp does.

Encoders (every registered name of each family):
  * resnet18..152: the stride-2 skip is the stem output after ReLU (smp's ResNet encoder).
  * densenet121/169/201/...: smp's DenseNet encoder taps, which are not timm's (see
    densenet.py, `smp_features`): stem after norm0 + ReLU, each dense block after its
    transition's norm + ReLU, norm5 without ReLU.
  * convnext_*: smp's `tu-convnext_*` (timm's four stages). ConvNeXt has no stride-2 map,
    so the fourth block upsamples without a skip, as smp's zero-channel placeholder does.

Parameter paths mirror smp's keys (encoder/..., decoder/blocks_0/conv1_0, conv1_1,
segmentation_head_0), so `weights.load` reads an smp Unet state dict (including `tu-`
timm encoders) as well as any classification checkpoint of the encoder; see decoders.py.
Fresh decoder layers use smp's initialisation (kaiming-uniform convs, xavier head).
BatchNorm is PyTorch's (common.BatchNorm): train mode needs `mutable=['batch_stats']`.
"""

from __future__ import annotations

from collections.abc import Sequence
import re

import flax.linen as nn
import jax.numpy as jnp

from medbench_jax.models import convnext  # noqa: F401  (register encoders)
from medbench_jax.models import decoders
from medbench_jax.models import densenet  # noqa: F401  (register encoders)
from medbench_jax.models import registry
from medbench_jax.models import resnet  # noqa: F401  (register encoders)

DECODER_CHANNELS = (256, 128, 64, 32, 16)


class DecoderBlock(nn.Module):
  """Nearest upsampling to the skip's size, concatenation, two 3x3 conv-BN-ReLU."""
  features: int
  dtype: decoders.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, skip: jnp.ndarray | None, size: decoders.Size,
               train: bool) -> jnp.ndarray:
    x = decoders.resize_nearest(x, size)
    if skip is not None:
      x = jnp.concatenate([x, skip.astype(self.dtype)], axis=-1)
    x = decoders.conv_bn_relu(x, self.features, 3, train, self.dtype, "conv1")
    return decoders.conv_bn_relu(x, self.features, 3, train, self.dtype, "conv2")


class UNetDecoder(nn.Module):
  """smp's UnetDecoder without center block (smp adds one for VGG encoders only)."""
  channels: Sequence[int] = DECODER_CHANNELS
  dtype: decoders.Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jnp.ndarray | None], sizes: Sequence[decoders.Size],
               train: bool) -> jnp.ndarray:
    """`maps`: encoder maps from the deepest up (None where an encoder has no such map),
    the deepest first; `sizes`: the output size of each block."""
    x = maps[0].astype(self.dtype)
    skips = [*maps[1:], *[None] * (len(self.channels) - len(maps) + 1)]
    for i, (features, skip, size) in enumerate(zip(self.channels, skips, sizes)):
      x = DecoderBlock(features, self.dtype, name=f"blocks_{i}")(x, skip, size, train)
    return x


class UNet(decoders.SegmentationModel):
  """U-Net: encoder maps at strides 2 (if `stem_skip`) to 32, UNetDecoder, 3x3 head."""
  decoder_channels: Sequence[int] = DECODER_CHANNELS
  # Whether the encoder gives a stride-2 map (`smp_features=True`): CNNs with a stride-2
  # stem do; ConvNeXt does not.
  stem_skip: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    height, width = decoders.output_size(x)
    if self.stem_skip:
      maps = self.encoder(x, train=train, smp_features=True)
    else:
      maps = [None, *self.encoder(x, train=train, feature_maps=True)]
    if len(self.decoder_channels) != len(maps):
      raise ValueError(f"decoder_channels={self.decoder_channels}: one block per encoder map "
                       f"(strides 32 to 2) takes {len(maps)} channel counts.")
    # Each block's output size: the next encoder map's (smp upsamples to the skip's size),
    # half the input where there is no stride-2 map, then the input size.
    sizes = [decoders.output_size(m) for m in maps[-2:0:-1]]
    sizes += [decoders.output_size(maps[0]) if maps[0] is not None
              else (height // 2, width // 2), (height, width)]
    x = UNetDecoder(self.decoder_channels, self.dtype, name="decoder")(
        maps[::-1], sizes, train)
    if self.num_classes:
      x = decoders.head_conv(self.num_classes, 3, self.dtype)(x)
    return x.astype(jnp.float32)


# The encoders a UNet decodes, by registered name: whether the encoder has a stride-2 map
# (the decoder's stem skip; ConvNeXt's patchify stem starts at stride 4).
_STEM_SKIP_BY_ENCODER = {
    r"resnet\d+": True,
    r"densenet\d+": True,
    r"convnext_\w+": False,
}

for _encoder in registry.list_models():
  for _pattern, _stem_skip in _STEM_SKIP_BY_ENCODER.items():
    if re.fullmatch(_pattern, _encoder):
      decoders.register(f"unet_{_encoder}", _encoder, UNet, stem_skip=_stem_skip)
