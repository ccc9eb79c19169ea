"""What the segmentation models (unet.py, upernet.py) share: the encoder slot, the layers
segmentation_models_pytorch (smp) builds its decoders from, resizing with PyTorch's
semantics, and the registration that makes `unet_<encoder>` / `upernet_<encoder>` out of a
registered classification model.

A segmentation model holds its encoder, an unmodified classification model of this package
(built with num_classes=0), under the Flax path `encoder`; its decoder is `decoder` and the
final conv `segmentation_head_0`. Submodule names mirror smp's state-dict keys
('decoder.blocks.0.conv1.0.weight' -> params/decoder/blocks_0/conv1_0/kernel), so a whole
smp checkpoint converts with the generic layout conversion plus the encoder's own
converter, and an encoder checkpoint is a classification checkpoint of the encoder.

Registry entries of segmentation models carry, beside the encoder's mean/std/input size:
  encoder          the encoder's registered name (e.g. "resnet50")
  encoder_path     the Flax sub-tree the encoder lives under ("encoder")
  classifier       the segmentation head ("segmentation_head_0"), reset unless keep_head
  auxiliary_heads  further heads (UperNet's deep supervision), reset like the classifier,
                   and fresh whenever the checkpoint has none
weights.load reads them: a checkpoint holding only the encoder fills `encoder` (its
classifier and final norm, unused by the decoder, are dropped) and everything else starts
fresh; a whole segmentation checkpoint must fit everything but the heads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import inspect
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from medbench_jax.models import common
from medbench_jax.models import ops
from medbench_jax.models import registry

Dtype = Any
Size = tuple[int, int]

ENCODER = "encoder"
HEAD = "segmentation_head_0"
# Top-level keys of an smp state dict; `classification_head` (smp's aux_params) has no
# counterpart here and is dropped by weights.formats.
SMP_PARTS = ("encoder.", "decoder.", "segmentation_head.")
# smp's `tu-` encoders wrap timm's FeatureListNet under `encoder.model.`, which renames the
# children of top-level Sequentials 'stages.0' -> 'stages_0'; these are the ones our encoders
# (ConvNeXt, Swin) have. smp's `tu-densenet*` taps other features than its own densenet
# encoder and is not read (its keys do not fit).
_TIMM_WRAPPER = "encoder.model."
_TIMM_FLATTENED = ("stem", "stages", "layers")

# smp's initialize_decoder: kaiming_uniform_(mode='fan_in', nonlinearity='relu'), zero bias;
# initialize_head: xavier_uniform_, zero bias. Norm layers start at scale 1, bias 0.
decoder_init = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
head_init = nn.initializers.xavier_uniform()


# --- layers ---------------------------------------------------------------------------

def conv(features: int, kernel: int, dtype: Dtype, name: str, use_bias: bool = False,
         kernel_init: Callable = decoder_init) -> nn.Conv:
  """Stride-1 square conv padded kernel // 2 on every side (PyTorch's `padding=k // 2`)."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                 use_bias=use_bias, kernel_init=kernel_init, dtype=dtype,
                 param_dtype=jnp.float32, name=name)


def conv_bn_relu(x: jnp.ndarray, features: int, kernel: int, train: bool, dtype: Dtype,
                 name: str) -> jnp.ndarray:
  """smp's Conv2dReLU, a Sequential of bias-free conv, BatchNorm2d and ReLU, created in the
  calling module as `{name}_0` and `{name}_1` (its state-dict keys NAME.0.*, NAME.1.*)."""
  x = conv(features, kernel, dtype, f"{name}_0")(x)
  x = common.BatchNorm(use_running_average=not train, dtype=dtype, name=f"{name}_1")(x)
  return nn.relu(x)


def head_conv(num_classes: int, kernel: int, dtype: Dtype, name: str = HEAD) -> nn.Conv:
  """smp's SegmentationHead conv: bias, xavier-uniform init."""
  return conv(num_classes, kernel, dtype, name, use_bias=True, kernel_init=head_init)


