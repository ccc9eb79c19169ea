"""Swin Transformer v1 as timm 1.0 builds it (`timm/models/swin_transformer.py`).

Parameter paths mirror timm's keys (patch_embed/proj, layers_1/downsample/reduction,
layers_0/blocks_1/attn/relative_position_bias_table, ..., norm, head) so `convert_timm`
is the generic layout conversion plus timm's own key fixes. The relative position index
and the shifted-window attention mask are constants recomputed here with numpy at trace
time, never loaded. As in timm with strict_img_size, the input must be `img_size`: window
sizes (and so the bias-table shapes) are fixed per stage from that resolution. Loading a
checkpoint into another img_size or window_size resizes its bias tables as timm's
checkpoint filter does (`resize_relative_position_bias_table`), or, for SimMIM checkpoints,
as SimMIM's fine-tuning loader does (same offsets, cubic spline instead of linear).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from scipy import interpolate

from medbench_jax.models import common
from medbench_jax.models import registry

# timm: trunc_normal_(std=.02) on every Linear, zero bias; LayerNorm eps is PyTorch's 1e-5.
_dense_init = nn.initializers.truncated_normal(stddev=0.02)
_LN_EPS = 1e-5
# timm's fill value for attention between tokens from different regions of a shifted window.
_MASK_VALUE = -100.0

Pair = tuple[int, int]


def _pair(x: int | Sequence[int]) -> Pair:
  return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def _dense(features: int, dtype: Any, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, kernel_init=_dense_init, dtype=dtype,
                  param_dtype=jnp.float32, name=name)


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
  return common.layer_norm(_LN_EPS, dtype, name)


def window_and_shift(resolution: Pair, window: Pair, shift: Pair) -> tuple[Pair, Pair]:
  """timm's clamping: a stage no larger than the window is one unshifted window."""
  win = tuple(r if r <= w else w for r, w in zip(resolution, window))
  shift = tuple(0 if r <= w else s for r, w, s in zip(resolution, win, shift))
  return win, shift


