"""Swin against timm: forward parity of the sizes test_weights.py does not cover (large, the
384 px window-12 models), pooled features, feature maps, bias tables resized for other
windows and resolutions, Microsoft's release layout (384 px, 22k heads), the reference
study's domain-adapted checkpoints, and train-mode SGD steps."""

import math
import re

import jax
import numpy as np
import pytest
import timm
from timm.models import swin_transformer as timm_swin
import torch

from medbench_jax import models
from medbench_jax import weights
from tests import parity

K = 5
# Small widths and depths for the fast tests; window and resolution come from each test.
SMALL = dict(embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))


def _reference(name: str, img_size: int, num_classes: int = K, **kw) -> torch.nn.Module:
  """Random-init timm model in eval mode (timm's own init; Swin has no BatchNorm)."""
  torch.manual_seed(0)
  return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size,
                           **kw).eval()


def _assert_close(diff: float, what: str) -> None:
  print(f"{what}: max |diff| {diff:.2e}")  # the measured figure, shown by `pytest -rP`
  assert diff <= 1e-4, f"{what}: max |diff| {diff}"


def _logits(name: str, variables, x: torch.Tensor, num_classes: int = K, **model_kw):
  model = models.create(name, num_classes, **model_kw)
  return np.asarray(jax.jit(model.apply)(variables, parity.to_nhwc(x)))