# --- resizing with PyTorch's index arithmetic -----------------------------------------

def output_size(x: jnp.ndarray) -> Size:
  """(H, W) of an NHWC batch."""
  return int(x.shape[1]), int(x.shape[2])


def scaled_size(size: Size, scale: float) -> Size:
  """PyTorch's output size for `F.interpolate(scale_factor=scale)`: floor(size * scale)."""
  return math.floor(size[0] * scale), math.floor(size[1] * scale)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  # torch's 'nearest': floor(dst * in / out), the scale in float32 as its CPU kernel has it.
  scale = np.float32(in_size) / np.float32(out_size)
  return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64),
                    in_size - 1)


def _nearest_axis(x: jnp.ndarray, axis: int, out_size: int) -> jnp.ndarray:
  in_size = x.shape[axis]
  return ops.resample(x, axis, np.eye(in_size)[_nearest_indices(in_size, out_size)],
                      nearest=True)


def resize_nearest(x: jnp.ndarray, size: Size) -> jnp.ndarray:
  """NHWC `F.interpolate(x, size, mode='nearest')`; on the CPU 2x upsampling (smp's U-Net)
  repeats each pixel (ops.resample)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return _nearest_axis(_nearest_axis(x, 1, size[0]), 2, size[1])


def _linear_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
  """(out, in) weights of PyTorch's linear interpolation along one axis."""
  dst = np.arange(out_size, dtype=np.float64)
  if align_corners:
    src = dst * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
  else:
    src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
  low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  weight = src - low
  matrix = np.zeros((out_size, in_size))
  np.add.at(matrix, (dst.astype(np.int64), low), 1 - weight)
  np.add.at(matrix, (dst.astype(np.int64), high), weight)
  return matrix


def resize_bilinear(x: jnp.ndarray, size: Size, align_corners: bool) -> jnp.ndarray:
  """NHWC `F.interpolate(x, size, mode='bilinear', align_corners=...)`: no antialiasing
  when shrinking, edges clamped, corners aligned or half-pixel centres, as PyTorch does."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  x = ops.resample(x, 1, _linear_matrix(x.shape[1], size[0], align_corners))
  return ops.resample(x, 2, _linear_matrix(x.shape[2], size[1], align_corners))


def adaptive_avg_pool(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """NHWC `nn.AdaptiveAvgPool2d(size)`: bin i spans [floor(i n / s), ceil((i + 1) n / s))."""
  def pool(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    n = x.shape[axis]
    bins = [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]
    return jnp.concatenate([
        jnp.mean(x[(slice(None),) * axis + (slice(a, b),)], axis=axis, keepdims=True)
        for a, b in bins], axis=axis)
  return pool(pool(x, 1), 2)


# --- the model's common part ------------------------------------------------------------

class SegmentationModel(nn.Module):
  """An encoder (a classification model of this package, num_classes=0) under `encoder`,
  a decoder, a head with `num_classes` outputs. Logits are float32 at the input resolution;
  num_classes=0 leaves the head out and returns the decoder's output (timm's convention)."""
  encoder: nn.Module
  num_classes: int
  dtype: Dtype = jnp.float32

  # What weights.load logs when it re-initialises the head (`head_conv`'s initialiser).
  head_init = "xavier uniform, zero bias (segmentation_models_pytorch's initialize_head)"

  @property
  def img_size(self) -> int | Sequence[int] | None:
    """The fixed input size of encoders that have one (Swin, ViT), else None."""
    return getattr(self.encoder, "img_size", None)


def split_kwargs(model_cls: type[SegmentationModel], kw: Mapping[str, Any]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the model's own fields, the encoder's) of `models.create` keyword arguments; `dtype`
  goes to both, so encoder and decoder compute alike."""
  own = {f.name for f in dataclasses.fields(model_cls)} - {"encoder", "num_classes",
                                                            "parent", "name"}
  return ({k: v for k, v in kw.items() if k in own},
          {k: v for k, v in kw.items() if k not in own or k == "dtype"})


