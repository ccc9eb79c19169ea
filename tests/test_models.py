"""Registry behaviour and model mechanics: shapes, features, bf16, BatchNorm, stochastic depth."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbench_jax import models

RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
SWINS = ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
         "swin_base_patch4_window7_224", "swin_demo_patch4_window4_128",
         "swin_demo_patch4_window4_96"]
DEMO = "swin_demo_patch4_window4_128"


def _images(size: int, batch: int = 2, seed: int = 0) -> jnp.ndarray:
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 3))


def _init(model, size: int, seed: int = 0):
  """Random variables of the model's shapes. Filled with numpy: XLA's CPU compile of a
  full `model.init` costs seconds per model; the real init is exercised in test_weights."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), _images(size, 1))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
    fan_in = np.prod(leaf.shape[:-1]) if name == "kernel" else 50
    return jnp.asarray(rng.normal(0, fan_in**-0.5, leaf.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(model, *args, **kw):
  return jax.jit(model.apply, static_argnames=("train", "mutable"))(*args, **kw)


def test_registry_lists_all_models():
  assert set(RESNETS + SWINS) <= set(models.list_models())
  assert models.list_models() == sorted(models.list_models())


def test_unknown_name_lists_closest_first():
  with pytest.raises(ValueError, match="resnet5O") as err:
    models.create("resnet5O", num_classes=2)
  available = str(err.value).split("closest first): ")[1].split(", ")
  assert available[0] == "resnet50"
  assert set(available) == set(models.list_models())
  with pytest.raises(ValueError, match="Unknown model"):
    models.pretrained_cfg("swin_huge")


@pytest.mark.parametrize("name", ["resnet18", DEMO])
def test_pretrained_cfg_paths_exist_in_params(name):
  cfg = models.pretrained_cfg(name)
  assert cfg["mean"] == models.IMAGENET_MEAN and cfg["std"] == models.IMAGENET_STD
  size = cfg["input_size"][0] if name == DEMO else 32
  params = flax.traverse_util.flatten_dict(_init(models.create(name, 3), size)["params"],
                                           sep="/")
  assert any(k.startswith(cfg["classifier"] + "/") for k in params)
  assert params[cfg["first_conv"] + "/kernel"].shape[2] == cfg["input_size"][2]
  cfg["mean"] = None  # A copy: callers cannot corrupt the registry.
  assert models.pretrained_cfg(name)["mean"] is not None


@pytest.mark.parametrize("name,size,features", [("resnet18", 32, 512), ("resnet50", 32, 2048),
                                                (DEMO, 128, 384)])
def test_logits_and_features_shapes(name, size, features):
  model = models.create(name, num_classes=3)
  variables = _init(model, size)
  logits = _apply(model, variables, _images(size), train=False)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32

  backbone = models.create(name, num_classes=0)
  variables = _init(backbone, size)
  assert models.pretrained_cfg(name)["classifier"] not in variables["params"]
  assert _apply(backbone, variables, _images(size)).shape == (2, features)


@pytest.mark.parametrize("name,size", [("resnet18", 32), (DEMO, 128)])
def test_bf16_compute_keeps_fp32_params(name, size):
  model32 = models.create(name, num_classes=4)
  model16 = models.create(name, num_classes=4, dtype=jnp.bfloat16)
  variables = _init(model16, size)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out16 = _apply(model16, variables, _images(size))
  out32 = _apply(model32, variables, _images(size))
  assert out16.dtype == jnp.float32 and np.all(np.isfinite(out16))
  np.testing.assert_allclose(out16, out32, atol=0.05 * float(jnp.abs(out32).max()) + 1e-3)


def test_train_mode_updates_batch_stats_with_torch_momentum():
  model = models.create("resnet18", num_classes=2)
  variables = _init(model, 32)
  x = _images(32, batch=4)
  _, updates = _apply(model, variables, x, train=True, mutable=("batch_stats",))
  old, new = variables["batch_stats"]["bn1"], updates["batch_stats"]["bn1"]
  # The stem BN sees conv1(x): torch momentum 0.1 blends 10% of the batch mean into zeros.
  conv1 = jax.lax.conv_general_dilated(
      x, variables["params"]["conv1"]["kernel"], (2, 2), ((3, 3), (3, 3)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * conv1.mean((0, 1, 2)),
                             rtol=1e-4, atol=1e-5)
  # Eval mode uses the running statistics and needs no mutable collection.
  np.testing.assert_array_equal(_apply(model, variables, x), _apply(model, variables, x))


def test_drop_path_needs_dropout_rng_in_train_mode():
  model = models.create(DEMO, num_classes=3, drop_path_rate=0.5)
  variables = _init(model, 128)
  x = _images(128)
  with pytest.raises(flax.errors.InvalidRngError):
    _apply(model, variables, x, train=True)
  a = _apply(model, variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  b = _apply(model, variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(a, b)
  evaluated = _apply(model, variables, x)
  np.testing.assert_array_equal(evaluated, _apply(model, variables, x))
  no_drop = models.create(DEMO, num_classes=3, drop_path_rate=0.0)
  np.testing.assert_allclose(_apply(no_drop, variables, x, train=True), evaluated, rtol=1e-5,
                             atol=1e-6)


def test_swin_window_clamped_to_small_stages():
  # At 112 px the last stage is 4x4 (< window 7): timm uses one 4x4 window, no shift.
  shapes = jax.eval_shape(models.create(SWINS[0], num_classes=2, img_size=112).init,
                          jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3)))["params"]
  table = lambda stage: shapes[f"layers_{stage}"]["blocks_1"]["attn"][
      "relative_position_bias_table"].shape
  assert table(0) == (13 * 13, 3) and table(2) == (13 * 13, 12) and table(3) == (7 * 7, 24)


def test_swin_rejects_other_input_sizes():
  model = models.create(DEMO, num_classes=2)
  variables = _init(model, 128)
  with pytest.raises(ValueError, match="img_size"):
    _apply(model, variables, _images(96))
