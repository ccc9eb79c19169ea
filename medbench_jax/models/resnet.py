"""ResNet in torchvision's layout (== timm's `resnet*`): v1.5, stride on the 3x3 conv.

Submodule names mirror the PyTorch keys (conv1, bn1, layer1_0/conv1, layer1_0/downsample_0,
fc), so `convert_timm` is the generic layout conversion. BatchNorm follows PyTorch: eps 1e-5,
running statistics updated with torch momentum 0.1 (Flax momentum 0.9) in train mode, which
needs `mutable=['batch_stats']`. One difference remains in train mode: Flax updates the
running variance with the biased batch variance, PyTorch with the unbiased one.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from medbench_jax import models
from medbench_jax.models import common

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _Layers(nn.Module):
  """Mixin giving blocks and the stem PyTorch-equivalent conv and BatchNorm layers."""
  dtype: Any = jnp.float32

  def conv(self, features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    # Explicit symmetric padding: 'SAME' pads (0, 1) at stride 2 where PyTorch pads (1, 1).
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, kernel_init=_conv_init, dtype=self.dtype,
                   param_dtype=jnp.float32, name=name)

  def bn(self, train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=self.dtype, param_dtype=jnp.float32, name=name)


class _Block(_Layers):
  """A residual block: `residual` computes the branch, the shortcut is shared."""
  features: int = 64
  stride: int = 1
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
    y = nn.relu(self.bn(train, "bn1")(self.conv(self.features, 1, 1, "conv1")(x)))
    y = nn.relu(self.bn(train, "bn2")(self.conv(self.features, 3, self.stride, "conv2")(y)))
    return self.bn(train, "bn3")(self.conv(self.features * self.expansion, 1, 1, "conv3")(y))


class ResNet(_Layers):
  """7x7/2 stem, 3x3/2 max pool, four stages, global average pool, `fc` head."""
  block: type[BasicBlock] | type[Bottleneck] = Bottleneck
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = x.astype(self.dtype)
    x = nn.relu(self.bn(train, "bn1")(self.conv(64, 7, 2, "conv1")(x)))
    # Flax pads max_pool with -inf, as PyTorch does.
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = self.block(features=64 * 2**i, stride=stride, dtype=self.dtype,
                       name=f"layer{i + 1}_{j}")(x, train)
    return common.pool_and_classify(x, self.num_classes, self.dtype, "fc")


def convert_timm(state_dict: Mapping[str, np.ndarray],
                 model_kw: Mapping[str, Any] | None = None) -> dict[str, dict]:
  """torchvision/timm ResNet state dict -> {'params', 'batch_stats'}; names already match."""
  del model_kw  # The layout does not depend on the model's hyperparameters.
  return common.convert_torch_state_dict(state_dict)


def _register(name: str, block: type[nn.Module], stage_sizes: Sequence[int]) -> None:
  @models.register(name, converter=convert_timm, first_conv="conv1", classifier="fc")
  def factory(num_classes: int, **kw: Any) -> ResNet:
    return ResNet(block=block, stage_sizes=stage_sizes, num_classes=num_classes, **kw)
  factory.__name__ = factory.__qualname__ = name


for _name, _block, _sizes in (
    ("resnet18", BasicBlock, (2, 2, 2, 2)),
    ("resnet34", BasicBlock, (3, 4, 6, 3)),
    ("resnet50", Bottleneck, (3, 4, 6, 3)),
    ("resnet101", Bottleneck, (3, 4, 23, 3)),
    ("resnet152", Bottleneck, (3, 8, 36, 3)),
):
  _register(_name, _block, _sizes)
