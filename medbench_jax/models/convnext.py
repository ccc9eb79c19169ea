"""ConvNeXt (v1) as timm 1.0 builds it (`timm/models/convnext.py`, conv_mlp=False).

Parameter paths mirror timm's keys (stem_0, stages_1/downsample_1,
stages_2/blocks_3/mlp/fc1, .../gamma, head/norm, head/fc), so `convert_timm` is the generic
layout conversion; it also reads the official facebookresearch/ConvNeXt releases
(downsample_layers / dwconv / pwconv / norm / head keys, 1K, 22K and 22K->1K heads alike)
and renames them as timm's checkpoint filter does. The reference study builds ConvNeXt as
`timm.create_model(name, num_classes=...)` (plain Linear `head.fc`, no Sigmoid wrapper), so
its domain-adapted ConvNeXt-B checkpoints are this timm layout inside its engine's
{'lossMIN', 'state_dict', ...} wrapper, which weights/formats.py unwraps. Every LayerNorm
has eps 1e-6; `ls_init_value=None` drops the layer scale (gamma) as in timm. The depthwise
convolutions and LayerNorms are ops.py's: rewritten for XLA:CPU in programs lowered for the
CPU, XLA's grouped convolution and reductions in those lowered for GPUs and TPUs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from medbench_jax.models import common
from medbench_jax.models import ops
from medbench_jax.models import registry

# timm: trunc_normal_(std=.02) on every conv (and Linear: common.Mlp), zero bias.
_conv_init = nn.initializers.truncated_normal(stddev=0.02)
_LN_EPS = 1e-6


def _layer_norm(dtype: Any, name: str) -> ops.LayerNorm:
  return ops.LayerNorm(_LN_EPS, dtype, name=name)


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
  """Unpadded kernel = stride conv: the patch stem and the downsampling layers."""
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding="VALID",
                 kernel_init=_conv_init, dtype=dtype, param_dtype=jnp.float32, name=name)


class ConvNeXtBlock(nn.Module):
  """7x7 depthwise conv, LayerNorm, MLP x4, layer scale, stochastic-depth residual."""
  mlp_ratio: float
  ls_init_value: float | None
  drop_path: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    dim = x.shape[-1]
    # nn.Conv(dim, (7, 7), padding=3, feature_group_count=dim); XLA:CPU gets a faster form
    # (ops.py), GPUs and TPUs the grouped convolution itself.
    y = ops.DepthwiseConv(7, kernel_init=_conv_init, dtype=self.dtype, name="conv_dw")(x)
    y = common.Mlp(int(self.mlp_ratio * dim), self.dtype, name="mlp")(
        _layer_norm(self.dtype, "norm")(y))
    if self.ls_init_value is not None:
      gamma = self.param("gamma", nn.initializers.constant(self.ls_init_value), (dim,),
                         jnp.float32)
      y = y * gamma.astype(self.dtype)
    return x + common.DropPath(self.drop_path)(y, deterministic=not train)


class ConvNeXtStage(nn.Module):
  """Optional downsample (LayerNorm, 2x2/2 conv), then the blocks."""
  dim: int
  depth: int
  downsample: bool
  mlp_ratio: float
  ls_init_value: float | None
  drop_path: Sequence[float]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    if self.downsample:
      x = _layer_norm(self.dtype, "downsample_0")(x)
      x = _conv(self.dim, 2, 2, self.dtype, "downsample_1")(x)
    for j in range(self.depth):
      x = ConvNeXtBlock(self.mlp_ratio, self.ls_init_value, self.drop_path[j], self.dtype,
                        name=f"blocks_{j}")(x, train)
    return x


class NormHead(nn.Module):
  """timm's NormMlpClassifierHead without hidden layer: pool, LayerNorm, `fc`."""
  num_classes: int
  dtype: Any = jnp.float32
  head_init: common.HeadInit = common.TRUNC_NORMAL_HEAD

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = _layer_norm(self.dtype, "norm")(jnp.mean(x, axis=(1, 2)))
    if self.num_classes:
      x = common.classifier(self.num_classes, self.dtype, "fc", self.head_init)(x)
    return x.astype(jnp.float32)


