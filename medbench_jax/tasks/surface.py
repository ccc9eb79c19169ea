"""Surface distances of segmentation masks: HD95 and average symmetric surface distance.

A mask's surface is its border: the pixels of the mask that a 4-connected erosion
removes (scipy.ndimage.binary_erosion; pixels on the image edge count as border). The
surface distances of a (prediction, target) pair are, for each surface pixel of
either mask, the Euclidean distance (scipy.ndimage.distance_transform_edt, in units of
`spacing` per pixel) to the nearest surface pixel of the other, both directions
together. HD95 is their 95th percentile (numpy's linear interpolation) and ASSD their
mean, the definitions of medpy.metric.binary.hd95 / assd.

Empty masks:
  both empty  no surface distances; HD95 = ASSD = 0 (perfect agreement, as Dice's
              empty score of 1).
  one empty   every surface pixel of the non-empty mask is at the image diagonal,
              ((H - 1)·dy, (W - 1)·dx), the largest distance the image allows; a missed or
              hallucinated structure scores worst rather than undefined. Such pairs
              are counted (`surface_one_empty`).

Pooled as the study pools Dice (tasks/segmentation.py): `hd95` / `assd` over the
surface distances of all images and classes together, `mean_hd95` / `mean_assd` the
mean over images of each image's value (its classes pooled), and `/NAME` the same
per class. Where a field of view is given (DRIVE), pixels outside it are removed from
both masks first.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import numpy as np
from scipy import ndimage

_STRUCTURE = ndimage.generate_binary_structure(2, 1)
_PERCENTILE = 95


def _spacing(spacing: float | Sequence[float]) -> tuple[float, float]:
  dy, dx = (spacing, spacing) if np.isscalar(spacing) else tuple(spacing)
  if dy <= 0 or dx <= 0:
    raise ValueError(f"pixel spacing must be positive, got {spacing}")
  return float(dy), float(dx)


def border(mask: np.ndarray) -> np.ndarray:
  """The surface pixels of a 2-D boolean mask."""
  mask = np.asarray(mask, bool)
  return mask & ~ndimage.binary_erosion(mask, structure=_STRUCTURE)


def surface_distances(predicted: np.ndarray, target: np.ndarray,
                      spacing: float | Sequence[float] = 1.0) -> np.ndarray:
  """Both directions' surface distances of two 2-D masks (see the module docstring
  for empty masks)."""
  predicted, target = np.asarray(predicted) > 0, np.asarray(target) > 0
  if predicted.shape != target.shape or predicted.ndim != 2:
    raise ValueError(f"masks must be 2-D and equal in shape: {predicted.shape}, "
                     f"{target.shape}")
  dy, dx = _spacing(spacing)
  a, b = border(predicted), border(target)
  if not a.any() and not b.any():
    return np.zeros(0)
  if not a.any() or not b.any():
    diagonal = math.hypot((predicted.shape[0] - 1) * dy, (predicted.shape[1] - 1) * dx)
    return np.full(int(a.sum() + b.sum()), diagonal)
  to_b = ndimage.distance_transform_edt(~b, sampling=(dy, dx))
  to_a = ndimage.distance_transform_edt(~a, sampling=(dy, dx))
  return np.concatenate([to_b[a], to_a[b]])


def hd95(distances: np.ndarray) -> float:
  return float(np.percentile(distances, _PERCENTILE)) if len(distances) else 0.0


def assd(distances: np.ndarray) -> float:
  return float(np.mean(distances)) if len(distances) else 0.0


class SurfaceMetrics:
  """Accumulates surface distances over batches of (N, H, W, K) masks; `result()` pools
  them as the module docstring says."""

  def __init__(self, class_names: Sequence[str], spacing: float | Sequence[float] = 1.0):
    self.class_names = tuple(class_names)
    self.spacing = _spacing(spacing)
    self._per_class: list[list[np.ndarray]] = [[] for _ in self.class_names]
    self._per_image: list[list[np.ndarray]] = []  # [image][class]
    self.one_empty = 0

  def add(self, predicted: np.ndarray, target: np.ndarray,
          fov: np.ndarray | None = None) -> None:
    predicted, target = np.asarray(predicted) > 0, np.asarray(target) > 0
    if predicted.shape != target.shape or predicted.ndim != 4:
      raise ValueError(f"masks must be (N, H, W, K) and equal: {predicted.shape}, "
                       f"{target.shape}")
    if predicted.shape[-1] != len(self.class_names):
      raise ValueError(f"{predicted.shape[-1]} mask channels for {len(self.class_names)} "
                       "classes")
    if fov is not None:
      inside = np.asarray(fov).reshape(predicted.shape[:3] + (1,)) > 0
      predicted, target = predicted & inside, target & inside
    for p, t in zip(predicted, target):
      image = []
      for c in range(len(self.class_names)):
        self.one_empty += int(p[..., c].any() != t[..., c].any())
        distances = surface_distances(p[..., c], t[..., c], self.spacing)
        self._per_class[c].append(distances)
        image.append(distances)
      self._per_image.append(image)

  def result(self) -> dict[str, float]:
    """hd95, assd, mean_hd95, mean_assd, the same per class (`KEY/NAME`), and
    surface_one_empty; NaN before any image."""
    keys = ("hd95", "assd", "mean_hd95", "mean_assd")
    if not self._per_image:
      return {**{k: math.nan for k in keys}, "surface_one_empty": 0}

    def pooled(per_image: list[np.ndarray]) -> dict[str, float]:
      everything = np.concatenate(per_image)
      return {"hd95": hd95(everything), "assd": assd(everything),
              "mean_hd95": float(np.mean([hd95(d) for d in per_image])),
              "mean_assd": float(np.mean([assd(d) for d in per_image]))}

    result = pooled([np.concatenate(image) for image in self._per_image])
    for name, per_image in zip(self.class_names, self._per_class):
      result.update({f"{k}/{name}": v for k, v in pooled(per_image).items()})
    result["surface_one_empty"] = self.one_empty
    return result


def surface_metrics(predicted: np.ndarray, target: np.ndarray, class_names: Sequence[str],
                    spacing: float | Sequence[float] = 1.0,
                    fov: np.ndarray | None = None) -> dict[str, float]:
  """SurfaceMetrics over one (N, H, W, K) set of predicted and target masks."""
  accumulator = SurfaceMetrics(class_names, spacing)
  accumulator.add(predicted, target, fov)
  return accumulator.result()
