"""ViT: forward parity with timm through .pth and .safetensors (class-token and average-pool
heads, pooled features), feature maps against timm's forward_intermediates, position-table
resizing against timm's resample_abs_pos_embed and checkpoint filter, train-mode SGD steps."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn
import torch

from medbench_jax import models
from medbench_jax import weights
from medbench_jax.models import vit
from tests import parity

K = 5
SMALL, BASE, LARGE = "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"
SMALL32 = "vit_small_patch32_224"


def _reference(name: str, img_size, **kw) -> torch.nn.Module:
  """Random-init timm ViT in eval mode with weights redrawn at unit scale.

  timm's own init (std 0.02 everywhere) leaves every residual branch near zero, so a swapped
  q/k/v or head split would barely move the logits; these weights make each block count.
  """
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False, num_classes=K, img_size=img_size, **kw)
  with torch.no_grad():
    for key, p in model.named_parameters():
      module, leaf = key.rsplit(".", 1) if "." in key else ("", key)
      if module.endswith("norm1") or module.endswith("norm2") or module.endswith("norm"):
        p.uniform_(0.5, 1.5) if leaf == "weight" else p.normal_(0, 0.1)
      elif p.ndim == 1:
        p.normal_(0, 0.1)
      elif key in ("cls_token", "pos_embed"):
        p.normal_(0, 0.5)
      else:
        p.normal_(0, p[0].numel()**-0.5)
  return model.eval()


def _nhwc(x: torch.Tensor) -> jnp.ndarray:
  return parity.to_nhwc(x)


PARITY = [
    (SMALL, 64, "token"),
    (SMALL, 64, "avg"),
    (BASE, 64, "token"),
    (SMALL32, 64, "token"),
    ("vit_base_patch32_224", 64, "token"),
    pytest.param(LARGE, 64, "token", marks=pytest.mark.slow),
    pytest.param("vit_large_patch32_224", 64, "token", marks=pytest.mark.slow),
    pytest.param(BASE, 224, "token", marks=pytest.mark.slow),
    pytest.param(BASE, 224, "avg", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,size,pool", PARITY)
def test_forward_parity_with_timm(tmp_path, name, size, pool):
  """Logits through both file formats, then pooled pre-logits features (num_classes=0)."""
  reference = _reference(name, size, global_pool=pool)
  x = torch.randn(2, 3, size, size)
  model_kw = dict(img_size=size, global_pool=pool)
  parity.assert_every_format_matches(name, reference, tmp_path, x, K, **model_kw)

  with torch.no_grad():
    pre_logits = reference.forward_head(reference.forward_features(x), pre_logits=True)
  reference.reset_classifier(0)
  with torch.no_grad():
    np.testing.assert_array_equal(reference(x).numpy(), pre_logits.numpy())
  path = parity.save_formats(reference, tmp_path)[1]
  diff = parity.forward_max_diff(name, reference, path, x, 0, **model_kw)
  assert diff <= 1e-4, f"{name} {pool} pooled features: max |diff| {diff}"


@pytest.mark.parametrize("name,size", [
    (SMALL, 64), (SMALL32, 64),
    pytest.param(LARGE, 64, marks=pytest.mark.slow)])
def test_feature_maps_match_forward_intermediates(tmp_path, name, size):
  reference = _reference(name, size)
  depth = len(reference.blocks)
  take = vit.feature_block_indices(depth)
  assert take == [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]
  x = torch.randn(2, 3, size, size)
  with torch.no_grad():
    expected = reference.forward_intermediates(x, indices=take, intermediates_only=True)
  path = parity.save_formats(reference, tmp_path)[1]
  variables = weights.load(name, path, num_classes=K, keep_head=True, img_size=size)
  model = models.create(name, K, img_size=size)
  maps = jax.jit(model.apply, static_argnames="feature_maps")(variables, _nhwc(x),
                                                              feature_maps=True)
  stride = reference.patch_embed.patch_size[0]
  assert len(maps) == 4
  for got, want in zip(maps, expected):
    assert got.shape == (2, size // stride, size // stride, reference.embed_dim)
    assert got.dtype == jnp.float32
    diff = np.abs(np.asarray(got) - want.numpy().transpose(0, 2, 3, 1)).max()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("old,new", [(14, (8, 8)), (7, (10, 10)), (14, (6, 12)), (4, (4, 4))])
def test_resample_pos_embed_matches_timm(old, new):
  pos_embed = torch.randn(1, 1 + old * old, 32)
  expected = resample_abs_pos_embed(pos_embed, new_size=list(new), num_prefix_tokens=1)
  got = vit.resample_pos_embed(pos_embed.numpy(), new)
  assert got.shape == tuple(expected.shape)
  np.testing.assert_array_equal(got[:, 0], pos_embed[:, 0].numpy())  # class token kept
  assert np.abs(got - expected.numpy()).max() <= 1e-4


@pytest.mark.parametrize("name,img_size", [
    (SMALL, 160),          # grid 14 -> 10: downsampling
    (SMALL32, 320),        # grid 7 -> 10: upsampling
    (SMALL, (96, 128))])   # grid 14 -> 6 x 8: non-square
def test_checkpoint_at_224_loads_at_other_size(tmp_path, name, img_size):
  """A 224 px checkpoint into a model at another img_size: logits equal those of the timm
  model created at that size from the same checkpoint (timm's filter resizes pos_embed)."""
  checkpoint = _reference(name, 224)
  path = parity.save_formats(checkpoint, tmp_path)[1]
  reference = timm.create_model(name, pretrained=False, num_classes=K, img_size=img_size)
  reference.load_state_dict(checkpoint_filter_fn(checkpoint.state_dict(), reference))
  h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
  x = torch.randn(2, 3, h, w)
  diff = parity.forward_max_diff(name, reference, path, x, K, img_size=img_size)
  assert diff <= 1e-4, diff


def test_sgd_steps_in_train_mode_match_timm(tmp_path):
  reference = _reference(SMALL, 64)
  rel, update_err = parity.sgd_steps_max_rel_diff(
      SMALL, reference, tmp_path, torch.randn(4, 3, 64, 64), K, img_size=64)
  assert rel <= 1e-4 and update_err <= 1e-3, (rel, update_err)


def test_token_checkpoint_into_avg_head_names_the_norms(tmp_path):
  """global_pool changes which final norm exists; a mismatch is reported, not guessed."""
  path = parity.save_formats(_reference(SMALL32, 64), tmp_path)[1]
  with pytest.raises(ValueError, match=r"(?s)missing.*params/fc_norm/scale.*unexpected.*"
                                       r"params/norm/scale"):
    weights.load(SMALL32, path, num_classes=K, img_size=64, global_pool="avg")


def test_registry_paths_exist_in_params():
  for name in [f"vit_{s}_patch{p}_224" for s in ("small", "base", "large") for p in (16, 32)]:
    cfg = models.pretrained_cfg(name)
    shapes = flax.traverse_util.flatten_dict(jax.eval_shape(
        models.create(name, K).init, jax.random.PRNGKey(0),
        jnp.zeros((1, *cfg["input_size"])))["params"], sep="/")
    assert shapes[cfg["classifier"] + "/kernel"].shape[1] == K
    patch = int(name[-6:-4])
    assert shapes[cfg["first_conv"] + "/kernel"].shape[:3] == (patch, patch, 3)


def test_mechanics_bf16_drop_path_and_input_size():
  """On a 2-block ViT: only the compile time differs from the registered sizes."""
  model = vit.VisionTransformer(K, img_size=32, patch_size=16, embed_dim=64, depth=2,
                                num_heads=2, drop_path_rate=0.5, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  apply = jax.jit(model.apply, static_argnames="train")
  logits = apply(variables, x)
  assert logits.shape == (2, K) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, apply(variables, x))  # eval: no stochastic depth
  train = [apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(i)})
           for i in range(2)]
  assert not np.array_equal(train[0], train[1])
  with pytest.raises(ValueError, match="img_size"):
    model.apply(variables, jnp.zeros((1, 64, 64, 3)))