class ConvNeXt(nn.Module):
  """ConvNeXt: 4x4/4 patch stem, four stages, pool -> LayerNorm -> `head/fc`.

  `num_classes=0` returns the pooled, normalised features (timm's
  forward_head(pre_logits=True)). `feature_maps=True` returns the four stage outputs, NHWC
  in the compute dtype, at strides 4, 8, 16, 32 (timm's features_only).
  """
  num_classes: int = 1000
  depths: Sequence[int] = (3, 3, 9, 3)
  dims: Sequence[int] = (96, 192, 384, 768)
  mlp_ratio: float = 4.0
  ls_init_value: float | None = 1e-6
  drop_path_rate: float = 0.0
  head_init: common.HeadInit = common.TRUNC_NORMAL_HEAD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False,
               feature_maps: bool = False) -> jnp.ndarray | list[jnp.ndarray]:
    x = _conv(self.dims[0], 4, 4, self.dtype, "stem_0")(x.astype(self.dtype))
    x = _layer_norm(self.dtype, "stem_1")(x)
    # Stochastic depth grows linearly over all blocks (timm's calculate_drop_path_rates).
    rates = iter(np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist())
    stages = []
    for i, (dim, depth) in enumerate(zip(self.dims, self.depths)):
      x = ConvNeXtStage(dim, depth, downsample=i > 0, mlp_ratio=self.mlp_ratio,
                        ls_init_value=self.ls_init_value,
                        drop_path=tuple(next(rates) for _ in range(depth)), dtype=self.dtype,
                        name=f"stages_{i}")(x, train)
      stages.append(x)
    if feature_maps:
      return stages
    return NormHead(self.num_classes, self.dtype, self.head_init, name="head")(x)


def _official_to_timm(key: str) -> str:
  """facebookresearch/ConvNeXt key -> timm key (timm's convnext checkpoint_filter_fn)."""
  key = re.sub(r"^downsample_layers\.0\.", "stem.", key)
  key = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", key)
  key = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
  key = key.replace(".dwconv.", ".conv_dw.").replace(".pwconv", ".mlp.fc")
  key = re.sub(r"^head\.", "head.fc.", key)
  return re.sub(r"^norm\.", "head.norm.", key)


def convert_timm(state_dict: Mapping[str, np.ndarray],
                 model_kw: Mapping[str, Any] | None = None) -> dict[str, dict]:
  """timm or official (facebookresearch) ConvNeXt state dict -> {'params'}.

  The official layout is recognised by its `downsample_layers.*` keys; its pointwise convs
  are Linear layers as in timm (conv_mlp=False), so only names change. The head keeps its
  checkpoint shape (1000 or 21841 classes); weights.load drops it unless keep_head.
  """
  del model_kw  # The layout does not depend on the model's hyperparameters.
  official = any(k.startswith("downsample_layers.") for k in state_dict)
  return common.convert_torch_state_dict(
      state_dict, rename=_official_to_timm if official else lambda k: k)


_CFG = dict(converter=convert_timm, first_conv="stem_0", classifier="head/fc",
            head_init=common.TRUNC_NORMAL_HEAD, crop_pct=0.875, interpolation="bicubic")


def _register(name: str, depths: Sequence[int], dims: Sequence[int]) -> None:
  @registry.register(name, **_CFG)
  def factory(num_classes: int, **kw: Any) -> ConvNeXt:
    return ConvNeXt(num_classes=num_classes, **{"depths": depths, "dims": dims, **kw})
  factory.__name__ = factory.__qualname__ = name


_register("convnext_tiny", (3, 3, 9, 3), (96, 192, 384, 768))
_register("convnext_small", (3, 3, 27, 3), (96, 192, 384, 768))
_register("convnext_base", (3, 3, 27, 3), (128, 256, 512, 1024))
_register("convnext_large", (3, 3, 27, 3), (192, 384, 768, 1536))
