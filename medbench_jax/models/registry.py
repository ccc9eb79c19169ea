"""The model registry, a leaf module (it imports nothing of the package): timm-named
factories, their pretrained configs and checkpoint converters.

Names follow timm so users can match them to the checkpoints they already have. Each model
file registers its factories with a config (mean/std, input size, first-conv and classifier
parameter paths) and the converter that maps PyTorch state-dict keys onto its Flax tree, so
head reset and channel adaptation are driven by data, never special-cased by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import difflib
from typing import Any

import flax.linen as nn
import numpy as np

from medbench_jax.pixel_stats import IMAGENET_MEAN
from medbench_jax.pixel_stats import IMAGENET_STD

Converter = Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], dict]


# Keys every pretrained config carries. Parameter paths are "/"-joined Flax paths under
# "params" (e.g. "fc", "patch_embed/proj"); input_size is (H, W, C) because images are NHWC.
_DEFAULT_CFG = {
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "input_size": (224, 224, 3),
    "crop_pct": 0.875,
    "interpolation": "bilinear",
}


@dataclasses.dataclass(frozen=True)
class _Entry:
  factory: Callable[..., nn.Module]
  converter: Converter
  cfg: Mapping[str, Any]


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, *, converter: Converter, first_conv: str, classifier: str,
             **cfg: Any) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
  """Decorator registering `factory(num_classes, **kw) -> nn.Module` under `name`.

  `converter` maps a PyTorch state dict of this architecture to Flax variables; the other
  arguments form the pretrained config returned by `pretrained_cfg` (defaults: ImageNet
  mean/std, 224x224x3 input). A `head_init` entry (models.common.HeadInit) is how the
  family's classifier is drawn: `create` hands it to the factory, so a fresh head always
  follows the registered config.
  """
  def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if name in _REGISTRY:
      raise ValueError(f"Model {name!r} is registered twice.")
    full_cfg = {**_DEFAULT_CFG, **cfg, "first_conv": first_conv, "classifier": classifier}
    _REGISTRY[name] = _Entry(factory, converter, full_cfg)
    return factory
  return decorator


def _entry(name: str) -> _Entry:
  if name not in _REGISTRY:
    available = list_models()
    close = difflib.get_close_matches(name, available, n=len(available), cutoff=0.0)
    raise ValueError(f"Unknown model {name!r}. Available models (closest first): "
                     + ", ".join(close))
  return _REGISTRY[name]


def create(name: str, num_classes: int, **kw: Any) -> nn.Module:
  """Builds model `name` with a `num_classes` head (0: return pooled features).

  `kw` overrides architecture fields (e.g. `dtype=jnp.bfloat16`, Swin's `img_size`).
  """
  entry = _entry(name)
  if "head_init" in entry.cfg:
    kw = {"head_init": entry.cfg["head_init"], **kw}
  return entry.factory(num_classes=num_classes, **kw)


def list_models() -> list[str]:
  """Sorted names of all registered models."""
  return sorted(_REGISTRY)


def pretrained_cfg(name: str) -> dict[str, Any]:
  """Copy of the config of `name`: mean, std, input_size (H, W, C), crop_pct,
  interpolation, first_conv and classifier (Flax parameter paths), head_init where the
  family registers one."""
  return dict(_entry(name).cfg)


def converter(name: str) -> Converter:
  """The function mapping a PyTorch state dict of `name` to Flax variables."""
  return _entry(name).converter
