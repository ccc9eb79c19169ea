"""UperNet on the package's pretrained Swin, ConvNeXt and ViT encoders.

    model = models.create("upernet_swin_base_patch4_window7_224", num_classes=1)
    logits = model.apply(variables, images, train=False)        # (N, H, W, 1) float32

`upernet_<encoder>` is segmentation_models_pytorch 0.6's `smp.UPerNet("tu-<encoder>")`
with its defaults (Xiao et al. 2018, as mmsegmentation's UPerHead): the four encoder maps
at strides 4, 8, 16, 32 are each LayerNorm-ed (eps 1e-6, as the norms mmsegmentation's
Swin/ConvNeXt backbones put on their outputs); a pyramid pooling module (average pools to
1, 2, 3, 6 cells, 1x1 conv-BN-ReLU each, bilinear upsampling, concatenation, 3x3
conv-BN-ReLU) runs on the deepest; an FPN adds 1x1 conv-BN-ReLU laterals of the others
top-down and smooths each sum with a 3x3 conv-BN-ReLU; all levels are upsampled to stride
4, concatenated and fused by a 3x3 conv-BN-ReLU (256 channels throughout). A 1x1 conv
gives the logits, upsampled 4x bilinearly with aligned corners to the input resolution.
mmsegmentation's UPerHead differs in small ways: 512 channels in its Swin/ConvNeXt
configs (`decoder_channels`), dropout 0.1 before the classifier, and a final resize with
align_corners=False.

Encoders (every registered name of each family):
  * swin_*: the outputs of the four stages (timm's layout: patch merging at the start of
    stages 2-4), 1, 2, 4, 8 x C channels. The reference study's Swin UperNet uses
    Microsoft's layout, whose stages end with patch merging and are tapped after it
    (2, 4, 8, 8 x C channels at strides 8, 16, 32, 32); that pyramid is not offered here:
    the weights are the same, the taps are those of smp's and mmsegmentation's UperNet.
  * convnext_*: the four stage outputs (timm's features_only).
  * vit_*: no smp reference exists. The outputs of 4 evenly spaced blocks (vit.py's
    `feature_maps=True`, one resolution at stride = patch size) go through
    mmsegmentation's MultiLevelNeck (per level a 1x1 conv, bilinear resize to strides
    4, 8, 16, 32 (scales 4, 2, 1, 0.5 for patch 16), a 3x3 conv; no norm, no activation)
    as in its ViT-UperNet configs, then the same decoder. Swin and ViT need inputs of
    their `img_size` (a models.create keyword; weights.load resizes tables to it).

`aux_head=True` adds mmsegmentation's auxiliary FCN head (deep supervision) on the
stride-16 map: 3x3 conv-BN-ReLU (256 channels), dropout 0.1, 1x1 conv, bilinear resize
to the input. Then `apply(..., train=True)` returns `(logits, aux_logits)`, both
(N, H, W, num_classes) float32, for a loss such as `loss(logits) + 0.4 * loss(aux_logits)`
(mmsegmentation's weight), and needs a 'dropout' rng; `train=False` returns the logits
alone. It is off by default and has no smp counterpart (always freshly initialised from
an smp checkpoint).

Parameter paths mirror smp's keys (decoder/feature_norms_0, decoder/psp/blocks_0_1_0,
decoder/fpn_lateral_blocks_0/conv_norm_relu_0, decoder/fusion_block_0,
segmentation_head_0, ...), so `weights.load` reads an smp UPerNet state dict (`tu-`
encoders) as well as any classification checkpoint of the encoder; see decoders.py.
"""

from __future__ import annotations

from collections.abc import Sequence
import re

import flax.linen as nn
import jax.numpy as jnp

from medbench_jax.models import common
from medbench_jax.models import convnext  # noqa: F401  (register encoders)
from medbench_jax.models import decoders
from medbench_jax.models import registry
from medbench_jax.models import swin  # noqa: F401  (register encoders)
from medbench_jax.models import vit  # noqa: F401  (register encoders)

POOL_SIZES = (1, 2, 3, 6)
AUX_HEAD = "aux_head"
_FEATURE_NORM_EPS = 1e-6
_AUX_CHANNELS = 256
_AUX_DROPOUT = 0.1
# The encoder level the auxiliary head reads: stride 16, mmsegmentation's in_index=2.
_AUX_LEVEL = 2
# mmsegmentation's xavier_init(distribution='uniform') of the neck's convs.
_neck_init = nn.initializers.xavier_uniform()


class PyramidPooling(nn.Module):
  """smp's PSPModule: pooled to each size, 1x1 conv-BN-ReLU, upsampled, concatenated with
  the input, 3x3 conv-BN-ReLU."""
  channels: int
  dtype: decoders.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    size = decoders.output_size(x)
    levels = [x]
    for i, cells in enumerate(POOL_SIZES):
      y = decoders.adaptive_avg_pool(x, cells)
      # smp's blocks[i] is Sequential(pool, Conv2dReLU): the conv-BN pair is its item 1.
      y = decoders.conv_bn_relu(y, self.channels, 1, train, self.dtype, f"blocks_{i}_1")
      levels.append(decoders.resize_bilinear(y, size, align_corners=False))
    return decoders.conv_bn_relu(jnp.concatenate(levels, axis=-1), self.channels, 3, train,
                                 self.dtype, "out_conv")