# --- checkpoints ------------------------------------------------------------------------

def _smp_encoder_key(key: str) -> str:
  """'encoder.layer1.0.conv1.weight' -> 'layer1.0.conv1.weight'; for `tu-` encoders
  'encoder.model.stages_0.blocks.0.gamma' -> 'stages.0.blocks.0.gamma' (timm's keys)."""
  if not key.startswith(_TIMM_WRAPPER):
    return key[len(ENCODER) + 1:]
  key = key[len(_TIMM_WRAPPER):]
  container, sep, rest = key.partition("_")
  if container in _TIMM_FLATTENED and sep and rest[:1].isdigit():
    return f"{container}.{rest}"
  return key


def smp_converter(encoder: str, split: Callable[[Mapping[str, Any]], tuple[dict, dict]]
                  ) -> registry.Converter:
  """The converter of a segmentation model whose encoder is the registered `encoder`.

  An smp state dict (keys encoder.*, decoder.*, segmentation_head.*) becomes the whole
  tree: its encoder part through the encoder's converter (which sees the encoder's model
  keyword arguments, e.g. Swin's img_size, and resizes what it resizes for classification),
  the rest through the generic layout conversion. Any other state dict is taken to be a
  checkpoint of the encoder alone and returned in the encoder's own layout; weights.load
  places it under `encoder`. Keyword `options` of the checkpoint's format (how SimMIM's
  Swin tables are resized) go to the encoder's converter.
  """
  encoder_converter = registry.converter(encoder)

  def convert(state_dict: Mapping[str, np.ndarray],
              model_kw: Mapping[str, Any] | None = None, **options: Any) -> dict[str, dict]:
    encoder_kw = split(model_kw or {})[1]
    if not any(k.startswith(SMP_PARTS) for k in state_dict):
      return encoder_converter(state_dict, encoder_kw, **options)
    prefix = ENCODER + "."
    variables = common.convert_torch_state_dict(
        {k: v for k, v in state_dict.items() if not k.startswith(prefix)})
    encoder_state = {_smp_encoder_key(k): v for k, v in state_dict.items()
                     if k.startswith(prefix)}
    for collection, tree in encoder_converter(encoder_state, encoder_kw, **options).items():
      variables.setdefault(collection, {})[ENCODER] = tree
    return variables
  # weights.load checks the options a checkpoint format needs (SimMIM's table_interpolation)
  # against the converter's signature: they are the encoder's.
  convert.__signature__ = inspect.signature(encoder_converter)
  return convert


# --- registration -----------------------------------------------------------------------

def register(name: str, encoder: str, model_cls: type[SegmentationModel],
             auxiliary_heads: Sequence[str] = (), **fixed: Any) -> None:
  """Registers `name` as `model_cls` on the registered classification model `encoder`.

  `fixed` are fields of `model_cls` this name pins (e.g. whether the encoder has a stride-2
  map); other fields and the encoder's own arguments are `models.create` keywords. The
  entry inherits the encoder's pretrained config (mean, std, input size, ...).
  """
  encoder_cfg = registry.pretrained_cfg(encoder)
  # The encoder's classifier and its head_init are not used: the segmentation head is drawn
  # as smp draws it (SegmentationModel.head_init).
  inherited = {k: v for k, v in encoder_cfg.items()
               if k not in ("first_conv", "classifier", "head_init")}
  split = lambda kw: split_kwargs(model_cls, kw)

  @registry.register(name, converter=smp_converter(encoder, split),
                     first_conv=f"{ENCODER}/{encoder_cfg['first_conv']}", classifier=HEAD,
                     encoder=encoder, encoder_path=ENCODER,
                     auxiliary_heads=tuple(auxiliary_heads), **inherited)
  def factory(num_classes: int, **kw: Any) -> SegmentationModel:
    own, encoder_kw = split(kw)
    return model_cls(encoder=registry.create(encoder, 0, **encoder_kw),
                     num_classes=num_classes, **fixed, **own)
  factory.__name__ = factory.__qualname__ = name

