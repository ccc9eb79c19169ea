"""DenseNet: forward parity with timm/torchvision through .pth, .safetensors and
torchvision's older published key spelling, feature maps against timm's
forward_intermediates, train-mode SGD steps, bf16."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torchvision

from medbench_jax import models
from medbench_jax import weights
from tests import parity

K = 5
CHANNELS = {"densenet121": (256, 512, 1024, 1024), "densenet161": (384, 768, 2112, 2208),
            "densenet169": (256, 512, 1280, 1664), "densenet201": (256, 512, 1792, 1920)}


def _reference(name: str, size: int, source: str = "timm", num_classes: int = K,
               **kw) -> torch.nn.Module:
  """Random-init reference with calibrated BatchNorm (parity.calibrate_batch_norm); each
  dense layer's last BN (norm2 feeds its conv2) gets no special treatment: DenseNet has no
  residual sums to blow up."""
  torch.manual_seed(0)
  if source == "torchvision":
    model = torchvision.models.get_model(name, num_classes=num_classes, **kw)
  else:
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
  return parity.calibrate_batch_norm(model, size)


def _old_spelling(key: str) -> str:
  """'denselayer1.norm1.weight' -> 'denselayer1.norm.1.weight', as in torchvision's original
  model_urls checkpoints (what its `_load_state_dict` regex undoes)."""
  return re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key)


PARITY = [
    ("densenet121", 64),
    pytest.param("densenet161", 224, marks=pytest.mark.slow),
    pytest.param("densenet169", 64, marks=pytest.mark.slow),
    pytest.param("densenet201", 64, marks=pytest.mark.slow),
    pytest.param("densenet121", 224, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,size", PARITY)
def test_forward_parity_with_timm(tmp_path, name, size):
  reference = _reference(name, size)
  x = torch.randn(2, 3, size, size)
  parity.assert_every_format_matches(name, reference, tmp_path, x, K)

  # num_classes=0: the classifier is dropped, features are relu(norm5) pooled.
  with torch.no_grad():
    expected = reference.forward_head(reference.forward_features(x), pre_logits=True).numpy()
  variables = weights.load(name, str(tmp_path / "model.pth"), num_classes=0)
  assert "classifier" not in variables["params"]
  features = jax.jit(models.create(name, 0).apply)(variables, parity.to_nhwc(x))
  assert features.shape == expected.shape == (2, CHANNELS[name][-1])
  features_diff = np.abs(np.asarray(features) - expected).max()
  print(f"{name} pooled features at {size}px: max |diff| {features_diff:.2e}")
  assert features_diff <= 1e-4


def test_densenet161_widths_match_torchvision(tmp_path):
  """densenet161's own widths (growth 48, 96 stem channels) through its registered factory,
  against torchvision's DenseNet with them; two layers per block compile in seconds, the
  full (6, 12, 36, 24) is the slow timm parity case above."""
  torch.manual_seed(0)
  reference = parity.calibrate_batch_norm(torchvision.models.DenseNet(
      growth_rate=48, block_config=(2, 2, 2, 2), num_init_features=96, num_classes=K), 32)
  parity.assert_every_format_matches("densenet161", reference, tmp_path,
                                     torch.randn(2, 3, 32, 32), K, block_config=(2, 2, 2, 2))


def test_torchvision_old_key_spelling(tmp_path):
  """torchvision's published densenet*-*.pth files spell dense-layer keys 'norm.1', 'conv.2'.
  The fixture's renaming must be exactly what torchvision's own loader regex undoes."""
  name, size = "densenet121", 64
  reference = _reference(name, size, source="torchvision")
  # Those files predate BatchNorm's num_batches_tracked buffer.
  state_dict = {k: v for k, v in reference.state_dict().items()
                if not k.endswith("num_batches_tracked")}
  old = {_old_spelling(k): v for k, v in state_dict.items()}
  assert "features.denseblock1.denselayer1.norm.1.running_var" in old
  assert "features.denseblock4.denselayer16.conv.2.weight" in old
  pattern = re.compile(  # torchvision.models.densenet._load_state_dict
      r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
  assert {pattern.sub(r"\1\2", k) for k in old} == set(state_dict)
  torch.save(old, tmp_path / "densenet121-a639ec97.pth")
  x = torch.randn(2, 3, size, size)
  diff = parity.forward_max_diff(name, reference, str(tmp_path / "densenet121-a639ec97.pth"),
                                x, K)
  print(f"torchvision {name}, old key spelling, at {size}px: max |diff| {diff:.2e}")
  assert diff <= 1e-4, diff


def test_feature_maps_match_timm(tmp_path):
  """Strides 4, 8, 16, 32: timm's forward_intermediates indices 1-4 (index 0, the stride-2
  stem, is not offered)."""
  name, size = "densenet121", 64
  reference = _reference(name, size)
  path = parity.save_formats(reference, tmp_path)[1]
  x = torch.randn(2, 3, size, size)
  with torch.no_grad():
    expected = reference.forward_intermediates(x, indices=(1, 2, 3, 4), intermediates_only=True)
  assert [i["reduction"] for i in reference.feature_info[1:]] == [4, 8, 16, 32]
  model = models.create(name, K)
  maps = jax.jit(lambda v, x: model.apply(v, x, feature_maps=True))(
      weights.load(name, path, num_classes=K), parity.to_nhwc(x))
  assert [m.shape for m in maps] == [(2, size // s, size // s, c)
                                     for s, c in zip((4, 8, 16, 32), CHANNELS[name])]
  diffs = [float(np.abs(np.asarray(a) - w.numpy().transpose(0, 2, 3, 1)).max())
           for a, w in zip(maps, expected)]
  print(f"{name} feature maps at {size}px: max |diff| per stride {diffs}")
  assert max(diffs) <= 1e-4


@pytest.mark.parametrize("name,block_config,float64", [
    ("densenet121", (2, 2, 2, 2), False),
    pytest.param("densenet121", (6, 12, 24, 16), True, marks=pytest.mark.slow),
])
def test_sgd_steps_in_train_mode_match_pytorch(tmp_path, name, block_config, float64):
  """Train mode: BatchNorm batch statistics and torch's unbiased running variance, gradients
  through every concatenation. The fast case is a two-layers-per-block DenseNet (the same
  code path, compiled in seconds). The full densenet121 needs float64: torch's own fp32
  steps differ from its fp64 ones by 5e-2 (relative) at 32 px, where block 4 normalises
  4 values per channel."""
  reference = _reference(name, 32, block_config=block_config)
  rel, update_err = parity.sgd_steps_max_rel_diff(
      name, reference, tmp_path, torch.randn(4, 3, 32, 32), K, float64=float64,
      block_config=block_config)
  print(f"train mode: max rel {rel:.2e}, update error {update_err:.2e}")
  assert rel <= 1e-4 and update_err <= 1e-3, (rel, update_err)


def test_bf16_compute_keeps_float32_params_and_logits(tmp_path):
  """bf16 compute deviates from fp32 no more than torch's own bf16 model does (same weights,
  same input): 8-bit mantissas are no 1e-4 probe. Two layers per block keep it fast."""
  name, block_config = "densenet121", (2, 2, 2, 2)
  reference = _reference(name, 32, block_config=block_config)
  path = parity.save_formats(reference, tmp_path)[1]
  variables = weights.load(name, path, num_classes=K, keep_head=True, block_config=block_config)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  x = torch.randn(2, 3, 32, 32)
  logits = jax.jit(models.create(name, K, dtype=jnp.bfloat16, block_config=block_config).apply)(
      variables, parity.to_nhwc(x))
  assert logits.dtype == jnp.float32
  with torch.no_grad():
    expected = reference(x).numpy()
    torch_bf16 = reference.to(torch.bfloat16)(x.to(torch.bfloat16)).float().numpy()
  torch_err = np.abs(torch_bf16 - expected).max()
  err = np.abs(np.asarray(logits) - expected).max()
  print(f"bf16 max |diff| to fp32 torch: ours {err:.3f}, torch bf16 {torch_err:.3f}")
  assert 0 < err <= 3 * torch_err, (err, torch_err)
