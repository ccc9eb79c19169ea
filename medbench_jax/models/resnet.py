"""ResNet in torchvision's layout (== timm's `resnet*`): v1.5, stride on the 3x3 conv.

Submodule names mirror the PyTorch keys (conv1, bn1, layer1_0/conv1, layer1_0/downsample_0,
fc), so `convert_timm` is the generic layout conversion. BatchNorm is PyTorch's
(common.BatchNorm); train mode needs `mutable=['batch_stats']`.

Two ways of widening share the code:
  * wide_resnet50_2 / wide_resnet101_2 (torchvision, timm): bottleneck inner width x2
    (`width_per_group=128`); stem and block outputs as in resnet50/101.
  * SimCLR's ResNet-50 (1x), (2x), (4x), registered as resnet50x1/x2/x4: the TF release
    (google-research/simclr resnet.py) multiplies every channel count by the width, stem
    and block outputs included (`width_multiplier`). They load from the two PyTorch
    conversions in use: tonylins/simclr-converter (v1; torchvision keys, {'state_dict': ...})
    and Separius/SimCLRv2-Pytorch (v2 without selective kernels, r50_1x/2x_sk0; its own
    `net.S...` keys, {'resnet': ..., 'head': ...}). SimCLR models take RGB in [0, 1] without
    mean/std normalization, as their pretrained config says. Both converters pad the stem
    max pool as torchvision does (1, 1), where TF's 'SAME' pads (0, 1): we follow the
    PyTorch checkpoints.

`feature_maps=True` returns the outputs of layer1..layer4 (strides 4, 8, 16, 32), timm's
`features_only=True, out_indices=(1, 2, 3, 4)`. `smp_features=True` returns the stem's
output (after its ReLU, before the max pool; stride 2) first and then those four: the maps
segmentation_models_pytorch's ResNet encoder gives a U-Net decoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from medbench_jax.models import common
from medbench_jax.models import registry

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _Layers(nn.Module):
  """Mixin giving blocks and the stem PyTorch-equivalent conv and BatchNorm layers."""
  dtype: Any = jnp.float32

  def conv(self, features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    return common.torch_conv(features, kernel, stride, _conv_init, self.dtype, name)

  def bn(self, train: bool, name: str) -> common.BatchNorm:
    return common.BatchNorm(use_running_average=not train, dtype=self.dtype, name=name)


class _Block(_Layers):
  """A residual block: `residual` computes the branch, the shortcut is shared."""
  features: int = 64
  stride: int = 1
  # torchvision's base width: Bottleneck's inner width is features * width_per_group / 64.
  width_per_group: int = 64
  expansion = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    y = self.residual(x, train)
    return nn.relu(y + self.shortcut(x, self.features * self.expansion, train))

  def residual(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    raise NotImplementedError

  def shortcut(self, x: jnp.ndarray, features: int, train: bool) -> jnp.ndarray:
    """Identity, or 1x1 strided conv + BN ('downsample.0/1' in PyTorch) when the shape changes."""
    if self.stride == 1 and x.shape[-1] == features:
      return x
    x = self.conv(features, 1, self.stride, "downsample_0")(x)
    return self.bn(train, "downsample_1")(x)


class BasicBlock(_Block):
  """Two 3x3 convs (resnet18/34)."""

  def residual(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    y = nn.relu(self.bn(train, "bn1")(self.conv(self.features, 3, self.stride, "conv1")(x)))
    return self.bn(train, "bn2")(self.conv(self.features, 3, 1, "conv2")(y))


class Bottleneck(_Block):
  """1x1 reduce, 3x3 (carrying the stride, v1.5), 1x1 expand x4 (resnet50/101/152)."""
  expansion = 4

  def residual(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    width = self.features * self.width_per_group // 64
    y = nn.relu(self.bn(train, "bn1")(self.conv(width, 1, 1, "conv1")(x)))
    y = nn.relu(self.bn(train, "bn2")(self.conv(width, 3, self.stride, "conv2")(y)))
    return self.bn(train, "bn3")(self.conv(self.features * self.expansion, 1, 1, "conv3")(y))


class ResNet(_Layers):
  """7x7/2 stem, 3x3/2 max pool, four stages, global average pool, `fc` head.

  `width_multiplier` scales every channel count (SimCLR's wide ResNets); `width_per_group`
  only the bottleneck's inner width (wide_resnet*_2).
  """
  block: type[BasicBlock] | type[Bottleneck] = Bottleneck
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  num_classes: int = 1000
  width_multiplier: int = 1
  width_per_group: int = 64
  head_init: common.HeadInit = common.NORMAL_HEAD

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False, feature_maps: bool = False,
               smp_features: bool = False) -> jnp.ndarray | list[jnp.ndarray]:
    """Logits (pooled features if num_classes == 0), or with `feature_maps` the NHWC outputs
    of the four stages at strides 4, 8, 16, 32 (with `smp_features`, the stride-2 stem output
    before them)."""
    width = 64 * self.width_multiplier
    x = x.astype(self.dtype)
    x = nn.relu(self.bn(train, "bn1")(self.conv(width, 7, 2, "conv1")(x)))
    stem = x
    # Flax pads max_pool with -inf, as PyTorch does.
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    maps = []
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = self.block(features=width * 2**i, stride=stride,
                       width_per_group=self.width_per_group, dtype=self.dtype,
                       name=f"layer{i + 1}_{j}")(x, train)
      maps.append(x)
    if smp_features:
      return [stem, *maps]
    if feature_maps:
      return maps
    return common.pool_and_classify(x, self.num_classes, self.dtype, "fc", self.head_init)


# Separius/SimCLRv2-Pytorch keys -> torchvision's. Its blocks are Sequentials of
# conv, BatchNormRelu (a Sequential holding the BN at index 0), conv, ...; stage s is net.s.
_SEPARIUS_RENAMES = (
    (r"^net\.0\.0\.", "conv1."),
    (r"^net\.0\.1\.0\.", "bn1."),
    (r"^net\.(\d)\.blocks\.(\d+)\.projection\.shortcut\.", r"layer\1.\2.downsample.0."),
    (r"^net\.(\d)\.blocks\.(\d+)\.projection\.bn\.0\.", r"layer\1.\2.downsample.1."),
    (r"^net\.(\d)\.blocks\.(\d+)\.net\.([024])\.",
     lambda m: f"layer{m[1]}.{m[2]}.conv{int(m[3]) // 2 + 1}."),
    (r"^net\.(\d)\.blocks\.(\d+)\.net\.([135])\.0\.",
     lambda m: f"layer{m[1]}.{m[2]}.bn{(int(m[3]) + 1) // 2}."),
)


def _separius_to_torchvision(key: str) -> str:
  for pattern, replacement in _SEPARIUS_RENAMES:
    key, n = re.subn(pattern, replacement, key)
    if n:
      return key
  return key


def convert_timm(state_dict: Mapping[str, np.ndarray],
                 model_kw: Mapping[str, Any] | None = None) -> dict[str, dict]:
  """torchvision/timm ResNet state dict -> {'params', 'batch_stats'}; names already match.

  Also reads Separius/SimCLRv2-Pytorch conversions (keys 'net.0.0.weight', ...), renamed to
  torchvision's; their selective-kernel (sk1) variants are a different architecture.
  """
  del model_kw  # The layout does not depend on the model's hyperparameters.
  rename = lambda k: k
  if "net.0.0.weight" in state_dict:
    if any("mixing_conv" in k for k in state_dict):
      raise ValueError("Selective-kernel SimCLRv2 checkpoints (*_sk1) are not supported; "
                       "use an sk0 checkpoint (plain ResNet).")
    rename = _separius_to_torchvision
  return common.convert_torch_state_dict(state_dict, rename=rename)


_SIMCLR_CFG = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bicubic")


def _register(name: str, block: type[nn.Module], stage_sizes: Sequence[int],
              cfg: Mapping[str, Any] | None = None, **arch: Any) -> None:
  @registry.register(name, converter=convert_timm, first_conv="conv1", classifier="fc",
                   head_init=common.NORMAL_HEAD, **(cfg or {}))
  def factory(num_classes: int, **kw: Any) -> ResNet:
    return ResNet(num_classes=num_classes,
                  **{"block": block, "stage_sizes": stage_sizes, **arch, **kw})
  factory.__name__ = factory.__qualname__ = name


for _name, _block, _sizes in (
    ("resnet18", BasicBlock, (2, 2, 2, 2)),
    ("resnet34", BasicBlock, (3, 4, 6, 3)),
    ("resnet50", Bottleneck, (3, 4, 6, 3)),
    ("resnet101", Bottleneck, (3, 4, 23, 3)),
    ("resnet152", Bottleneck, (3, 8, 36, 3)),
):
  _register(_name, _block, _sizes)
_register("wide_resnet50_2", Bottleneck, (3, 4, 6, 3), width_per_group=128)
_register("wide_resnet101_2", Bottleneck, (3, 4, 23, 3), width_per_group=128)
for _width in (1, 2, 4):
  _register(f"resnet50x{_width}", Bottleneck, (3, 4, 6, 3), _SIMCLR_CFG,
            width_multiplier=_width)
