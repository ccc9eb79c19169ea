"""ConvNeXt: forward parity with timm through every on-disk format (timm .pth/.safetensors,
the official facebookresearch release layout, the reference study's checkpoints), feature
maps against timm's features_only, train-mode SGD steps, and model mechanics."""

import functools
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
from timm.models.convnext import checkpoint_filter_fn
import torch

from medbench_jax import models
from medbench_jax import weights
from tests import parity

K = 14  # ChestX-ray14's labels, as the study's checkpoints have.
SIZES = ["convnext_tiny", "convnext_small", "convnext_base", "convnext_large"]


def _reference(name: str, num_classes: int = K, **kw) -> torch.nn.Module:
  """Random-init timm model in eval mode with trained-like values where init is degenerate:
  layer scales of 1e-6 would silence every block and unit norms / zero biases would leave
  their conversion untested."""
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
  return parity.trained_like(model).eval()


def _timm_to_official(key: str) -> str:
  """timm key -> facebookresearch/ConvNeXt key (models/convnext.py in that repository)."""
  key = re.sub(r"^stem\.", "downsample_layers.0.", key)
  key = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", key)
  key = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", key)
  key = key.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc", ".pwconv")
  return re.sub(r"^head\.(fc|norm)\.", lambda m: "head." if m.group(1) == "fc" else "norm.", key)


def _save_official(reference: torch.nn.Module, path) -> str:
  """The reference in the official release layout, {'model': state_dict} as the release
  .pth files hold it. timm's own checkpoint filter must map it back key for key: that ties
  the fixture to timm's reading of the official layout, not to the converter under test."""
  state_dict = reference.state_dict()
  official = {_timm_to_official(k): v for k, v in state_dict.items()}
  assert any(k.startswith("downsample_layers.1.0.") for k in official)
  back = checkpoint_filter_fn({"model": official}, reference)
  assert back.keys() == state_dict.keys()
  assert all(torch.equal(back[k], state_dict[k]) for k in back)
  torch.save({"model": official}, path)
  return str(path)


@functools.cache
def _compiled(name: str, num_classes: int, feature_maps: bool = False):
  """One jitted eval forward per configuration: the tests share it, since XLA's CPU compile
  of a ConvNeXt costs more than running it."""
  model = models.create(name, num_classes)
  return jax.jit(functools.partial(model.apply, feature_maps=feature_maps))


def _max_diff(name: str, path: str, x: torch.Tensor, expected: np.ndarray,
              num_classes: int = K) -> float:
  """Max |difference| of `name` loaded from `path` (head kept) against `expected`."""
  variables = weights.load(name, path, num_classes=num_classes, keep_head=True)
  actual = np.asarray(_compiled(name, num_classes)(variables, parity.to_nhwc(x)))
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.abs(actual - expected).max())


