"""On-device training augmentation: the geometric ops of transforms.py inside the jitted step.

With `config.input.augment_on_device`, the host pipeline ships the stored uint8 images
untouched and the training spec (`config.input.pp_train`, the same string) runs here,
on the accelerators, vectorised over the global batch and sharded like it: a pod slice
or an 8-GPU node is then no longer bound by its hosts' CPUs. The spec is parsed by
transforms.parse_spec against the one op table, transforms.OPS, where each class below
is registered as the device implementation of its host op: names, arguments and random
distributions are those of transforms.py (torchvision's semantics):

  random_resized_crop(size[, scale=(a, b), ratio=(c, d)])   area ~ U(scale) x image
      area and log-aspect ~ U(log ratio), up to 10 tries (drawn at once, the first valid
      one kept), else the central crop
  flip_lr[(p=0.5)]   rotate(degrees[, interpolation="nearest"])   angle ~ U(-d, d)
      about the centre, zero fill
  resize(size or (height, width))   center_crop(size)         deterministic
and each takes `keys=(...)` as the host op does. Ops without a device implementation
(ten_crop, seg_augment) and `interpolation="pil_bilinear"` are refused.

Every op maps its output pixels' coordinates back into its input; the maps of all ops
are chained per example and the stored array is sampled once: images bilinearly, masks
("mask", "fov") by nearest neighbour with the same map, so they stay 0/1. Chaining
reproduces the host's intermediate grids: a nearest-neighbour rotation rounds the
coordinate as it would, a resize clamps at its input's edges as OpenCV does, a rotation
fills zeros outside its input. What differs from the host ops: one bilinear sample where
the host resamples twice (e.g. `resize` then a bilinear `rotate`), bilinear where the host
shrinks with OpenCV's area filter, and centre-aligned nearest neighbour for masks where
OpenCV's is offset by up to half a pixel. Images come out as float32 in the 0-255 range
for pipeline.normalize; other keys (labels) pass through.

Randomness is per example, from (trial seed, global step, index in the global batch)
with jax.random.fold_in: an augmented batch depends on neither the device count nor the
sharding, and a resumed run (the step is in the train state) repeats it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from medbench_jax.data import transforms

SPATIAL_KEYS = transforms.SPATIAL_KEYS
MASK_KEYS = transforms.MASK_KEYS
# The host op's tries before falling back to the central crop (torchvision's).
_CROP_TRIES = 10
Params = dict[str, jax.Array]
Shape = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Stage:
  """One op's geometry for one example: where its output pixels lie in its input.

  (row, col) of the input = `matrix` @ (row, col, 1) of the output pixel. `low`/`high`
  bound the input pixels the op reads (inclusive); `resample` is how it reads between
  them ("none": integer maps such as crops and flips, "linear", "nearest"); with `fill`
  the op reads zeros outside the bounds (rotation), else the edge pixels (resize).
  """
  matrix: jax.Array
  low: jax.Array
  high: jax.Array
  resample: str = "none"
  fill: bool = False


def _box(shape: Shape) -> tuple[jax.Array, jax.Array]:
  return jnp.zeros(2, jnp.float32), jnp.asarray(shape, jnp.float32) - 1


def _scale_translate(scale: Sequence[Any], offset: Sequence[Any]) -> jax.Array:
  return jnp.array([[scale[0], 0.0, offset[0]], [0.0, scale[1], offset[1]]], jnp.float32)


def _resized_box_stage(top: Any, left: Any, height: Any, width: Any, out_shape: Shape
                       ) -> Stage:
  """The box [top, top+height) x [left, left+width) resized to `out_shape` (pixel centres
  aligned, as OpenCV and torchvision resize)."""
  box = jnp.asarray([top, left, height, width], jnp.float32)
  scale = box[2:] / jnp.asarray(out_shape, jnp.float32)
  matrix = _scale_translate(scale, box[:2] + 0.5 * scale - 0.5)
  return Stage(matrix, box[:2], box[:2] + box[2:] - 1, resample="linear")


def _check_interpolation(op: str, interpolation: str) -> None:
  """The device resamples images bilinearly: the host's default area filter is
  approximated so (see above), PIL's antialiased bilinear is not."""
  transforms.check_interpolation(interpolation)
  if interpolation != "area":
    raise ValueError(f"{op}: interpolation={interpolation!r} has no device version; "
                     "on the device: 'area' (resampled bilinearly)")