def stage_windows(img_size: int | Sequence[int], patch_size: int,
                  window_size: int | Sequence[int], num_stages: int) -> list[Pair]:
  """The attention window of each stage's blocks for an `img_size` input (after clamping)."""
  resolution = tuple(s // patch_size for s in _pair(img_size))
  windows = []
  for i in range(num_stages):
    if i:  # PatchMerging pads odd sizes.
      resolution = tuple(-(-r // 2) for r in resolution)
    windows.append(window_and_shift(resolution, _pair(window_size), (0, 0))[0])
  return windows


def relative_position_index(window: Pair) -> np.ndarray:
  """(N, N) index into the (2Wh-1)(2Ww-1) bias table, N = Wh*Ww, computed as timm does."""
  wh, ww = window
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  rel[:, :, 0] += wh - 1
  rel[:, :, 1] += ww - 1
  rel[:, :, 0] *= 2 * ww - 1
  return rel.sum(-1)


def window_partition(x: jnp.ndarray, window: Pair) -> jnp.ndarray:
  """(B, H, W, C) -> (B * num_windows, Wh * Ww, C), windows in row-major order per image."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window[0], window[0], w // window[1], window[1], c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], c)


def window_reverse(windows: jnp.ndarray, window: Pair, h: int, w: int) -> jnp.ndarray:
  c = windows.shape[-1]
  x = windows.reshape(-1, h // window[0], w // window[1], window[0], window[1], c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_mask(padded: Pair, window: Pair, shift: Pair) -> np.ndarray:
  """(num_windows, N, N) additive mask keeping attention inside the regions that the cyclic
  shift brought together in one window (timm's `get_attn_mask`)."""
  img = np.zeros(padded, np.float32)
  regions = lambda w, s: ((0, -w), (-w, -s), (-s, None))
  for i, (h0, h1) in enumerate(regions(window[0], shift[0])):
    for j, (w0, w1) in enumerate(regions(window[1], shift[1])):
      img[h0:h1, w0:w1] = 3 * i + j
  windows = np.asarray(window_partition(img[None, :, :, None], window))[..., 0]
  diff = windows[:, None, :] - windows[:, :, None]
  return np.where(diff != 0, _MASK_VALUE, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows, with a learned relative position bias."""
  num_heads: int
  window: Pair
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: np.ndarray | None) -> jnp.ndarray:
    b, n, dim = x.shape
    head_dim = dim // self.num_heads
    table = self.param("relative_position_bias_table", _dense_init,
                       ((2 * self.window[0] - 1) * (2 * self.window[1] - 1), self.num_heads),
                       jnp.float32)
    index = relative_position_index(self.window).reshape(-1)
    bias = table[index].reshape(n, n, self.num_heads).transpose(2, 0, 1)

    qkv = _dense(3 * dim, self.dtype, "qkv")(x)
    q, k, v = qkv.reshape(b, n, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    attn = (q * head_dim**-0.5) @ k.swapaxes(-2, -1) + bias.astype(self.dtype)
    if mask is not None:
      num_windows = mask.shape[0]
      attn = attn.reshape(-1, num_windows, self.num_heads, n, n) + mask[None, :, None]
      attn = attn.reshape(-1, self.num_heads, n, n)
    # Softmax in float32: bf16 exponentials of logits near -100 lose the whole row otherwise.
    attn = nn.softmax(attn.astype(jnp.float32), axis=-1).astype(self.dtype)
    x = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, dim)
    return _dense(dim, self.dtype, "proj")(x)


class SwinBlock(nn.Module):
  """(Shifted-)window attention and MLP, each pre-norm with a stochastic-depth residual."""
  num_heads: int
  window: Pair
  shift: Pair
  mlp_ratio: float
  drop_path: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    _, h, w, c = x.shape
    y = _layer_norm(self.dtype, "norm1")(x)
    shifted = any(self.shift)
    if shifted:
      y = jnp.roll(y, (-self.shift[0], -self.shift[1]), axis=(1, 2))
    # Pad to whole windows after the shift, as timm does; the mask covers the padded grid.
    ph, pw = (-h) % self.window[0], (-w) % self.window[1]
    y = jnp.pad(y, ((0, 0), (0, ph), (0, pw), (0, 0)))
    mask = shifted_window_mask((h + ph, w + pw), self.window, self.shift) if shifted else None
    y = WindowAttention(self.num_heads, self.window, self.dtype, name="attn")(
        window_partition(y, self.window), mask)
    y = window_reverse(y, self.window, h + ph, w + pw)[:, :h, :w]
    if shifted:
      y = jnp.roll(y, self.shift, axis=(1, 2))
    x = x + common.DropPath(self.drop_path)(y, deterministic=not train)
    y = common.Mlp(int(c * self.mlp_ratio), self.dtype, name="mlp")(
        _layer_norm(self.dtype, "norm2")(x))
    return x + common.DropPath(self.drop_path)(y, deterministic=not train)


class PatchMerging(nn.Module):
  """2x2 neighbourhood -> channels (timm's concat order), LayerNorm, linear 4C -> 2C."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    h, w = x.shape[1:3]
    # Channel blocks ordered (row 0, col 0), (1, 0), (0, 1), (1, 1): column-major in the 2x2.
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(
        b, h // 2, w // 2, 4 * c)
    x = _layer_norm(self.dtype, "norm")(x)
    return _dense(2 * c, self.dtype, "reduction", use_bias=False)(x)


class SwinStage(nn.Module):
  """Optional PatchMerging, then blocks alternating regular and shifted windows."""
  depth: int
  num_heads: int
  downsample: bool
  window: Pair
  mlp_ratio: float
  drop_path: Sequence[float]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    if self.downsample:
      x = PatchMerging(self.dtype, name="downsample")(x)
    half = (self.window[0] // 2, self.window[1] // 2)
    for j in range(self.depth):
      window, shift = window_and_shift(x.shape[1:3], self.window, half if j % 2 else (0, 0))
      x = SwinBlock(self.num_heads, window, shift, self.mlp_ratio, self.drop_path[j],
                    self.dtype, name=f"blocks_{j}")(x, train)
    return x


class SwinTransformer(nn.Module):
  """Swin v1. Stage i > 0 starts with PatchMerging (timm >= 0.9 layout).

  `apply(..., feature_maps=True)` returns the output of each stage instead of logits:
  NHWC maps at strides 4, 8, 16, 32 with 1, 2, 4, 8 x embed_dim channels, before the final
  norm (timm's `features_only=True`), in the compute dtype.
  """
  num_classes: int = 1000
  img_size: int | Sequence[int] = 224
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int | Sequence[int] = 7
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.1
  head_init: common.HeadInit = common.TRUNC_NORMAL_HEAD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False,
               feature_maps: bool = False) -> jnp.ndarray | list[jnp.ndarray]:
    img_size = _pair(self.img_size)
    if tuple(x.shape[1:3]) != img_size:
      raise ValueError(f"Swin built for img_size={img_size} got images of {x.shape[1:3]}; "
                       "window sizes depend on it, create the model with the matching img_size.")
    x = common.PatchEmbed(self.patch_size, self.embed_dim, _LN_EPS, self.dtype,
                          name="patch_embed")(x.astype(self.dtype))
    target_window = _pair(self.window_size)
    # Stochastic depth grows linearly over all blocks (timm's calculate_drop_path_rates).
    rates = iter(np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist())
    stages = []
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      x = SwinStage(depth, heads, downsample=i > 0, window=target_window,
                    mlp_ratio=self.mlp_ratio, drop_path=tuple(next(rates) for _ in range(depth)),
                    dtype=self.dtype, name=f"layers_{i}")(x, train)
      stages.append(x)
    if feature_maps:
      return stages
    x = _layer_norm(self.dtype, "norm")(x)
    return common.pool_and_classify(x, self.num_classes, self.dtype, "head", self.head_init)


def _stretched_offsets(src: int, dst: int) -> np.ndarray:
  """Source offsets of a `src`-wide relative-position axis placed on a `dst`-wide one (BEiT's
  scheme, timm's `_calc`): steps grow geometrically from 1 by the ratio q, found by bisection,
  that makes the outermost offset land at about dst // 2."""
  n = src // 2
  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    if (1.0 - q**n) / (1.0 - q) > dst // 2:
      right = q
    else:
      left = q
  positive = np.cumsum(q ** np.arange(n))
  return np.concatenate([-positive[::-1], [0.0], positive])


TABLE_INTERPOLATIONS = ("linear", "cubic")


def _interpolation_matrix(src: int, dst: int, interpolation: str) -> np.ndarray:
  """(dst, src) weights of interpolation from the stretched source offsets to the integer
  target offsets, holding the end values beyond the ends (as timm's interpolator and
  FITPACK's evaluation, which clamps to the knot range, do). "linear" is timm's default;
  "cubic" the interpolating cubic spline (not-a-knot) that scipy's interp2d fitted for
  SimMIM/BEiT, one axis at a time as that tensor-product spline allows."""
  offsets = _stretched_offsets(src, dst)
  targets = np.arange(-(dst // 2), dst // 2 + 1, dtype=np.float64)
  if interpolation == "linear":
    return np.stack([np.interp(targets, offsets, basis) for basis in np.eye(src)], axis=1)
  if src < 4:
    raise ValueError(f"A cubic spline needs 4 or more offsets; a relative position table of "
                     f"{src} per axis (window {(src + 1) // 2}) has fewer.")
  spline = interpolate.make_interp_spline(offsets, np.eye(src), k=3)
  return spline(np.clip(targets, offsets[0], offsets[-1]))


def resize_relative_position_bias_table(table: np.ndarray, window: Pair,
                                        interpolation: str = "linear") -> np.ndarray:
  """((2S-1)^2, heads) bias table of a square window -> ((2Wh-1)(2Ww-1), heads) for `window`.

  Not a plain bicubic resize: per head, the source offsets are stretched geometrically over
  the target range and sampled there, "linear"ly as timm's `resize_rel_pos_bias_table` (its
  Swin checkpoint filter) does, or with a "cubic" spline as SimMIM's fine-tuning loader
  (`remap_pretrained_keys_swin`, scipy's interp2d) does. Tables that are not square, or
  already fit, are returned as is.
  """
  if interpolation not in TABLE_INTERPOLATIONS:
    raise ValueError(f"interpolation={interpolation!r}; expected one of {TABLE_INTERPOLATIONS}.")
  rows, heads = table.shape
  side = math.isqrt(rows)
  dst = (2 * window[0] - 1, 2 * window[1] - 1)
  if side * side != rows or rows == dst[0] * dst[1]:
    return table
  grid = np.asarray(table, np.float64).T.reshape(heads, side, side)
  resized = np.einsum("ys,hst,xt->yxh", _interpolation_matrix(side, dst[0], interpolation),
                      grid, _interpolation_matrix(side, dst[1], interpolation))
  return resized.reshape(-1, heads).astype(table.dtype)


def convert_timm(state_dict: Mapping[str, np.ndarray], model_kw: Mapping[str, Any] | None = None,
                 *, arch: Mapping[str, Any] | None = None,
                 table_interpolation: str = "linear") -> dict[str, dict]:
  """timm or original Microsoft Swin state dict -> {'params'} of
  `SwinTransformer(**arch, **model_kw)`.

  Microsoft's checkpoints (and the reference study's, which use Microsoft's model) downsample
  at the end of each stage (layers.i.downsample -> layers.{i+1}.downsample) and name the head
  `head` rather than timm's `head.fc`; their relative_position_index and attn_mask buffers
  are dropped. Bias tables made for other windows are resized to the model's with
  `table_interpolation` (`resize_relative_position_bias_table`; the checkpoint's format
  chooses it: "cubic" for SimMIM's).
  """
  model = SwinTransformer(**{**(arch or {}), **(model_kw or {})})
  windows = stage_windows(model.img_size, model.patch_size, model.window_size, len(model.depths))
  old_layout = "layers.0.downsample.reduction.weight" in state_dict

  def rename(key: str) -> str:
    if old_layout:
      key = re.sub(r"^layers\.(\d+)\.downsample",
                   lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
    return re.sub(r"^head\.fc\.", "head.", key)

  def resize(key: str, value: np.ndarray) -> np.ndarray:
    stage = re.match(r"layers\.(\d+)\.blocks\.\d+\.attn\.relative_position_bias_table$", key)
    if stage is None or int(stage.group(1)) >= len(windows):
      return value
    return resize_relative_position_bias_table(np.asarray(value), windows[int(stage.group(1))],
                                               table_interpolation)

  renamed = {rename(k): v for k, v in state_dict.items()}
  return common.convert_torch_state_dict(
      {k: resize(k, v) for k, v in renamed.items()},
      drop=("relative_position_index", "attn_mask"))


def _register(name: str, crop_pct: float = 0.9, **arch: Any) -> None:
  size = _pair(arch.get("img_size", 224))

  @registry.register(name, converter=functools.partial(convert_timm, arch=arch),
                   first_conv="patch_embed/proj", classifier="head",
                   head_init=common.TRUNC_NORMAL_HEAD, input_size=(*size, 3),
                   crop_pct=crop_pct, interpolation="bicubic")
  def factory(num_classes: int, **kw: Any) -> SwinTransformer:
    return SwinTransformer(num_classes=num_classes, **{**arch, **kw})
  factory.__name__ = factory.__qualname__ = name


_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_LARGE = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_register("swin_tiny_patch4_window7_224", embed_dim=96, depths=(2, 2, 6, 2),
          num_heads=(3, 6, 12, 24))
_register("swin_small_patch4_window7_224", embed_dim=96, depths=(2, 2, 18, 2),
          num_heads=(3, 6, 12, 24))
_register("swin_base_patch4_window7_224", **_BASE)
# timm evaluates the 384 px models on uncropped images.
_register("swin_base_patch4_window12_384", crop_pct=1.0, img_size=384, window_size=12, **_BASE)
_register("swin_large_patch4_window7_224", **_LARGE)
_register("swin_large_patch4_window12_384", crop_pct=1.0, img_size=384, window_size=12,
          **_LARGE)
# CPU-sized variant for tests and demos: no published weights exist, random init only.
_register("swin_demo_patch4_window4_128", img_size=128, window_size=4,
          embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
# The same at 96 px without stochastic depth.
_register("swin_demo_patch4_window4_96", img_size=96, window_size=4, drop_path_rate=0.0,
          embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
# And at 64 px: the default CPU demo (configs/swin.py).
_register("swin_demo_patch4_window4_64", img_size=64, window_size=4, drop_path_rate=0.0,
          embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
