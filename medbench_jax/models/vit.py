"""Vision Transformer (ViT) as timm 1.0 builds it (`timm/models/vision_transformer.py`).

Parameter paths mirror timm's keys (cls_token, pos_embed, patch_embed/proj,
blocks_3/attn/qkv, blocks_3/mlp/fc1, norm, fc_norm, head), so `convert_timm` is the generic
layout conversion plus a resize of the position table when the checkpoint was trained at
another resolution. Pre-norm blocks, qkv bias, LayerNorm eps 1e-6, a class token whose
position embedding is part of pos_embed.

Two heads, as timm's `global_pool`:
  * "token" (default, every timm tag of these six architectures, DINO, MoCo v3, and MAE's
    pretrained encoders as timm loads them, `*.mae`): final `norm`, then the class token.
  * "avg": the mean of the patch tokens (class token excluded), then `fc_norm` (no final
    `norm`): MAE's fine-tuning recipe and `timm.create_model(name, global_pool="avg")`. No
    timm tag of these architectures defaults to it; its checkpoints carry fc_norm.* instead
    of norm.*.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medbench_jax.models import common
from medbench_jax.models import registry

# timm: trunc_normal_(std=.02) on Linear layers and pos_embed, normal_(std=1e-6) on cls_token.
_dense_init = nn.initializers.truncated_normal(stddev=0.02)
_LN_EPS = 1e-6
# The number of blocks whose outputs `feature_maps=True` returns, evenly spaced over depth.
_NUM_FEATURE_MAPS = 4
GLOBAL_POOLS = ("token", "avg")

Pair = tuple[int, int]


def _pair(x: int | Sequence[int]) -> Pair:
  return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
  return common.layer_norm(_LN_EPS, dtype, name)


def feature_block_indices(depth: int) -> list[int]:
  """0-based indices of the blocks `feature_maps=True` returns: 2, 5, 8, 11 of 12."""
  return [depth * (i + 1) // _NUM_FEATURE_MAPS - 1 for i in range(_NUM_FEATURE_MAPS)]


class Attention(nn.Module):
  """Multi-head self-attention over all tokens, one fused qkv projection (with bias)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, n, dim = x.shape
    head_dim = dim // self.num_heads
    dense = lambda features, name: nn.Dense(features, kernel_init=_dense_init, dtype=self.dtype,
                                            param_dtype=jnp.float32, name=name)
    q, k, v = dense(3 * dim, "qkv")(x).reshape(b, n, 3, self.num_heads, head_dim).transpose(
        2, 0, 3, 1, 4)
    attn = (q * head_dim**-0.5) @ k.swapaxes(-2, -1)
    # Softmax in float32 so bf16 compute does not flatten the attention distribution.
    attn = nn.softmax(attn.astype(jnp.float32), axis=-1).astype(self.dtype)
    x = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, dim)
    return dense(dim, "proj")(x)


class Block(nn.Module):
  """Pre-norm attention and MLP, each with a stochastic-depth residual."""
  num_heads: int
  mlp_ratio: float
  drop_path: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    y = Attention(self.num_heads, self.dtype, name="attn")(_layer_norm(self.dtype, "norm1")(x))
    x = x + common.DropPath(self.drop_path)(y, deterministic=not train)
    y = common.Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name="mlp")(
        _layer_norm(self.dtype, "norm2")(x))
    return x + common.DropPath(self.drop_path)(y, deterministic=not train)


class VisionTransformer(nn.Module):
  """ViT with a class token. The input must be `img_size`: the position table has one entry
  per patch of that grid (load a checkpoint of another resolution with `img_size` set and
  the converter resizes the table).

  `apply(..., feature_maps=True)` returns the outputs of 4 evenly spaced blocks (3, 6, 9, 12
  of 12, 1-based; `feature_block_indices`), without the final norm and the class token, as
  timm's `forward_intermediates(x, indices=[2, 5, 8, 11])` (an int `indices` there means the
  last n blocks), each NHWC at stride `patch_size` (16 or 32): all four share one
  resolution, as ViTDet/UNETR-style decoders expect.
  """
  num_classes: int = 1000
  img_size: int | Sequence[int] = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  global_pool: str = "token"
  drop_path_rate: float = 0.0
  head_init: common.HeadInit = common.TRUNC_NORMAL_HEAD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False,
               feature_maps: bool = False) -> jnp.ndarray | list[jnp.ndarray]:
    if self.global_pool not in GLOBAL_POOLS:
      raise ValueError(f"global_pool={self.global_pool!r}; expected one of {GLOBAL_POOLS}.")
    img_size = _pair(self.img_size)
    if tuple(x.shape[1:3]) != img_size:
      raise ValueError(f"ViT built for img_size={img_size} got images of {x.shape[1:3]}; the "
                       "position table depends on it, create the model with the matching "
                       "img_size (weights.load resizes a checkpoint's table to it).")
    x = common.PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype,
                          name="patch_embed")(x.astype(self.dtype))
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, self.embed_dim)
    cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.embed_dim),
                           jnp.float32)
    pos_embed = self.param("pos_embed", _dense_init, (1, gh * gw + 1, self.embed_dim),
                           jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, self.embed_dim)),
                         x], axis=1)
    x = x + pos_embed.astype(self.dtype)

    # Stochastic depth grows linearly over the blocks (timm's calculate_drop_path_rates).
    rates = np.linspace(0.0, self.drop_path_rate, self.depth).tolist()
    take = feature_block_indices(self.depth)
    maps = []
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, rates[i], self.dtype, name=f"blocks_{i}")(x, train)
      if feature_maps and i in take:
        maps.append(x[:, 1:].reshape(b, gh, gw, self.embed_dim).astype(jnp.float32))
    if feature_maps:
      return maps

    if self.global_pool == "avg":
      x = _layer_norm(self.dtype, "fc_norm")(x[:, 1:].mean(axis=1))
    else:
      x = _layer_norm(self.dtype, "norm")(x)[:, 0]
    if self.num_classes:
      x = common.classifier(self.num_classes, self.dtype, "head", self.head_init)(x)
    return x.astype(jnp.float32)


