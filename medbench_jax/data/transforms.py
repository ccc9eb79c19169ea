"""Small named preprocessing ops, composed per config as a `|`-separated spec string.

`OPS` is the one table of op names and arguments. Each op has a host implementation,
registered here, and where it has one a device implementation (data/device_transforms.py)
that takes the same arguments. `parse_spec` is the one parser: it checks a spec's ops and
binds their arguments; `parse` builds the host op from them and
`device_transforms.device_ops` the device ops.

Examples (the reference study's training augmentations):
  "random_resized_crop(224)|flip_lr|rotate(7)"    classification
  "seg_augment(224)"                              segmentation

Ops take and return one example (a dict of numpy arrays) inside grain workers, with a
per-example numpy Generator so augmentation is deterministic and resumable. The
geometric ops (random_resized_crop, flip_lr, rotate, resize, center_crop) move the
image, the mask and the FOV, where the example has them, with the same sampled
parameters: the image by the op's interpolation, masks by nearest neighbour, so
they stay 0/1 (the arrays an op moves share their height and width). `keys=(...)`
restricts an op to some keys, e.g. segmentation evaluation resizes the image only:
`resize(224, keys=("image",))`. ten_crop stacks crops of the image. The semantics
follow torchvision's transforms, which the reference code uses. Images are resampled
with OpenCV's area filter when shrinking (bilinear when enlarging), or with
`interpolation="pil_bilinear"` exactly as torchvision resamples the reference's PIL
images. Normalization to the pretrained source's mean/std (pipeline.normalize) happens
on the accelerator.

The reference study's classification preprocessing, from the original images
(recipes.py's paper setting):
  train  "random_resized_crop(224, interpolation='pil_bilinear')|flip_lr|rotate(7)"
  eval   "resize((256, 256), interpolation='pil_bilinear')|center_crop(224)"
  test   "resize((256, 256), interpolation='pil_bilinear')|ten_crop(224)"
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Sequence
import dataclasses
import inspect
import math
from typing import Any

import cv2
import numpy as np
import PIL.Image

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]
# An op's effect on one array, once its random parameters are drawn: (array, is_mask).
ArrayOp = Callable[[np.ndarray, bool], np.ndarray]
# Draws an op's random parameters from the image's shape and the generator.
Draw = Callable[[tuple[int, ...], np.random.Generator], ArrayOp]

SPATIAL_KEYS = ("image", "mask", "fov")
INTERPOLATIONS = ("area", "pil_bilinear")
MASK_KEYS = ("mask", "fov")


@dataclasses.dataclass
class OpDef:
  """A named op: its host implementation and, where it has one, its device implementation.

  `host` is a factory of `Op`s whose signature is the op's arguments, for both
  implementations: `device` (data/device_transforms.py registers it) is called with the
  same arguments, bound to that signature with its defaults filled in.
  """
  host: Callable[..., Op]
  device: Callable[..., Any] | None = None


# The op table: every spec, on the host or on the device, names ops of it.
OPS: dict[str, OpDef] = {}


def register(name: str):
  """Registers a host op factory under `name`."""
  def wrap(factory):
    OPS[name] = OpDef(factory)
    return factory
  return wrap


def register_device(name: str):
  """Registers the device implementation of the host op `name`."""
  def wrap(implementation):
    OPS[name].device = implementation
    return implementation
  return wrap


def _spatial(draw: Draw, keys: Sequence[str] | None, default: Sequence[str] = SPATIAL_KEYS
             ) -> Op:
  """An op that draws its parameters once per example and applies them to every key."""
  keys = tuple(default if keys is None else keys)

  def op(example, rng):
    present = [key for key in keys if key in example]
    if not present:
      return example
    apply = draw(np.shape(example[present[0]]), rng)
    return {**example, **{key: apply(example[key], key in MASK_KEYS) for key in present}}

  return op


def check_interpolation(interpolation: str) -> None:
  """A resize's `interpolation` argument, or a ValueError naming the allowed ones."""
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"interpolation={interpolation!r}; allowed: {INTERPOLATIONS}")


def check_rotate_interpolation(interpolation: str) -> None:
  """rotate's `interpolation` argument, or a ValueError naming the allowed ones."""
  if interpolation not in ("nearest", "bilinear"):
    raise ValueError(f"rotate: interpolation={interpolation!r} is not one of "
                     "('nearest', 'bilinear')")


def _resize(image: np.ndarray, height: int, width: int, nearest: bool = False,
            interpolation: str = "area") -> np.ndarray:
  if not nearest and interpolation == "pil_bilinear" and image.shape[-1] in (1, 3):
    # torchvision's Resize on a PIL image: Image.resize(BILINEAR), antialiased.
    pil = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize((width, height), PIL.Image.Resampling.BILINEAR))
    return out.reshape(height, width, image.shape[-1])
  if nearest:
    interpolation = cv2.INTER_NEAREST
  else:
    # Area filter when shrinking approximates PIL's antialiased bilinear resize.
    shrinking = height * width < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
  out = cv2.resize(image, (width, height), interpolation=interpolation)
  return out.reshape(height, width, image.shape[-1])


@register("random_resized_crop")
def random_resized_crop(size: int, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        keys: Sequence[str] | None = None, *,
                        interpolation: str = "area") -> Op:
  """torchvision.transforms.RandomResizedCrop: same sampling of area and aspect."""
  check_interpolation(interpolation)
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

  def draw(shape, rng):
    height, width = shape[:2]
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
    return lambda a, nearest: _resize(a[top:top + h, left:left + w], size, size, nearest,
                                      interpolation)

  return _spatial(draw, keys)