PARITY = [
    ("convnext_tiny", 64),
    pytest.param("convnext_small", 64, marks=pytest.mark.slow),
    pytest.param("convnext_base", 64, marks=pytest.mark.slow),
    pytest.param("convnext_large", 64, marks=pytest.mark.slow),
    pytest.param("convnext_base", 224, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,size", PARITY)
def test_forward_parity_with_timm(tmp_path, name, size):
  reference = _reference(name)
  x = torch.randn(2, 3, size, size)
  paths = [*parity.save_formats(reference, tmp_path),
           _save_official(reference, tmp_path / "official.pth")]
  with torch.no_grad():
    expected = reference(x).numpy()
  for path in paths:
    diff = _max_diff(name, path, x, expected)
    assert diff <= 1e-4, f"{name} {path} at {size}px: max |diff| {diff}"

  # num_classes=0: head/fc dropped, pooled + head.norm features as timm's pre-logits.
  with torch.no_grad():
    expected = reference.forward_head(reference.forward_features(x), pre_logits=True).numpy()
  variables = weights.load(name, paths[-1], num_classes=0)
  assert "fc" not in variables["params"]["head"]
  features = np.asarray(_compiled(name, 0)(variables, parity.to_nhwc(x)))
  assert features.shape == expected.shape == (2, reference.num_features)
  assert np.abs(features - expected).max() <= 1e-4


def test_feature_maps_match_timm_features_only(tmp_path):
  name, size = "convnext_tiny", 64
  reference = _reference(name)
  path = parity.save_formats(reference, tmp_path)[1]
  features_only = timm.create_model(name, pretrained=False, features_only=True)
  # FeatureListNet flattens the top-level Sequentials: stem.0 -> stem_0, stages.1 -> stages_1.
  features_only.load_state_dict({re.sub(r"^(stem|stages)\.(\d+)", r"\1_\2", k): v
                                 for k, v in reference.state_dict().items()
                                 if not k.startswith("head.")})
  x = torch.randn(2, 3, size, size)
  with torch.no_grad():
    expected = [f.numpy().transpose(0, 2, 3, 1) for f in features_only.eval()(x)]
  assert features_only.feature_info.reduction() == [4, 8, 16, 32]

  maps = _compiled(name, K, True)(weights.load(name, path, num_classes=K), parity.to_nhwc(x))
  assert [m.shape for m in maps] == [(2, size // s, size // s, c) for s, c in
                                     zip((4, 8, 16, 32), (96, 192, 384, 768))]
  for actual, want in zip(maps, expected):
    assert np.abs(np.asarray(actual) - want).max() <= 1e-4


def test_study_checkpoint_and_official_22k_head(tmp_path):
  """The study fine-tunes `timm.create_model('convnext_base', num_classes=14)` and saves
  {'epoch', 'lossMIN', 'state_dict', 'optimizer', 'scheduler'}, 'module.'-prefixed under
  DataParallel: the timm layout in a wrapper. (tiny stands in for base: same layout.)"""
  name, size = "convnext_tiny", 64
  reference = _reference(name)
  optimizer = torch.optim.Adam(reference.parameters(), lr=2e-4)
  reference(torch.randn(2, 3, 32, 32)).sum().backward()
  optimizer.step()
  scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=5)
  scheduler.step(0.3)
  path = str(tmp_path / "domain_adapted_convnext_checkpoint.pth")
  torch.save({"epoch": 12, "lossMIN": 0.25,
              "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()},
              "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)
  assert weights.read_state_dict(path).format == "reference"
  x = torch.randn(2, 3, size, size)
  with torch.no_grad():
    expected = reference(x).numpy()
  assert _max_diff(name, path, x, expected) <= 1e-4
  fresh = weights.load(name, path, num_classes=3)["params"]["head"]
  assert fresh["fc"]["kernel"].shape == (768, 3) and not np.any(fresh["fc"]["bias"])
  np.testing.assert_array_equal(fresh["norm"]["scale"],
                                reference.state_dict()["head.norm.weight"].numpy())

  # Official ImageNet-22K release: a 21841-class `head`, dropped for fine-tuning or kept.
  reference_22k = _reference(name, num_classes=21841)
  official = _save_official(reference_22k, tmp_path / "convnext_tiny_22k_224.pth")
  variables = weights.load(name, official, num_classes=K)
  assert variables["params"]["head"]["fc"]["kernel"].shape == (768, K)
  kept = weights.load(name, official, num_classes=21841, keep_head=True)
  np.testing.assert_array_equal(kept["params"]["head"]["fc"]["kernel"],
                                reference_22k.state_dict()["head.fc.weight"].numpy().T)
  with pytest.raises(ValueError, match=rf"head/fc/kernel \(768, 21841\) vs \(768, {K}\)"):
    weights.load(name, official, num_classes=K, keep_head=True)


def test_sgd_steps_in_train_mode_match_timm(tmp_path):
  """Gradients through every layer (LayerNorms, layer scales, depthwise convs) in fp32."""
  reference = _reference("convnext_tiny", drop_path_rate=0.0)
  rel, update_err = parity.sgd_steps_max_rel_diff(
      "convnext_tiny", reference, tmp_path, torch.randn(4, 3, 32, 32), K)
  assert rel <= 1e-4 and update_err <= 1e-3, (rel, update_err)


def test_registry_init_and_mechanics():
  assert set(SIZES) <= set(models.list_models())
  cfg = models.pretrained_cfg("convnext_base")
  assert (cfg["first_conv"], cfg["classifier"], cfg["interpolation"]) == (
      "stem_0", "head/fc", "bicubic")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  shapes = jax.eval_shape(models.create("convnext_base", 3).init, jax.random.PRNGKey(0), x)
  params = flax.traverse_util.flatten_dict(shapes["params"], sep="/")
  assert params[cfg["first_conv"] + "/kernel"].shape == (4, 4, 3, 128)
  assert params[cfg["classifier"] + "/kernel"].shape == (1024, 3)
  assert params["stages_2/blocks_26/conv_dw/kernel"].shape == (7, 7, 1, 512)
  # Initial values as timm's: layer scale 1e-6 (None: no gamma), identity LayerNorms.
  small = dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
  model = models.create("convnext_tiny", 3, **small)

  @jax.jit
  def initial(rng):  # Only these leaves: XLA prunes the costly random draws of the others.
    params = model.init(rng, x)["params"]
    return params["stages_3"]["blocks_0"]["gamma"], params["head"]["norm"]["scale"]
  gamma, norm_scale = initial(jax.random.PRNGKey(0))
  np.testing.assert_array_equal(gamma, np.float32(1e-6))
  np.testing.assert_array_equal(norm_scale, 1.0)
  no_scale = jax.eval_shape(models.create("convnext_tiny", 3, ls_init_value=None, **small).init,
                            jax.random.PRNGKey(0), x)["params"]
  assert "gamma" not in no_scale["stages_0"]["blocks_0"]


def test_drop_path_and_bf16(tmp_path):
  name, x = "convnext_tiny", jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = weights.load(name, parity.save_formats(_reference(name), tmp_path)[1], K,
                           keep_head=True)
  apply = jax.jit(models.create(name, K, drop_path_rate=0.5).apply, static_argnames="train")
  with pytest.raises(flax.errors.InvalidRngError):
    apply(variables, x, train=True)
  a = apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  b = apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  assert a.shape == (2, K) and not np.allclose(a, b)

  # bf16 compute on the same float32 parameters, float32 logits.
  out16 = jax.jit(models.create(name, K, dtype=jnp.bfloat16).apply)(variables, x)
  out32 = _compiled(name, K)(variables, x)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=0.05 * float(jnp.abs(out32).max()) + 1e-3)