def resample_pos_embed(pos_embed: np.ndarray, grid: Pair) -> np.ndarray:
  """(1, 1 + h*w, D) table of a square h x w patch grid -> (1, 1 + grid[0]*grid[1], D).

  The class-token entry is kept; the grid part is resized bicubically with antialiasing, as
  timm's `resample_abs_pos_embed` defaults to and timm's ViT checkpoint filter uses when
  loading pretrained weights at another size (torch's antialiased bicubic is PIL's kernel,
  a=-0.5, which jax.image's cubic resize is for up- and downsampling alike). Note that the
  MAE and DINO repositories' own resizing calls torch without antialiasing (a=-0.75), which
  differs slightly; this follows timm.
  """
  n, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
  side = int(round(n**0.5))
  if side * side != n:
    raise ValueError(f"pos_embed has {n} patch entries (+1 class token), not a square grid.")
  if (side, side) == tuple(grid):
    return pos_embed
  patches = pos_embed[0, 1:].reshape(side, side, dim).astype(np.float32)
  resized = jax.image.resize(patches, (*grid, dim), method="cubic", antialias=True)
  resized = np.asarray(resized).reshape(1, -1, dim).astype(pos_embed.dtype)
  return np.concatenate([pos_embed[:, :1], resized], axis=1)


def convert_timm(state_dict: Mapping[str, np.ndarray],
                 model_kw: Mapping[str, Any] | None = None, *,
                 default_img_size: int = 224) -> dict[str, dict]:
  """timm ViT state dict -> {'params'} for the model built with `model_kw`.

  Depends on model_kw in one way: when the model's patch grid (`img_size`, default
  `default_img_size`, over the checkpoint's patch size) differs from the checkpoint's,
  pos_embed is resized to it (`resample_pos_embed`). `global_pool` changes nothing here:
  a "token" checkpoint has norm.*, an "avg" one fc_norm.*, and loading one into the other
  head is reported as missing/unexpected keys by weights.load, never guessed (MAE
  pretraining checkpoints aside, which go into an "avg" model as MAE's fine-tuning takes
  them: fc_norm fresh, norm unused; weights.formats). Keys of self-supervised releases
  beyond timm's (MAE's decoder_*/mask_token, MoCo v3/DINO prefixes, SimMIM's q/v biases)
  are not handled here but by weights.formats; DINO's backbone keys are timm's.
  """
  model_kw = model_kw or {}
  state_dict = dict(state_dict)
  if "pos_embed" in state_dict and "patch_embed.proj.weight" in state_dict:
    patch = state_dict["patch_embed.proj.weight"].shape[-2:]
    img_size = _pair(model_kw.get("img_size", default_img_size))
    grid = (img_size[0] // patch[0], img_size[1] // patch[1])
    state_dict["pos_embed"] = resample_pos_embed(np.asarray(state_dict["pos_embed"]), grid)
  return common.convert_torch_state_dict(state_dict)


# timm's default tags of these names (augreg / orig in21k, Google's JAX training) normalize
# with mean = std = 0.5; DINO, MAE and MoCo v3 weights use ImageNet's mean/std instead.
_CFG = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9, interpolation="bicubic",
            head_init=common.TRUNC_NORMAL_HEAD)


def _register(name: str, **arch: Any) -> None:
  size = _pair(arch.get("img_size", 224))
  converter = functools.partial(convert_timm, default_img_size=arch.get("img_size", 224))

  @registry.register(name, converter=converter, first_conv="patch_embed/proj",
                   classifier="head", input_size=(*size, 3), **_CFG)
  def factory(num_classes: int, **kw: Any) -> VisionTransformer:
    return VisionTransformer(num_classes=num_classes, **{**arch, **kw})
  factory.__name__ = factory.__qualname__ = name


_SIZES = {"small": dict(embed_dim=384, depth=12, num_heads=6),
          "base": dict(embed_dim=768, depth=12, num_heads=12),
          "large": dict(embed_dim=1024, depth=24, num_heads=16)}
for _size, _arch in _SIZES.items():
  for _patch in (16, 32):
    _register(f"vit_{_size}_patch{_patch}_224", patch_size=_patch, **_arch)
