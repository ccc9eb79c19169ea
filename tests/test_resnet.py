"""ResNet beyond resnet18..152 (whose parity lives in test_weights.py): wide_resnet*_2,
SimCLR's wide ResNet-50s through both PyTorch conversions in use (tonylins/simclr-converter
for v1, Separius/SimCLRv2-Pytorch for v2), per-stage feature maps against timm, and
train-mode SGD steps of a wide ResNet."""

import jax
import numpy as np
import pytest
import timm
import torch
from torch import nn
import torchvision
from torchvision.models.resnet import Bottleneck

from medbench_jax import models
from medbench_jax import weights
from tests import parity

K = 5


def _calibrated(model: nn.Module, size: int) -> nn.Module:
  """Trained-like BatchNorm state; the residual branches' last BN gammas kept small."""
  torch.manual_seed(1)
  return parity.calibrate_batch_norm(
      model, size, lambda name: name.endswith(("bn2", "bn3", ".net.5.0")))


def _timm(name: str, size: int, num_classes: int = K) -> nn.Module:
  torch.manual_seed(0)
  return _calibrated(timm.create_model(name, pretrained=False, num_classes=num_classes), size)


class WiderResNet(torchvision.models.resnet.ResNet):
  """tonylins/simclr-converter's resnet_wider.ResNet: torchvision's ResNet with every channel
  count times `width`, stem included; `resnet50x{1,2,4}` there are Bottleneck, [3, 4, 6, 3]."""

  def __init__(self, width: int, num_classes: int = 1000):
    nn.Module.__init__(self)  # torchvision's __init__ hard-codes the 64-channel stem.
    self._norm_layer, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 1, 1, 64
    self.inplanes = 64 * width
    self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(self.inplanes)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(Bottleneck, 64 * width, 3)
    self.layer2 = self._make_layer(Bottleneck, 128 * width, 4, stride=2)
    self.layer3 = self._make_layer(Bottleneck, 256 * width, 6, stride=2)
    self.layer4 = self._make_layer(Bottleneck, 512 * width, 3, stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * Bottleneck.expansion * width, num_classes)


# --- Separius/SimCLRv2-Pytorch resnet.py (selective-kernel parts left out), as published ---