class Lateral(nn.Module):
  """smp's FPNLateralBlock: 1x1 conv-BN-ReLU of the encoder map plus the upsampled level
  above."""
  channels: int
  dtype: decoders.Dtype = jnp.float32

  @nn.compact
  def __call__(self, above: jnp.ndarray, lateral: jnp.ndarray, train: bool) -> jnp.ndarray:
    lateral = decoders.conv_bn_relu(lateral, self.channels, 1, train, self.dtype,
                                    "conv_norm_relu")
    return decoders.resize_bilinear(above, decoders.output_size(lateral),
                                    align_corners=False) + lateral


class UPerNetDecoder(nn.Module):
  """smp's UPerNetDecoder on four maps (strides 4 to 32). Returns the fused stride-4 map
  and the encoder maps after their LayerNorms (the auxiliary head reads one)."""
  channels: int = 256
  dtype: decoders.Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jnp.ndarray], train: bool
               ) -> tuple[jnp.ndarray, list[jnp.ndarray]]:
    maps = [common.layer_norm(_FEATURE_NORM_EPS, self.dtype, f"feature_norms_{i}")(
        m.astype(self.dtype)) for i, m in enumerate(maps)]
    levels = [PyramidPooling(self.channels, self.dtype, name="psp")(maps[-1], train)]
    for i, lateral in enumerate(maps[-2::-1]):
      levels.append(Lateral(self.channels, self.dtype, name=f"fpn_lateral_blocks_{i}")(
          levels[-1], lateral, train))
    levels[1:] = [decoders.conv_bn_relu(level, self.channels, 3, train, self.dtype,
                                        f"fpn_conv_blocks_{i}")
                  for i, level in enumerate(levels[1:])]
    size = decoders.output_size(levels[-1])
    fused = jnp.concatenate([decoders.resize_bilinear(level, size, align_corners=False)
                             for level in levels[::-1]], axis=-1)
    return decoders.conv_bn_relu(fused, self.channels, 3, train, self.dtype,
                                 "fusion_block"), maps


class MultiLevelNeck(nn.Module):
  """mmsegmentation's MultiLevelNeck: per map a 1x1 conv, a bilinear resize by its scale,
  a 3x3 conv (both with bias; no norm, no activation)."""
  scales: Sequence[float]
  dtype: decoders.Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
    outputs = []
    for i, (x, scale) in enumerate(zip(maps, self.scales)):
      features = x.shape[-1]
      x = decoders.conv(features, 1, self.dtype, f"lateral_convs_{i}", use_bias=True,
                        kernel_init=_neck_init)(x.astype(self.dtype))
      x = decoders.resize_bilinear(x, decoders.scaled_size(decoders.output_size(x), scale),
                                   align_corners=False)
      outputs.append(decoders.conv(features, 3, self.dtype, f"convs_{i}", use_bias=True,
                                   kernel_init=_neck_init)(x))
    return outputs


class AuxiliaryHead(nn.Module):
  """mmsegmentation's auxiliary FCNHead (num_convs=1, concat_input=False)."""
  num_classes: int
  dtype: decoders.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = decoders.conv_bn_relu(x, _AUX_CHANNELS, 3, train, self.dtype, "convs_0")
    x = nn.Dropout(_AUX_DROPOUT)(x, deterministic=not train)
    return decoders.head_conv(self.num_classes, 1, self.dtype, "conv_seg")(x)


class UperNet(decoders.SegmentationModel):
  """UperNet: encoder maps at strides 4-32 (through MultiLevelNeck when `neck_scales` are
  given: ViT), UPerNetDecoder, 1x1 head, upsampling to the input (module docstring)."""
  decoder_channels: int = 256
  # Resize factors of the neck, one per encoder map; None: the encoder is hierarchical.
  neck_scales: Sequence[float] | None = None
  aux_head: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False
               ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
    size = decoders.output_size(x)
    maps = self.encoder(x, train=train, feature_maps=True)
    if self.neck_scales is not None:
      maps = MultiLevelNeck(self.neck_scales, self.dtype, name="neck")(maps)
    x, maps = UPerNetDecoder(self.decoder_channels, self.dtype, name="decoder")(maps, train)
    if not self.num_classes:
      return x.astype(jnp.float32)
    # smp: Upsample(scale_factor=4, align_corners=True) from stride 4; to the input size,
    # which is the same for inputs that are multiples of 32.
    logits = decoders.resize_bilinear(decoders.head_conv(self.num_classes, 1, self.dtype)(x),
                                      size, align_corners=True).astype(jnp.float32)
    if not self.aux_head:
      return logits
    # Built in eval mode too, so `init` creates its variables; jit prunes it there.
    aux = AuxiliaryHead(self.num_classes, self.dtype, name=AUX_HEAD)(maps[_AUX_LEVEL], train)
    aux = decoders.resize_bilinear(aux, size, align_corners=False).astype(jnp.float32)
    return (logits, aux) if train else logits


def _vit_neck_scales(encoder: str) -> tuple[float, ...]:
  """Factors taking ViT's maps at stride = patch size to strides 4, 8, 16, 32."""
  patch = registry.create(encoder, 0).patch_size
  return tuple(patch / stride for stride in (4, 8, 16, 32))


# The encoders an UperNet decodes, by registered name: whether the encoder is plain (one
# stride, as ViT) and needs the neck that makes its feature pyramid.
_NEEDS_NECK_BY_ENCODER = {
    r"swin_\w+": False,
    r"convnext_\w+": False,
    r"vit_\w+": True,
}

for _encoder in registry.list_models():
  for _pattern, _needs_neck in _NEEDS_NECK_BY_ENCODER.items():
    if re.fullmatch(_pattern, _encoder):
      decoders.register(f"upernet_{_encoder}", _encoder, UperNet, auxiliary_heads=(AUX_HEAD,),
                        neck_scales=_vit_neck_scales(_encoder) if _needs_neck else None)
