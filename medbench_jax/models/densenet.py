"""DenseNet-BC as torchvision and timm build it (`densenet121/161/169/201`).

Parameter paths mirror the PyTorch keys (features/conv0, features/denseblock1/denselayer1/
norm1, features/transition1/conv, features/norm5, classifier), so `convert_timm` is the
generic layout conversion plus torchvision's fix for its older published checkpoints, whose
dense layers spell 'norm.1', 'conv.2', ... (torchvision's `_load_state_dict` regex). The
forward is the plain one: torchvision's `memory_efficient` option (gradient checkpointing)
changes memory, not results, and has no counterpart here.

`feature_maps=True` returns, at strides 4, 8, 16, 32, the outputs of dense blocks 1-3
(concatenated features before their transitions) and the final norm5 + ReLU: timm's
`features_only=True, out_indices=(1, 2, 3, 4)`. timm's index 0, the stride-2 stem output,
is left out so every CNN here offers the same four strides.

`smp_features=True` returns instead the five maps segmentation_models_pytorch's DenseNet
encoder gives a U-Net decoder (and the reference study's U-Nets use): the stem after
norm0 + ReLU (stride 2), dense blocks 1-3 after their transition's norm + ReLU, and norm5
without ReLU.
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

# torchvision/timm: kaiming_normal_ with its defaults (fan_in, ReLU gain), untruncated.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# torchvision's pattern for the old 'denselayerN.norm.1' spelling.
_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
  return common.torch_conv(features, kernel, stride, _conv_init, dtype, name)


def _norm_relu(x: jnp.ndarray, train: bool, dtype: Any, name: str) -> jnp.ndarray:
  return nn.relu(common.BatchNorm(use_running_average=not train, dtype=dtype, name=name)(x))


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv (bn_size * k channels), BN-ReLU-3x3 conv: k new channels."""
  growth_rate: int
  bn_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    y = _conv(self.bn_size * self.growth_rate, 1, 1, self.dtype, "conv1")(
        _norm_relu(x, train, self.dtype, "norm1"))
    return _conv(self.growth_rate, 3, 1, self.dtype, "conv2")(
        _norm_relu(y, train, self.dtype, "norm2"))


class DenseBlock(nn.Module):
  """Each layer sees the concatenation of the block input and all earlier layers' outputs."""
  num_layers: int
  growth_rate: int
  bn_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    features = [x]
    for j in range(self.num_layers):
      features.append(DenseLayer(self.growth_rate, self.bn_size, self.dtype,
                                 name=f"denselayer{j + 1}")(jnp.concatenate(features, -1), train))
    return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
  """BN-ReLU-1x1 conv halving the channels, 2x2 average pool. Returns the BN-ReLU output
  (segmentation_models_pytorch's skip feature) too."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    skip = _norm_relu(x, train, self.dtype, "norm")
    x = _conv(x.shape[-1] // 2, 1, 1, self.dtype, "conv")(skip)
    return skip, nn.avg_pool(x, (2, 2), (2, 2))


class Features(nn.Module):
  """torchvision's `features` Sequential; returns the outputs at strides 4, 8, 16, 32, or
  with `smp_features` segmentation_models_pytorch's five maps (module docstring)."""
  growth_rate: int
  block_config: Sequence[int]
  bn_size: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool, smp_features: bool = False
               ) -> list[jnp.ndarray]:
    x = _conv(2 * self.growth_rate, 7, 2, self.dtype, "conv0")(x)
    x = _norm_relu(x, train, self.dtype, "norm0")
    smp_maps = [x]
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # -inf padding, as torch
    maps = []
    for i, num_layers in enumerate(self.block_config):
      x = DenseBlock(num_layers, self.growth_rate, self.bn_size, self.dtype,
                     name=f"denseblock{i + 1}")(x, train)
      if i < len(self.block_config) - 1:
        maps.append(x)
        skip, x = Transition(self.dtype, name=f"transition{i + 1}")(x, train)
        smp_maps.append(skip)
    x = common.BatchNorm(use_running_average=not train, dtype=self.dtype, name="norm5")(x)
    return [*smp_maps, x] if smp_features else [*maps, nn.relu(x)]


class DenseNet(nn.Module):
  """DenseNet-BC: 7x7/2 stem with 2k channels, dense blocks joined by halving transitions."""
  num_classes: int = 1000
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  bn_size: int = 4
  head_init: common.HeadInit = common.NORMAL_HEAD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False, feature_maps: bool = False,
               smp_features: bool = False) -> jnp.ndarray | list[jnp.ndarray]:
    """Logits (pooled features if num_classes == 0), or with `feature_maps` the NHWC maps at
    strides 4, 8, 16, 32, or with `smp_features` the five maps at strides 2 to 32 (see the
    module docstring)."""
    maps = Features(self.growth_rate, self.block_config, self.bn_size, self.dtype,
                    name="features")(x.astype(self.dtype), train, smp_features)
    if feature_maps or smp_features:
      return maps
    return common.pool_and_classify(maps[-1], self.num_classes, self.dtype, "classifier",
                                    self.head_init)


def convert_timm(state_dict: Mapping[str, np.ndarray],
                 model_kw: Mapping[str, Any] | None = None) -> dict[str, dict]:
  """torchvision/timm DenseNet state dict (either key spelling) -> {'params', 'batch_stats'}."""
  del model_kw  # The layout does not depend on the model's hyperparameters.
  return common.convert_torch_state_dict(state_dict, rename=lambda k: _OLD_KEY.sub(r"\1\2", k))


def _register(name: str, growth_rate: int, block_config: Sequence[int]) -> None:
  @registry.register(name, converter=convert_timm, first_conv="features/conv0",
                   classifier="classifier", head_init=common.NORMAL_HEAD,
                   interpolation="bicubic")
  def factory(num_classes: int, **kw: Any) -> DenseNet:
    return DenseNet(num_classes=num_classes,
                    **{"growth_rate": growth_rate, "block_config": block_config, **kw})
  factory.__name__ = factory.__qualname__ = name


_register("densenet121", 32, (6, 12, 24, 16))
# Growth 48: its stem's 2k = 96 channels are torchvision's num_init_features=96.
_register("densenet161", 48, (6, 12, 36, 24))
_register("densenet169", 32, (6, 12, 32, 32))
_register("densenet201", 32, (6, 12, 48, 32))