def _sep_conv(cin: int, cout: int, kernel_size: int = 3, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, kernel_size, stride, padding=(kernel_size - 1) // 2, bias=False)


class _SepBatchNormRelu(nn.Sequential):
  def __init__(self, channels: int, relu: bool = True):
    super().__init__(nn.BatchNorm2d(channels, eps=1e-5), nn.ReLU() if relu else nn.Identity())


class _SepProjection(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.shortcut = _sep_conv(cin, cout, kernel_size=1, stride=stride)
    self.bn = _SepBatchNormRelu(cout, relu=False)

  def forward(self, x):
    return self.bn(self.shortcut(x))


class _SepBottleneckBlock(nn.Module):
  expansion = 4

  def __init__(self, cin: int, cout: int, stride: int, use_projection: bool = False):
    super().__init__()
    self.projection = _SepProjection(cin, cout * 4, stride) if use_projection else nn.Identity()
    self.net = nn.Sequential(
        _sep_conv(cin, cout, kernel_size=1), _SepBatchNormRelu(cout),
        _sep_conv(cout, cout, stride=stride), _SepBatchNormRelu(cout),
        _sep_conv(cout, cout * 4, kernel_size=1), _SepBatchNormRelu(cout * 4, relu=False))

  def forward(self, x):
    return torch.relu(self.projection(x) + self.net(x))


class _SepBlocks(nn.Module):
  def __init__(self, num_blocks: int, cin: int, cout: int, stride: int):
    super().__init__()
    self.blocks = nn.ModuleList([_SepBottleneckBlock(cin, cout, stride, True)])
    self.channels_out = cout * 4
    for _ in range(num_blocks - 1):
      self.blocks.append(_SepBottleneckBlock(self.channels_out, cout, 1))

  def forward(self, x):
    for block in self.blocks:
      x = block(x)
    return x


class SimCLRv2ResNet(nn.Module):
  """Separius's ResNet (sk_ratio=0): `net` = [Stem, Blocks x 4], `fc` (1000), and
  forward(x, apply_fc=False) returning the pooled features unless apply_fc."""

  def __init__(self, layers, width: int):
    super().__init__()
    stem = nn.Sequential(_sep_conv(3, 64 * width, kernel_size=7, stride=2),
                         _SepBatchNormRelu(64 * width),
                         nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    ops, channels = [stem], 64 * width
    for i, num_blocks in enumerate(layers):
      ops.append(_SepBlocks(num_blocks, channels, 64 * width * 2**i, 1 if i == 0 else 2))
      channels = ops[-1].channels_out
    self.net = nn.Sequential(*ops)
    self.fc = nn.Linear(channels, 1000)

  def forward(self, x, apply_fc=False):
    h = self.net(x).mean(dim=[2, 3])
    return self.fc(h) if apply_fc else h


def _separius_head(channels: int, out_dim: int = 128) -> nn.Module:
  """Separius's ContrastiveHead: saved next to the backbone as checkpoint['head']."""
  layers = nn.ModuleList()
  for i in range(3):
    dim = channels if i < 2 else out_dim
    layers.extend([nn.Linear(channels, dim, bias=False), nn.BatchNorm1d(dim)]
                  + ([nn.ReLU()] if i < 2 else []))
  head = nn.Module()
  head.layers = layers
  return head


# --- forward parity ------------------------------------------------------------------------

@pytest.mark.parametrize("name,size", [
    ("wide_resnet50_2", 64),
    pytest.param("wide_resnet101_2", 64, marks=pytest.mark.slow),
    pytest.param("wide_resnet50_2", 224, marks=pytest.mark.slow),
])
def test_wide_resnet_forward_parity_with_timm(tmp_path, name, size):
  reference = _timm(name, size)
  x = torch.randn(2, 3, size, size)
  parity.assert_every_format_matches(name, reference, tmp_path, x, K)


@pytest.mark.slow
def test_wide_resnet_matches_torchvision_layout(tmp_path):
  """torchvision's wide_resnet50_2 is the same module tree as timm's."""
  torch.manual_seed(0)
  reference = _calibrated(torchvision.models.wide_resnet50_2(num_classes=K), 32)
  path = parity.save_formats(reference, tmp_path)[0]
  diff = parity.forward_max_diff("wide_resnet50_2", reference, path, torch.randn(2, 3, 32, 32), K)
  print(f"torchvision wide_resnet50_2 at 32px: max |diff| {diff:.2e}")
  assert diff <= 1e-4, diff


SIMCLR = [("resnet50x1", 1, 64), pytest.param("resnet50x2", 2, 64, marks=pytest.mark.slow),
          pytest.param("resnet50x4", 4, 32, marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,width,size", SIMCLR)
def test_simclr_v1_tonylins_conversion(tmp_path, name, width, size):
  """tonylins/simclr-converter saves torch.save({'state_dict': model.state_dict()}) of its
  WiderResNet with the 1000-class supervised head."""
  torch.manual_seed(0)
  reference = _calibrated(WiderResNet(width), size)
  path = tmp_path / f"resnet50-{width}x.pth"
  torch.save({"state_dict": reference.state_dict()}, path)
  x = torch.rand(2, 3, size, size)  # SimCLR inputs: [0, 1], not normalised.
  diff = parity.forward_max_diff(name, reference, str(path), x, 1000)
  assert diff <= 1e-4, f"{name} at {size}px: max |diff| {diff}"
  features = _pooled_features_max_diff(name, _pooled(reference), str(path), x)
  print(f"{name} tonylins at {size}px: logits {diff:.2e}, pooled features {features:.2e}")
  assert features <= 1e-4, f"{name} pooled features at {size}px: max |diff| {features}"


@pytest.mark.parametrize("name,width,size", SIMCLR[:2])
def test_simclr_v2_separius_conversion(tmp_path, name, width, size):
  """Separius/SimCLRv2-Pytorch saves {'resnet': backbone, 'head': contrastive head} as
  r50_{W}x_sk0.pth; the backbone keys are its own (net.0.0.weight, ...)."""
  torch.manual_seed(0)
  reference = _calibrated(SimCLRv2ResNet((3, 4, 6, 3), width), size)
  assert "net.1.blocks.0.projection.bn.0.running_var" in reference.state_dict()
  path = tmp_path / f"r50_{width}x_sk0.pth"
  torch.save({"resnet": reference.state_dict(),
              "head": _separius_head(2048 * width).state_dict()}, path)
  x = torch.rand(2, 3, size, size)
  diff = parity.forward_max_diff(name, _ApplyFc(reference), str(path), x, 1000)
  assert diff <= 1e-4, f"{name} at {size}px: max |diff| {diff}"
  features = _pooled_features_max_diff(name, reference, str(path), x)
  print(f"{name} Separius at {size}px: logits {diff:.2e}, pooled features {features:.2e}")
  assert features <= 1e-4, f"{name} pooled features at {size}px: max |diff| {features}"


def test_simclr_selective_kernel_checkpoint_is_refused():
  state_dict = {"net.0.0.weight": np.zeros((32, 3, 3, 3), np.float32),
                "net.1.blocks.0.net.2.mixing_conv.0.weight": np.zeros((32, 64, 1, 1), np.float32)}
  with pytest.raises(ValueError, match="Selective-kernel"):
    models.converter("resnet50x1")(state_dict)


def test_simclr_pretrained_cfg_takes_unnormalised_inputs():
  for name in ("resnet50x1", "resnet50x2", "resnet50x4"):
    cfg = models.pretrained_cfg(name)
    assert cfg["mean"] == (0.0, 0.0, 0.0) and cfg["std"] == (1.0, 1.0, 1.0)
  assert models.pretrained_cfg("wide_resnet50_2")["mean"] == models.IMAGENET_MEAN


class _ApplyFc(nn.Module):
  def __init__(self, model: nn.Module):
    super().__init__()
    self.model = model

  def forward(self, x):
    return self.model(x, apply_fc=True)


def _pooled_features_max_diff(name: str, reference: nn.Module, path: str,
                              x: torch.Tensor) -> float:
  """num_classes=0 from a checkpoint with a head: the head is dropped, features pooled."""
  with torch.no_grad():
    expected = reference.eval()(x).numpy()
  variables = weights.load(name, path, num_classes=0)
  actual = jax.jit(models.create(name, 0).apply)(variables, parity.to_nhwc(x))
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.abs(np.asarray(actual) - expected).max())


def _pooled(model: torchvision.models.ResNet) -> nn.Module:
  """The same modules up to the global pool (what num_classes=0 returns)."""
  return nn.Sequential(*list(model.children())[:-1], nn.Flatten()).eval()


# --- feature maps --------------------------------------------------------------------------

@pytest.mark.parametrize("name,channels", [
    ("resnet18", (64, 128, 256, 512)),
    pytest.param("wide_resnet50_2", (256, 512, 1024, 2048), marks=pytest.mark.slow),
])
def test_feature_maps_match_timm(tmp_path, name, channels):
  size = 64
  reference = _timm(name, size)
  path = parity.save_formats(reference, tmp_path)[1]
  x = torch.randn(2, 3, size, size)
  with torch.no_grad():
    expected = reference.forward_intermediates(x, indices=(1, 2, 3, 4), intermediates_only=True)
  assert [f.shape[-1] for f in expected] == [size // s for s in (4, 8, 16, 32)]
  model = models.create(name, K)
  maps = jax.jit(lambda v, x: model.apply(v, x, feature_maps=True))(
      weights.load(name, path, num_classes=K), parity.to_nhwc(x))
  assert [m.shape for m in maps] == [(2, size // s, size // s, c)
                                     for s, c in zip((4, 8, 16, 32), channels)]
  diffs = [float(np.abs(np.asarray(a) - w.numpy().transpose(0, 2, 3, 1)).max())
           for a, w in zip(maps, expected)]
  print(f"{name} feature maps at {size}px: max |diff| per stride {diffs}")
  assert max(diffs) <= 1e-4


def test_simclr_feature_map_widths():
  model = models.create("resnet50x2", 0)
  shapes = jax.eval_shape(lambda x: model.init_with_output(
      jax.random.PRNGKey(0), x, feature_maps=True)[0], jax.ShapeDtypeStruct((1, 64, 64, 3),
                                                                            np.float32))
  assert [s.shape for s in shapes] == [(1, 16, 16, 512), (1, 8, 8, 1024), (1, 4, 4, 2048),
                                       (1, 2, 2, 4096)]


# --- train mode ----------------------------------------------------------------------------

@pytest.mark.parametrize("layers,float64", [
    ((1, 1, 1, 1), False),
    pytest.param((3, 4, 6, 3), True, marks=pytest.mark.slow),
])
def test_wide_resnet_sgd_steps_in_train_mode_match_pytorch(tmp_path, layers, float64):
  """wide_resnet50_2's blocks, one per stage in the fast case (the same code path, compiled
  in seconds). The full depth needs float64: train-mode gradients of a deep random-init CNN
  are ill-conditioned in fp32 (see parity.sgd_steps_max_rel_diff)."""
  torch.manual_seed(0)
  reference = _calibrated(timm.create_model("wide_resnet50_2", num_classes=K, layers=layers), 32)
  rel, update_err = parity.sgd_steps_max_rel_diff(
      "wide_resnet50_2", reference, tmp_path, torch.randn(4, 3, 32, 32), K, float64=float64,
      stage_sizes=layers)
  print(f"train mode: max rel {rel:.2e}, update error {update_err:.2e}")
  assert rel <= 1e-4 and update_err <= 1e-3, (rel, update_err)