@register("flip_lr")
def flip_lr(p: float = 0.5, keys: Sequence[str] | None = None) -> Op:
  def draw(shape, rng):
    del shape
    flip = rng.uniform() < p
    return lambda a, nearest: a[:, ::-1] if flip else a
  return _spatial(draw, keys)


@register("rotate")
def rotate(degrees: float, interpolation: str = "nearest",
           keys: Sequence[str] | None = None) -> Op:
  """torchvision.transforms.RandomRotation(degrees): uniform angle, zero fill."""
  check_rotate_interpolation(interpolation)
  flags = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR}[interpolation]

  def draw(shape, rng):
    angle = rng.uniform(-degrees, degrees)
    height, width = shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0)

    def apply(a, nearest):
      out = cv2.warpAffine(a, matrix, (width, height),
                           flags=cv2.INTER_NEAREST if nearest else flags,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
      return out.reshape(a.shape)

    return apply

  return _spatial(draw, keys)


@register("resize")
def resize(size: int | tuple[int, int], keys: Sequence[str] | None = None, *,
           interpolation: str = "area") -> Op:
  """torchvision.transforms.Resize: an int makes the shorter side `size` (aspect kept);
  (height, width) makes the image exactly that, as the reference's Resize((256, 256))."""
  check_interpolation(interpolation)

  def draw(shape, rng):
    del rng
    height, width = shape[:2]
    if not isinstance(size, int):
      target = tuple(size)
    elif height <= width:
      target = (size, int(size * width / height))
    else:
      target = (int(size * height / width), size)
    return lambda a, nearest: _resize(a, *target, nearest, interpolation)

  return _spatial(draw, keys)


def crop_box(height: int, width: int, size: int) -> tuple[int, int]:
  """(top, left) of the central `size` crop; torchvision rounds the offsets."""
  return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


@register("center_crop")
def center_crop(size: int, keys: Sequence[str] | None = None) -> Op:
  def draw(shape, rng):
    del rng
    top, left = crop_box(*shape[:2], size)
    return lambda a, nearest: a[top:top + size, left:left + size]
  return _spatial(draw, keys)


@register("ten_crop")
def ten_crop(size: int, keys: Sequence[str] | None = None) -> Op:
  """torchvision.transforms.TenCrop: 4 corners + centre, then the same of the mirror.

  Makes the image a (10, size, size, C) stack; predictions are averaged over axis 1
  of a batch.
  """
  def draw(shape, rng):
    del rng
    height, width = shape[:2]
    top, left = crop_box(height, width, size)
    boxes = [(0, 0), (0, width - size), (height - size, 0),
             (height - size, width - size), (top, left)]

    def apply(a, nearest):
      del nearest
      crops = [a[top:top + size, left:left + size] for top, left in boxes]
      mirrored = a[:, ::-1]
      crops += [mirrored[top:top + size, left:left + size] for top, left in boxes]
      return np.stack(crops)

    return apply

  return _spatial(draw, keys, default=("image",))


@register("seg_augment")
def seg_augment(size: int) -> Op:
  """The study's segmentation training augmentation (data/seg_augment.py)."""
  # albumentations takes seconds to import: only the specs that use it pay for it.
  from medbench_jax.data import seg_augment as study
  return study.SegAugment(size)


@dataclasses.dataclass(frozen=True)
class OpCall:
  """One op of a spec: its text, its name in OPS and its arguments, bound to the op's
  signature with the defaults filled in (lists made tuples)."""
  text: str
  name: str
  arguments: dict[str, Any]

  def host(self) -> Op:
    try:
      return OPS[self.name].host(**self.arguments)
    except TypeError as e:
      raise ValueError(f"Bad arguments for preprocessing op {self.text!r}: {e}") from None

  def device(self) -> Any:
    """The device op; the op must have a device implementation."""
    try:
      return OPS[self.name].device(**self.arguments)
    except (TypeError, ValueError) as e:
      raise ValueError(f"Bad arguments for preprocessing op {self.text!r}: {e}") from None


def _literal(node: ast.expr) -> Any:
  value = ast.literal_eval(node)
  return tuple(value) if isinstance(value, list) else value


def _parse_op(text: str) -> OpCall:
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"Cannot parse preprocessing op {text!r}: {e.msg}") from None
  call = node if isinstance(node, ast.Call) else None
  name = getattr(call.func if call else node, "id", None)
  if name not in OPS:
    raise ValueError(f"Unknown preprocessing op {text!r}; available: {sorted(OPS)}")
  try:
    args = [_literal(a) for a in call.args] if call else []
    kwargs = {k.arg: _literal(k.value) for k in call.keywords} if call else {}
    bound = inspect.signature(OPS[name].host).bind(*args, **kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"Bad arguments for preprocessing op {text!r}: {e}") from None
  bound.apply_defaults()
  return OpCall(text, name, dict(bound.arguments))


def parse_spec(spec: str) -> list[OpCall]:
  """The ops of a `|`-separated spec, checked against OPS (an empty spec has none)."""
  return [_parse_op(part.strip()) for part in spec.split("|") if part.strip()]


def parse(spec: str) -> Op:
  """The host op of a spec: its ops one after the other (an empty spec is the identity)."""
  ops = [call.host() for call in parse_spec(spec)]

  def composed(example, rng):
    for op in ops:
      example = op(example, rng)
    return {key: np.ascontiguousarray(value) if key in SPATIAL_KEYS else value
            for key, value in example.items()}

  return composed
