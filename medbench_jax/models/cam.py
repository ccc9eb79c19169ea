"""Class activation maps of the classification families: Grad-CAM, Grad-CAM++ and occlusion.

    cam_fn = cam.make_cam_fn(model, normalize, method="gradcam")   # jitted
    maps = cam_fn(variables, images_uint8, classes)                # (N, H, W) in [0, 1]

Grad-CAM and Grad-CAM++ follow pytorch-grad-cam (the `grad-cam` package, which the tests
compare against): the target is the class's logit, the channel weights come from its
gradient at one target layer, the map is ReLU(sum of weighted activations), scaled to
[0, 1] per image, resized bilinearly to the input and scaled to [0, 1] again.

Target layers, one per family (TARGETS), each with the pytorch-grad-cam layer it matches:

  * ResNet: the last block of the last stage, `layer4_{n-1}` (timm's `model.layer4[-1]`).
  * DenseNet: the output of `features`, relu(norm5): the map the head pools, timm's
    `model.features` (whose last layer, norm5, is a BatchNorm with its ReLU). torchvision's
    `model.features[-1]` is norm5 without the ReLU, but its forward's in-place ReLU
    rewrites that output, so pytorch-grad-cam captures it after the ReLU on a CPU.
  * ConvNeXt: the last stage, `stages_3` (`model.stages[-1]`).
  * Swin: the last stage, `layers_3`, whose tokens are already on their (h, w) grid
    (`model.layers[-1]`, NHWC in timm >= 0.9, permuted to NCHW for pytorch-grad-cam).
  * ViT: `blocks_{depth-1}/norm1`, the patch tokens without the class token reshaped to the
    patch grid (`model.blocks[-1].norm1` with the ViT tutorial's reshape_transform).

ViT's target is the last block's first norm, as pytorch-grad-cam's ViT tutorial has it: the
head reads only the class token after the last block, so the patch tokens' outputs of that
block get no gradient; inside it, attention still mixes them into the class token.

The activations and their gradients are captured with `nn.intercept_methods`: the target
module's output gets a zero added (the "delta"), whose gradient is the output's gradient.
The models, their outputs and parameters are untouched.

Occlusion needs no gradients: windows of the (normalized) input are set to `baseline`
(0: the normalization's mean pixel), and each pixel's score is the mean drop of the class
logit over the windows that cover it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medbench_jax.models import convnext
from medbench_jax.models import densenet
from medbench_jax.models import resnet
from medbench_jax.models import swin
from medbench_jax.models import vit

METHODS = ("gradcam", "gradcam++", "occlusion")
# pytorch-grad-cam's constants: the max-scaling guard and Grad-CAM++'s denominator guard.
_SCALE_EPS = 1e-7
_PLUSPLUS_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Target:
  """A family's target layer: the module path, which of its outputs (`index`, where the
  module returns a list), and that output -> (B, h, w, C) grid."""
  path: Callable[[nn.Module], tuple[str, ...]]
  index: int | None = None
  to_grid: Callable[[jnp.ndarray, nn.Module, tuple[int, int]], jnp.ndarray] = (
      lambda x, model, size: x)


def _vit_patches(x: jnp.ndarray, model: vit.VisionTransformer, size: tuple[int, int]
                 ) -> jnp.ndarray:
  """(B, 1 + h*w, C) tokens -> (B, h, w, C) without the class token."""
  grid = (size[0] // model.patch_size, size[1] // model.patch_size)
  return x[:, 1:].reshape(x.shape[0], *grid, x.shape[-1])


TARGETS: dict[type, Target] = {
    resnet.ResNet: Target(lambda m: (f"layer{len(m.stage_sizes)}_{m.stage_sizes[-1] - 1}",)),
    densenet.DenseNet: Target(lambda m: ("features",), index=-1),
    convnext.ConvNeXt: Target(lambda m: (f"stages_{len(m.depths) - 1}",)),
    swin.SwinTransformer: Target(lambda m: (f"layers_{len(m.depths) - 1}",)),
    vit.VisionTransformer: Target(lambda m: (f"blocks_{m.depth - 1}", "norm1"),
                                  to_grid=_vit_patches),
}


def target_of(model: nn.Module) -> Target:
  """The model's family's target layer; a ValueError for models without one."""
  for family, target in TARGETS.items():
    if isinstance(model, family):
      return target
  raise ValueError(f"No class activation map target for {type(model).__name__}; the "
                   f"classification families are {[f.__name__ for f in TARGETS]}.")


def activations_and_gradients(model: nn.Module, variables: dict, x: jnp.ndarray,
                              classes: jnp.ndarray | None = None
                              ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(activations, gradients, logits) at the family's target layer, both (B, h, w, C).

  `x`: the model's input (normalized NHWC). The gradients are those of the sum over the
  batch of each example's logit of `classes[i]` (the top class where None), eval mode.
  """
  target = target_of(model)
  path = target.path(model)

  def forward(delta):
    captured = []

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name != "__call__" or context.module.path != path:
        return out
      value = out if target.index is None else out[target.index]
      captured.append(value)
      if delta is not None:
        value = value + delta.astype(value.dtype)
      if target.index is None:
        return value
      out = list(out)
      out[target.index] = value
      return out

    with nn.intercept_methods(interceptor):
      logits = model.apply(variables, x, train=False)
    if len(captured) != 1:
      raise ValueError(f"{type(model).__name__}: target {'/'.join(path)} ran "
                       f"{len(captured)} times; expected once.")
    return logits.astype(jnp.float32), captured[0]

  shape = jax.eval_shape(lambda: forward(None)[1])

  def score(delta):
    logits, act = forward(delta)
    chosen = jnp.argmax(logits, -1) if classes is None else classes
    picked = jnp.take_along_axis(logits, jnp.asarray(chosen)[:, None], axis=1)
    return picked.sum(), (act, logits)

  grads, (acts, logits) = jax.grad(score, has_aux=True)(jnp.zeros(shape.shape, jnp.float32))
  size = tuple(x.shape[1:3])
  grid = lambda a: target.to_grid(a.astype(jnp.float32), model, size)
  return grid(acts), grid(grads), logits