@transforms.register_device("random_resized_crop")
@dataclasses.dataclass(frozen=True)
class RandomResizedCrop:
  """transforms.random_resized_crop: torchvision.transforms.RandomResizedCrop."""
  size: int
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  keys: tuple[str, ...] | None = None
  interpolation: str = "area"

  def __post_init__(self):
    _check_interpolation("random_resized_crop", self.interpolation)

  def output_shape(self, shape: Shape) -> Shape:
    del shape
    return (self.size, self.size)

  def sample(self, key: jax.Array, shape: Shape) -> Params:
    height, width = shape
    area_key, aspect_key, top_key, left_key = jax.random.split(key, 4)
    target_area = height * width * jax.random.uniform(
        area_key, (_CROP_TRIES,), minval=self.scale[0], maxval=self.scale[1])
    aspect = jnp.exp(log_uniform(aspect_key, (_CROP_TRIES,), *self.ratio))
    w = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(valid)
    found = valid[first]
    fallback_h, fallback_w = self._central_crop(shape)
    h = jnp.where(found, h[first], fallback_h)
    w = jnp.where(found, w[first], fallback_w)
    top = jnp.where(found, jax.random.randint(top_key, (), 0, height - h + 1),
                    (height - h) // 2)
    left = jnp.where(found, jax.random.randint(left_key, (), 0, width - w + 1),
                     (width - w) // 2)
    return {"top": top, "left": left, "height": h, "width": w}

  def _central_crop(self, shape: Shape) -> tuple[int, int]:
    """(height, width) of torchvision's fallback: the whole image, clipped to `ratio`."""
    height, width = shape
    in_ratio = width / height
    if in_ratio < self.ratio[0]:
      return int(round(width / self.ratio[0])), width
    if in_ratio > self.ratio[1]:
      return height, int(round(height * self.ratio[1]))
    return height, width

  def stage(self, params: Params, shape: Shape) -> Stage:
    return _resized_box_stage(params["top"], params["left"], params["height"],
                              params["width"], self.output_shape(shape))


def log_uniform(key: jax.Array, shape: Sequence[int], low: float, high: float
                ) -> jax.Array:
  """log of a log-uniform draw in [low, high): torchvision's aspect-ratio distribution."""
  return jax.random.uniform(key, shape, minval=math.log(low), maxval=math.log(high))


@transforms.register_device("flip_lr")
@dataclasses.dataclass(frozen=True)
class FlipLR:
  """transforms.flip_lr: a left-right mirror with probability p."""
  p: float = 0.5
  keys: tuple[str, ...] | None = None

  def output_shape(self, shape: Shape) -> Shape:
    return shape

  def sample(self, key: jax.Array, shape: Shape) -> Params:
    del shape
    return {"flip": jax.random.uniform(key) < self.p}

  def stage(self, params: Params, shape: Shape) -> Stage:
    flip = params["flip"]
    matrix = _scale_translate((1.0, jnp.where(flip, -1.0, 1.0)),
                              (0.0, jnp.where(flip, shape[1] - 1.0, 0.0)))
    return Stage(matrix, *_box(shape))


@transforms.register_device("rotate")
@dataclasses.dataclass(frozen=True)
class Rotate:
  """transforms.rotate: torchvision.transforms.RandomRotation(degrees), zero fill."""
  degrees: float
  interpolation: str = "nearest"
  keys: tuple[str, ...] | None = None

  def __post_init__(self):
    transforms.check_rotate_interpolation(self.interpolation)

  def output_shape(self, shape: Shape) -> Shape:
    return shape

  def sample(self, key: jax.Array, shape: Shape) -> Params:
    del shape
    return {"angle": jax.random.uniform(key, minval=-self.degrees, maxval=self.degrees)}

  def stage(self, params: Params, shape: Shape) -> Stage:
    # OpenCV's getRotationMatrix2D(centre, angle) turns the image counter-clockwise by
    # `angle` degrees about the centre; this is its inverse, in (row, col) order.
    radians = jnp.deg2rad(params["angle"].astype(jnp.float32))
    cos, sin = jnp.cos(radians), jnp.sin(radians)
    centre = (jnp.asarray(shape, jnp.float32) - 1) / 2
    linear = jnp.array([[cos, sin], [-sin, cos]])
    matrix = jnp.concatenate([linear, (centre - linear @ centre)[:, None]], axis=1)
    resample = "linear" if self.interpolation == "bilinear" else "nearest"
    return Stage(matrix, *_box(shape), resample=resample, fill=True)


@transforms.register_device("resize")
@dataclasses.dataclass(frozen=True)
class Resize:
  """transforms.resize: torchvision.transforms.Resize: an int makes the shorter side
  `size`, (height, width) makes the image exactly that."""
  size: int | tuple[int, int]
  keys: tuple[str, ...] | None = None
  interpolation: str = "area"

  def __post_init__(self):
    _check_interpolation("resize", self.interpolation)

  def output_shape(self, shape: Shape) -> Shape:
    height, width = shape
    if not isinstance(self.size, int):
      return tuple(self.size)
    if height <= width:
      return (self.size, int(self.size * width / height))
    return (int(self.size * height / width), self.size)

  def sample(self, key: jax.Array, shape: Shape) -> Params:
    del key, shape
    return {}

  def stage(self, params: Params, shape: Shape) -> Stage:
    del params
    return _resized_box_stage(0, 0, *shape, self.output_shape(shape))


@transforms.register_device("center_crop")
@dataclasses.dataclass(frozen=True)
class CenterCrop:
  """transforms.center_crop: torchvision.transforms.CenterCrop."""
  size: int
  keys: tuple[str, ...] | None = None

  def output_shape(self, shape: Shape) -> Shape:
    if min(shape) < self.size:
      raise ValueError(f"center_crop({self.size}) of a {shape[0]}x{shape[1]} image")
    return (self.size, self.size)

  def sample(self, key: jax.Array, shape: Shape) -> Params:
    del key, shape
    return {}

  def stage(self, params: Params, shape: Shape) -> Stage:
    del params
    top, left = transforms.crop_box(*shape, self.size)
    return Stage(_scale_translate((1.0, 1.0), (top, left)), *_box(shape))


DeviceOp = RandomResizedCrop | FlipLR | Rotate | Resize | CenterCrop


def device_ops(spec: str) -> list[DeviceOp]:
  """The device ops of a `|`-separated spec; ValueError naming every op without one."""
  calls = transforms.parse_spec(spec)
  missing = [call.text for call in calls if transforms.OPS[call.name].device is None]
  if missing:
    on_device = sorted(name for name, op in transforms.OPS.items() if op.device)
    raise ValueError(f"{', '.join(map(repr, missing))} cannot run with "
                     f"input.augment_on_device=True; on-device ops: {on_device}")
  return [call.device() for call in calls]


class BatchAugment:
  """A training spec on the device: (global batch, step) -> augmented batch.

  Jittable; call it inside the train step on the sharded batch. `sample` and `warp`
  are its two halves for one example: random parameters, then the resampling.
  """

  def __init__(self, spec: str, seed: int):
    self.spec = spec
    self.ops = device_ops(spec)
    self.seed = seed

  def __call__(self, batch: dict[str, jax.Array], step: jax.Array | int
                ) -> dict[str, jax.Array]:
    spatial = {key: value for key, value in batch.items() if key in SPATIAL_KEYS}
    shapes = {key: value.shape[1:3] for key, value in spatial.items()}
    keys = self.example_keys(step, len(batch["image"]))
    params = jax.vmap(lambda key: self.sample(key, shapes))(keys)
    return {**batch, **jax.vmap(self.warp)(params, spatial)}

  def example_keys(self, step: jax.Array | int, batch_size: int) -> jax.Array:
    """The random key of each example of the global batch at `step`."""
    step_key = jax.random.fold_in(jax.random.key(self.seed), step)
    return jax.vmap(jax.random.fold_in, (None, 0))(
        step_key, jnp.arange(batch_size, dtype=jnp.uint32))

  def _applied(self) -> list[tuple[DeviceOp, Sequence[str]]]:
    return [(op, op.keys or SPATIAL_KEYS) for op in self.ops]

  def sample(self, key: jax.Array, shapes: dict[str, Shape]) -> list[Params]:
    """Each op's random parameters for one example whose arrays have `shapes` (H, W).

    An op draws once, from the shape of the first of its keys present (as the host
    ops do), and moves all of them alike.
    """
    shapes = {k: tuple(s[:2]) for k, s in shapes.items()}
    params = []
    for index, (op, keys) in enumerate(self._applied()):
      present = [k for k in keys if k in shapes]
      if not present:
        params.append({})
        continue
      if len({shapes[k] for k in present}) > 1:
        raise ValueError(f"{type(op).__name__} moves {present} alike, but their sizes "
                         f"differ: {[shapes[k] for k in present]}")
      params.append(op.sample(jax.random.fold_in(key, index), shapes[present[0]]))
      for k in present:
        shapes[k] = op.output_shape(shapes[k])
    return params

  def warp(self, params: list[Params], example: dict[str, jax.Array]
           ) -> dict[str, jax.Array]:
    """One example's arrays (H, W, C) resampled under the ops with `params`."""
    out = {}
    for name, array in example.items():
      shape = tuple(array.shape[:2])
      stages = []
      for (op, keys), op_params in zip(self._applied(), params):
        if name in keys:
          stages.append(op.stage(op_params, shape))
          shape = op.output_shape(shape)
      out[name] = _resample(array, stages, shape, mask=name in MASK_KEYS)
    return out


def _resample(array: jax.Array, stages: list[Stage], out_shape: Shape, mask: bool
              ) -> jax.Array:
  """`array` seen through `stages` (first op first) on an `out_shape` grid.

  Walks the output pixel coordinates back through the ops, last op first, then reads
  the stored array once. Masks are nearest-neighbour at every op that resamples.
  """
  rows, cols = jnp.meshgrid(jnp.arange(out_shape[0], dtype=jnp.float32),
                            jnp.arange(out_shape[1], dtype=jnp.float32), indexing="ij")
  coords = jnp.stack([rows, cols], axis=-1)
  weight = jnp.ones(out_shape, jnp.float32)
  for stage in reversed(stages):
    coords = coords @ stage.matrix[:, :2].T + stage.matrix[:, 2]
    nearest = stage.resample == "nearest" or (mask and stage.resample != "none")
    if nearest:
      # OpenCV's nearest neighbour rounds halves up.
      coords = jnp.floor(coords + 0.5)
    if stage.fill:
      if nearest:
        inside = jnp.all((coords >= stage.low) & (coords <= stage.high), axis=-1)
        weight = weight * inside
      else:
        # Bilinear reads with zero outside: the share of the footprint that is inside.
        share = jnp.minimum(coords - stage.low + 1, stage.high + 1 - coords)
        weight = weight * jnp.prod(jnp.clip(share, 0.0, 1.0), axis=-1)
    coords = jnp.clip(coords, stage.low, stage.high)
  if mask:
    index = jnp.floor(coords + 0.5).astype(jnp.int32)
    return array[index[..., 0], index[..., 1]] * weight.astype(array.dtype)[..., None]
  return _bilinear(array, coords) * weight[..., None]


def _bilinear(image: jax.Array, coords: jax.Array) -> jax.Array:
  """float32 `image` (H, W, C) at fractional (row, col) `coords` (..., 2), edges clamped."""
  limit = jnp.asarray(image.shape[:2], jnp.int32) - 1
  base = jnp.floor(coords)
  frac = coords - base
  low = jnp.clip(base.astype(jnp.int32), 0, limit)
  high = jnp.clip(low + 1, 0, limit)
  image = image.astype(jnp.float32)
  row_frac, col_frac = frac[..., :1], frac[..., 1:]
  top = (image[low[..., 0], low[..., 1]] * (1 - col_frac)
         + image[low[..., 0], high[..., 1]] * col_frac)
  bottom = (image[high[..., 0], low[..., 1]] * (1 - col_frac)
            + image[high[..., 0], high[..., 1]] * col_frac)
  return top * (1 - row_frac) + bottom * row_frac