# tiny/small/base at 224 px with window 7 are in test_weights.py::test_forward_parity_with_pytorch.
PARITY = [
    # 96 px with window 12: stage grids 24, 12, 6, 3, so two full windows, then clamped ones.
    # Fast: Swin-B's widths and heads, one block pair per stage.
    ("swin_base_patch4_window12_384", 96, dict(depths=(2, 2, 2, 2))),
    pytest.param("swin_base_patch4_window12_384", 96, {}, marks=pytest.mark.slow),
    pytest.param("swin_large_patch4_window12_384", 96, {}, marks=pytest.mark.slow),
    pytest.param("swin_large_patch4_window7_224", 112, {}, marks=pytest.mark.slow),
    pytest.param("swin_large_patch4_window7_224", 224, {}, marks=pytest.mark.slow),
    pytest.param("swin_base_patch4_window12_384", 384, {}, marks=pytest.mark.slow),
    pytest.param("swin_large_patch4_window12_384", 384, {}, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,size,arch", PARITY)
def test_forward_parity(tmp_path, name, size, arch):
  reference = _reference(name, size, **arch)
  x = torch.randn(2 if size < 384 else 1, 3, size, size)
  for path in parity.save_formats(reference, tmp_path):
    diff = parity.forward_max_diff(name, reference, path, x, K, img_size=size, **arch)
    _assert_close(diff, f"{name}{arch or ''} at {size}px from {path}")


@pytest.mark.parametrize("name,size,timm_kw", [
    # 96 px, window 4: padded stage grids (24, 12, 6, 3) and a clamped last window.
    ("swin_demo_patch4_window4_96", 96, dict(window_size=4, **SMALL)),
    pytest.param("swin_tiny_patch4_window7_224", 112, {}, marks=pytest.mark.slow),
])
def test_backbone_outputs_match_timm(tmp_path, name, size, timm_kw):
  """num_classes=0: timm's pooled pre-logits features; feature_maps=True: its
  features_only stage outputs (a segmentation decoder's input)."""
  reference = _reference("swin_tiny_patch4_window7_224", size, **timm_kw)
  features_only = timm.create_model("swin_tiny_patch4_window7_224", features_only=True,
                                    img_size=size, **timm_kw)
  # features_only names the stages layers_N; it has no final norm or head.
  features_only.load_state_dict({re.sub(r"^layers\.(\d+)", r"layers_\1", k): v
                                 for k, v in reference.state_dict().items()
                                 if not k.startswith(("norm.", "head."))})
  x = torch.randn(2, 3, size, size)
  with torch.no_grad():
    pooled = reference.forward_head(reference.forward_features(x), pre_logits=True).numpy()
    expected_maps = [f.numpy() for f in features_only.eval()(x)]

  path = parity.save_formats(reference, tmp_path)[1]
  variables = weights.load(name, path, num_classes=0, img_size=size)
  assert "head" not in variables["params"]
  model = models.create(name, 0, img_size=size)
  apply = jax.jit(model.apply, static_argnames="feature_maps")
  diff = np.abs(np.asarray(apply(variables, parity.to_nhwc(x))) - pooled).max()
  _assert_close(diff, f"{name} at {size}px pooled features")
  maps = apply(variables, parity.to_nhwc(x), feature_maps=True)
  assert [m.shape for m in maps] == [
      (2, math.ceil(size / s), math.ceil(size / s), model.embed_dim * s // 4)
      for s in (4, 8, 16, 32)]
  for stage, (got, want) in enumerate(zip(maps, expected_maps)):
    diff = np.abs(np.asarray(got) - want).max()
    _assert_close(diff, f"{name} at {size}px stage {stage} map")


@pytest.mark.parametrize("timm_name,ckpt,name,model,arch", [
    # Window 4 -> 7 at 128 px: stage windows (4, 4, 4, 4) -> (7, 7, 7, 4), three tables grow.
    ("swin_tiny_patch4_window7_224", (128, 4), "swin_demo_patch4_window4_128", (128, 7), SMALL),
    # 128 -> 64 px: the last stage (2x2) clamps its window to 2, its table shrinks 7x7 -> 3x3.
    ("swin_tiny_patch4_window7_224", (128, 4), "swin_demo_patch4_window4_128", (64, 4), SMALL),
    # Fine-tuning at 384 px: a 224 px window-7 Swin-B checkpoint into the window-12 model.
    pytest.param("swin_base_patch4_window7_224", (224, 7), "swin_base_patch4_window12_384",
                 (384, 12), {}, marks=pytest.mark.slow),
])
def test_window_and_resolution_change_resize_bias_tables_as_timm(
    tmp_path, timm_name, ckpt, name, model, arch):
  (ckpt_size, ckpt_window), (size, window) = ckpt, model
  source = _reference(timm_name, ckpt_size, window_size=ckpt_window, **arch)
  # Trained bias tables are O(1); at timm's init (std 0.02) even a plain bicubic resize
  # would stay within the tolerance.
  with torch.no_grad():
    for key, param in source.named_parameters():
      if key.endswith("relative_position_bias_table"):
        param.mul_(50.0)
  # timm's model for the new resolution and window, given the checkpoint through timm's own
  # filter, which resizes the relative position bias tables.
  target = _reference(timm_name, size, window_size=window, **arch)
  target.load_state_dict(timm_swin.checkpoint_filter_fn(source.state_dict(), target))
  assert any(v.shape != source.state_dict()[k].shape for k, v in target.state_dict().items()
             if k.endswith("relative_position_bias_table"))
  path = parity.save_formats(source, tmp_path)[1]
  kw = dict(img_size=size, window_size=window)
  variables = weights.load(name, path, num_classes=K, keep_head=True, **kw)
  x = torch.randn(1, 3, size, size)
  with torch.no_grad():
    expected = target(x).numpy()
  diff = np.abs(_logits(name, variables, x, **kw) - expected).max()
  _assert_close(diff, f"{ckpt_size}px window {ckpt_window} -> {size}px window {window}")


def _microsoft_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
  """A timm Swin's state dict as microsoft/Swin-Transformer saves it: PatchMerging at the end
  of the previous stage, head.weight/bias, and the relative_position_index and attn_mask
  buffers (persistent there, non-persistent in timm)."""
  out = {}
  for key, value in model.state_dict().items():
    key = re.sub(r"^layers\.(\d+)\.downsample",
                 lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
    out[key.replace("head.fc.", "head.")] = value
  for name, module in model.named_modules():
    if isinstance(module, timm_swin.WindowAttention):
      out[f"{name}.relative_position_index"] = module.relative_position_index
    if isinstance(module, timm_swin.SwinTransformerBlock) and module.attn_mask is not None:
      out[f"{name}.attn_mask"] = module.attn_mask
  return out


def test_microsoft_layout_of_a_384_window12_22k_release(tmp_path):
  """Like swin_base_patch4_window12_384_22k.pth: {'model': ...}, 21841-class head; at a
  small width and 96 px so the 22k head stays small."""
  name, size = "swin_base_patch4_window12_384", 96
  arch = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
  kw = dict(img_size=size, **arch)
  reference = _reference(name, size, num_classes=21841, **arch)
  state_dict = _microsoft_layout(reference)
  assert "layers.0.downsample.reduction.weight" in state_dict
  assert any(k.endswith("attn_mask") for k in state_dict)
  torch.save({"model": state_dict}, tmp_path / "ms.pth")
  x = torch.randn(2, 3, size, size)
  with torch.no_grad():
    expected = reference(x).numpy()
  variables = weights.load(name, str(tmp_path / "ms.pth"), num_classes=21841, keep_head=True,
                           **kw)
  diff = np.abs(_logits(name, variables, x, 21841, **kw) - expected).max()
  _assert_close(diff, "Microsoft layout, window 12, 21841 classes")
  # Fine-tuning drops the 22k head.
  variables = weights.load(name, str(tmp_path / "ms.pth"), num_classes=K, **kw)
  assert variables["params"]["head"]["kernel"].shape == (128, K)


def test_reference_study_domain_adapted_checkpoint(tmp_path):
  """The study's Swin-B (ImageNet -> MIMIC) checkpoints come from its training script:
  Microsoft's SwinTransformer with a plain Linear head (no Sigmoid wrapper for Swin), saved
  as {'epoch', 'lossMIN', 'state_dict' (DataParallel 'module.' keys), 'optimizer',
  'scheduler'}. At a small width here; the layout is that of the full model."""
  name, size = "swin_base_patch4_window7_224", 112
  kw = dict(img_size=size, **SMALL)
  reference = _reference(name, size, num_classes=14, **SMALL)
  optimizer = torch.optim.Adam(reference.parameters(), lr=2e-4)
  reference(torch.randn(2, 3, size, size)).sum().backward()
  optimizer.step()
  scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=5)
  scheduler.step(0.3)
  reference.eval()
  torch.save({"epoch": 12, "lossMIN": 0.31,
              "state_dict": {f"module.{k}": v for k, v in _microsoft_layout(reference).items()},
              "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
             tmp_path / "domain_adapted_swin_base_imagenet_mimic_checkpoint.pth.tar")
  path = str(tmp_path / "domain_adapted_swin_base_imagenet_mimic_checkpoint.pth.tar")
  x = torch.randn(2, 3, size, size)
  with torch.no_grad():
    expected = reference(x).numpy()
  variables = weights.load(name, path, num_classes=14, keep_head=True, **kw)
  diff = np.abs(_logits(name, variables, x, 14, **kw) - expected).max()
  _assert_close(diff, "study checkpoint")


def test_sgd_steps_in_train_mode_match_timm(tmp_path):
  # 64 px: stage grids 16, 8, 4, 2, so padded and shifted 7x7 windows, then clamped ones.
  name, size = "swin_tiny_patch4_window7_224", 64
  reference = _reference(name, size, drop_path_rate=0.0)
  rel, update_err = parity.sgd_steps_max_rel_diff(
      name, reference, tmp_path, torch.randn(2, 3, size, size), K, img_size=size,
      drop_path_rate=0.0)
  print(f"{name} at {size}px, 2 SGD steps: max rel diff {rel:.2e}, update error {update_err:.2e}")
  assert rel <= 1e-4 and update_err <= 1e-3, (rel, update_err)