def gradcam_weights(acts: jnp.ndarray, grads: jnp.ndarray) -> jnp.ndarray:
  """Grad-CAM: each channel's mean gradient, (B, C)."""
  del acts
  return grads.mean(axis=(1, 2))


def gradcam_plusplus_weights(acts: jnp.ndarray, grads: jnp.ndarray) -> jnp.ndarray:
  """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with exponential scores, as
  pytorch-grad-cam computes it), (B, C)."""
  g2 = grads**2
  alpha = g2 / (2 * g2 + acts.sum(axis=(1, 2), keepdims=True) * g2 * grads + _PLUSPLUS_EPS)
  alpha = jnp.where(grads != 0, alpha, 0.0)
  return (jnp.maximum(grads, 0.0) * alpha).sum(axis=(1, 2))


_WEIGHTS = {"gradcam": gradcam_weights, "gradcam++": gradcam_plusplus_weights}


def scale(maps: jnp.ndarray) -> jnp.ndarray:
  """Per map: minus its minimum, over its maximum (pytorch-grad-cam's scale_cam_image)."""
  maps = maps - maps.min(axis=(1, 2), keepdims=True)
  return maps / (_SCALE_EPS + maps.max(axis=(1, 2), keepdims=True))


def resize_maps(maps: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
  """(B, h, w) -> (B, *size), bilinear with half-pixel centres (OpenCV's INTER_LINEAR when
  enlarging)."""
  return jax.image.resize(maps, (maps.shape[0], *size), "linear", antialias=False)


def gradient_cam(model: nn.Module, variables: dict, x: jnp.ndarray,
                 classes: jnp.ndarray | None = None, method: str = "gradcam") -> jnp.ndarray:
  """Grad-CAM or Grad-CAM++ maps (B, H, W) in [0, 1] at the input's size."""
  acts, grads, _ = activations_and_gradients(model, variables, x, classes)
  weights = _WEIGHTS[method](acts, grads)
  maps = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", acts, weights))
  return scale(resize_maps(scale(maps), x.shape[1:3]))


def occlusion_windows(size: Sequence[int], patch: int, stride: int) -> np.ndarray:
  """bool (windows, H, W): every patch x patch window at `stride` steps, the last row and
  column of windows moved in so that they end at the image's edge."""
  def starts(n):
    last = max(n - patch, 0)
    return sorted(set(range(0, last + 1, stride)) | {last})
  windows = []
  for top in starts(size[0]):
    for left in starts(size[1]):
      window = np.zeros(size, bool)
      window[top:top + patch, left:left + patch] = True
      windows.append(window)
  return np.stack(windows)


def occlusion(apply_fn: Callable[[jnp.ndarray], jnp.ndarray], x: jnp.ndarray,
              classes: jnp.ndarray | None = None, *, patch: int | None = None,
              stride: int | None = None, baseline: float = 0.0, chunk: int = 8
              ) -> jnp.ndarray:
  """Occlusion sensitivity (B, H, W): per pixel, the mean drop of the class logit when a
  window covering it is set to `baseline`; positive where hiding the pixel lowers the score.

  apply_fn: normalized images -> logits. patch defaults to 1/8 of the shorter side, stride to
  half the patch; `chunk` windows are evaluated per forward pass (of chunk * B images).
  """
  b, h, w = x.shape[:3]
  patch = patch or max(1, min(h, w) // 8)
  stride = stride or max(1, patch // 2)
  windows = occlusion_windows((h, w), patch, stride)
  logits = apply_fn(x).astype(jnp.float32)
  chosen = jnp.argmax(logits, -1) if classes is None else jnp.asarray(classes)
  pick = lambda out: jnp.take_along_axis(out, chosen[:, None], axis=1)[:, 0]
  clean = pick(logits)
  pad = -len(windows) % chunk
  masks = jnp.asarray(np.concatenate([windows, np.zeros((pad, h, w), bool)]))

  def drops(mask_chunk):  # (chunk, H, W) -> (chunk, B)
    hidden = jnp.where(mask_chunk[:, None, :, :, None], baseline, x[None])
    out = apply_fn(hidden.reshape(-1, *x.shape[1:])).astype(jnp.float32)
    return clean[None] - jax.vmap(pick)(out.reshape(len(mask_chunk), b, -1))

  per_window = jax.lax.map(drops, masks.reshape(-1, chunk, h, w)).reshape(-1, b)
  masks = masks.astype(jnp.float32)
  covered = jnp.einsum("nb,nhw->bhw", per_window, masks)
  return covered / jnp.maximum(masks.sum(0), 1.0)[None]


def occlusion_map(model: nn.Module, variables: dict, x: jnp.ndarray,
                  classes: jnp.ndarray | None = None, **kw: Any) -> jnp.ndarray:
  """Occlusion maps (B, H, W) in [0, 1]: the positive drops, over their maximum."""
  apply_fn = lambda images: model.apply(variables, images, train=False)
  sensitivity = jax.nn.relu(occlusion(apply_fn, x, classes, **kw))
  return sensitivity / (_SCALE_EPS + sensitivity.max(axis=(1, 2), keepdims=True))


def make_cam_fn(model: nn.Module, normalize: Callable[[jnp.ndarray], jnp.ndarray],
                method: str = "gradcam", **occlusion_kw: Any
                ) -> Callable[..., jnp.ndarray]:
  """A jitted `(variables, images, classes=None) -> maps`: uint8 (N, H, W, C) images as the
  data pipeline gives them, `normalize`d as the trainer does (trainer.state.normalizer);
  maps (N, H, W) float32 in [0, 1]; classes (N,) int, or None for each image's top class."""
  if method not in METHODS:
    raise ValueError(f"method={method!r}; expected one of {METHODS}.")
  target_of(model)  # fails early for a model without a target layer

  def cam_fn(variables, images, classes=None):
    x = normalize(images)
    if method == "occlusion":
      return occlusion_map(model, variables, x, classes, **occlusion_kw)
    return gradient_cam(model, variables, x, classes, method)

  return jax.jit(cam_fn)


def _jet(values: np.ndarray) -> np.ndarray:
  """[0, 1] -> RGB in [0, 1] on the jet colour map (blue low, red high)."""
  channel = lambda centre: np.clip(1.5 - np.abs(4.0 * values - centre), 0.0, 1.0)
  return np.stack([channel(3.0), channel(2.0), channel(1.0)], axis=-1)


def overlay(images: np.ndarray, maps: np.ndarray, alpha: float = 0.4) -> np.ndarray:
  """uint8 (..., H, W, 1 or 3) images and (..., H, W) maps in [0, 1] -> uint8 RGB overlays:
  the map in the jet colour map blended over the image with weight `alpha`."""
  images = np.asarray(images, np.float32) / 255.0
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  heat = _jet(np.clip(np.asarray(maps, np.float32), 0.0, 1.0))
  return np.rint(255.0 * ((1.0 - alpha) * images + alpha * heat)).astype(np.uint8)

