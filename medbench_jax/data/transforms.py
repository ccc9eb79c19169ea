"""Small named preprocessing ops, composed per config as a `|`-separated spec string.

Example (the reference study's classification training augmentation):
  "random_resized_crop(224)|flip_lr|rotate(7)"

Ops act on one example's uint8 image array (H, W, 1) inside grain workers, with a
per-example numpy Generator so augmentation is deterministic and resumable. The
semantics follow torchvision's transforms, which the reference code uses.
Normalisation to the pretrained source's mean/std happens on the accelerator.
"""

from __future__ import annotations

import ast
import math
from typing import Callable

import cv2
import numpy as np

Op = Callable[[np.ndarray, np.random.Generator], np.ndarray]
OPS: dict[str, Callable[..., Op]] = {}


def register(name: str):
  def wrap(factory):
    OPS[name] = factory
    return factory
  return wrap


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  # Area filter when shrinking approximates PIL's antialiased bilinear resize.
  shrinking = height * width < image.shape[0] * image.shape[1]
  out = cv2.resize(image, (width, height),
                   interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
  return out.reshape(height, width, image.shape[-1])


@register("random_resized_crop")
def random_resized_crop(size: int, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Op:
  """torchvision.transforms.RandomResizedCrop: same sampling of area and aspect."""
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

  def op(image, rng):
    height, width = image.shape[:2]
    area = height * width
    for _ in range(10):
      target_area = area * rng.uniform(*scale)
      aspect = math.exp(rng.uniform(*log_ratio))
      w = int(round(math.sqrt(target_area * aspect)))
      h = int(round(math.sqrt(target_area / aspect)))
      if 0 < w <= width and 0 < h <= height:
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        break
    else:  # Fallback to a central crop, as torchvision does.
      in_ratio = width / height
      if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
      elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
      else:
        w, h = width, height
      top, left = (height - h) // 2, (width - w) // 2
    return _resize(image[top:top + h, left:left + w], size, size)

  return op


@register("flip_lr")
def flip_lr(p: float = 0.5) -> Op:
  def op(image, rng):
    return image[:, ::-1] if rng.uniform() < p else image
  return op


@register("rotate")
def rotate(degrees: float, interpolation: str = "nearest") -> Op:
  """torchvision.transforms.RandomRotation(degrees): uniform angle, zero fill."""
  flags = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR}[interpolation]

  def op(image, rng):
    angle = rng.uniform(-degrees, degrees)
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0)
    out = cv2.warpAffine(image, matrix, (width, height), flags=flags,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.reshape(image.shape)

  return op


@register("resize")
def resize(size: int) -> Op:
  """torchvision.transforms.Resize(int): the shorter side becomes `size`."""
  def op(image, rng):
    del rng
    height, width = image.shape[:2]
    if height <= width:
      return _resize(image, size, int(size * width / height))
    return _resize(image, int(size * height / width), size)
  return op


def _crop_box(height: int, width: int, size: int) -> tuple[int, int]:
  # torchvision rounds the centre-crop offsets.
  return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


@register("center_crop")
def center_crop(size: int) -> Op:
  def op(image, rng):
    del rng
    top, left = _crop_box(*image.shape[:2], size)
    return image[top:top + size, left:left + size]
  return op


@register("ten_crop")
def ten_crop(size: int) -> Op:
  """torchvision.transforms.TenCrop: 4 corners + centre, then the same of the mirror.

  Returns a (10, size, size, C) stack; predictions are averaged over axis 1 of a batch.
  """
  def op(image, rng):
    del rng
    height, width = image.shape[:2]
    top, left = _crop_box(height, width, size)
    boxes = [(0, 0), (0, width - size), (height - size, 0),
             (height - size, width - size), (top, left)]
    crops = [image[t:t + size, l:l + size] for t, l in boxes]
    mirrored = image[:, ::-1]
    crops += [mirrored[t:t + size, l:l + size] for t, l in boxes]
    return np.stack(crops)
  return op


def _parse_op(text: str) -> Op:
  try:
    node = ast.parse(text.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"Cannot parse preprocessing op {text!r}: {e.msg}") from None
  name = node.func.id if isinstance(node, ast.Call) else getattr(node, "id", None)
  if name not in OPS:
    raise ValueError(f"Unknown preprocessing op {text.strip()!r}; available: {sorted(OPS)}")
  if not isinstance(node, ast.Call):
    return OPS[name]()
  args = [ast.literal_eval(a) for a in node.args]
  kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  try:
    return OPS[name](*args, **kwargs)
  except TypeError as e:
    raise ValueError(f"Bad arguments for preprocessing op {text.strip()!r}: {e}") from None


def parse(spec: str) -> Op:
  """Builds one op from a `|`-separated spec (an empty spec is the identity)."""
  ops = [_parse_op(part) for part in spec.split("|") if part.strip()]

  def composed(image, rng):
    for op in ops:
      image = op(image, rng)
    return np.ascontiguousarray(image)

  return composed
