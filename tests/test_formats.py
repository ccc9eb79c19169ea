"""Checkpoint formats as their publishers save them: each fixture (tests/publishers.py)
wraps a random-init torchvision/timm model's state dict exactly as the publisher's training
script does (wrapper keys, prefixes, heads, momentum encoders, queues, optimizer state,
configs, legacy serialisation where they released such files), then loads it through
weights.load and compares outputs with the torch model, and the normalised state dict with
its backbone."""

import copy
import logging
import os
import pickle
import re
import uuid

import numpy as np
import pytest
from scipy import interpolate
import timm
from timm.layers import pos_embed_rel
from timm.models import swin_transformer
from timm.models.swin_transformer import SwinTransformer as TimmSwin
import torch
import torchvision

from medbench_jax import weights
from medbench_jax.models import swin
from medbench_jax.weights import formats
from tests import parity
from tests import publishers

K = 4
SIZE = 32


def _resnet(name: str = "resnet18", seed: int = 0) -> torch.nn.Module:
  torch.manual_seed(seed)
  model = torchvision.models.get_model(name, num_classes=K)
  last_bn = "bn2" if name in ("resnet18", "resnet34") else "bn3"
  return parity.calibrate_batch_norm(model, SIZE, lambda m: m.endswith(last_bn))


def _features(model: torch.nn.Module) -> torch.nn.Module:
  features = copy.deepcopy(model)
  features.fc = torch.nn.Identity()
  return features.eval()


FEATURE_CASES = [
    # (id, layout builder, expected format, torch.save legacy format as released, compare
    # outputs too: once per format; variants of a format compare the normalised parameters)
    ("moco_v1", lambda m: publishers.moco(m, 1), "moco", True, False),
    ("moco_v2", lambda m: publishers.moco(m, 2), "moco", True, True),
    ("swav", lambda m: publishers.swav(m, "single"), "swav", True, True),
    ("deepcluster_v2", lambda m: publishers.swav(m, "multi"), "swav", False, False),
    ("insdis", lambda m: publishers.pycontrast(m, "insdis"), "pycontrast", False, False),
    ("pirl", lambda m: publishers.pycontrast(m, "pirl"), "pycontrast", False, False),
    ("infomin", lambda m: publishers.pycontrast(m, "infomin"), "pycontrast", False, True),
    ("dino_resnet", publishers.dino, "dino", False, True),
    ("barlow_twins", lambda m: (publishers.resnet_backbone(m), []), "plain", False, True),
]


@pytest.fixture(scope="module")
def resnet18():
  return _resnet("resnet18")


@pytest.mark.parametrize("case,build,fmt,legacy,forward", FEATURE_CASES,
                         ids=[c[0] for c in FEATURE_CASES])
def test_ssl_resnet_formats(tmp_path, resnet18, case, build, fmt, legacy, forward):
  ckpt, dropped = build(resnet18)
  path = str(tmp_path / f"{case}.pth.tar")
  torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)

  normalised = weights.read_state_dict(path)
  assert normalised.format == fmt
  assert sorted(normalised.dropped) == sorted(dropped)
  expected = publishers.resnet_backbone(resnet18)
  assert sorted(normalised.state_dict) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(normalised.state_dict[k], v.numpy(), err_msg=k)
  if not forward:
    return
  # No classifier survives: the pooled features are the backbone's.
  diff = parity.forward_max_diff("resnet18", _features(resnet18), path,
                                 torch.randn(2, 3, SIZE, SIZE), num_classes=0)
  assert diff <= 1e-4, f"{case}: max |diff| {diff}"


def test_study_checkpoint_keeps_its_sigmoid_head(tmp_path, resnet18):
  ckpt, _ = publishers.reference(resnet18)
  path = str(tmp_path / "ImageNet_chestxray14.pth.tar")
  torch.save(ckpt, path)
  normalised = weights.read_state_dict(path)
  assert normalised.format == "reference"
  assert normalised.renamed == {"fc.0.weight": "fc.weight", "fc.0.bias": "fc.bias"}
  assert set(normalised.ignored_entries) == {"epoch", "lossMIN", "optimizer", "scheduler"}
  x = torch.randn(2, 3, SIZE, SIZE)
  # Logits: the study's model outputs sigmoid(logits); the head maps onto ours.
  diff = parity.forward_max_diff("resnet18", resnet18, path, x, num_classes=K)
  assert diff <= 1e-4, diff
  variables, report = weights.load_with_report("resnet18", path, num_classes=3)
  assert set(report.dropped) == {"params/fc/kernel", "params/fc/bias"}
  assert set(report.reinitialised) == {"params/fc/kernel", "params/fc/bias"}
  assert variables["params"]["fc"]["kernel"].shape == (512, 3)


@pytest.mark.slow  # The wrapper is the ResNet test's; the layout test_weights' Microsoft-Swin test.
def test_study_swin_checkpoint(tmp_path):
  """The study's Swin (Microsoft's implementation: downsample at the end of each stage,
  head `head`, a plain Linear) saved by its engine, as its domain-adapted Swin-B is."""
  torch.manual_seed(0)
  model = TimmSwin(num_classes=K, img_size=96, window_size=4, embed_dim=48,
                   depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16)).eval()
  microsoft = publishers.microsoft_swin(model)
  torch.save({"epoch": 30, "lossMIN": 0.15,
              "state_dict": publishers.prefixed("module.", microsoft)},
             tmp_path / "swin_mimic.pth.tar")
  path = str(tmp_path / "swin_mimic.pth.tar")
  assert weights.read_state_dict(path).format == "reference"
  diff = parity.forward_max_diff("swin_demo_patch4_window4_128", model, path,
                                 torch.randn(2, 3, 96, 96), num_classes=K, img_size=96)
  assert diff <= 1e-4, diff


def test_dino_student_by_explicit_format(tmp_path, resnet18):
  ckpt, _ = publishers.dino(resnet18)
  path = tmp_path / "dino_resnet50_pretrain_full_checkpoint.pth"
  torch.save(ckpt, path)
  student = weights.read_state_dict(f"dino_student:{path}")
  assert student.format == "dino_student"
  np.testing.assert_array_equal(student.state_dict["conv1.weight"],
                                ckpt["student"]["module.backbone.conv1.weight"].numpy())
  assert weights.read_state_dict(str(path)).format == "dino"  # the teacher by default
  with pytest.raises(ValueError, match="Unknown checkpoint format 'dino_teacher'"):
    formats.get("dino_teacher")


def test_wrong_format_is_named_in_the_error(tmp_path, resnet18):
  """A MoCo checkpoint read as plain fails listing the unexpected keys and the formats."""
  ckpt, _ = publishers.moco(resnet18, 2)
  path = tmp_path / "moco.pth.tar"
  torch.save(ckpt, path)
  with pytest.raises(ValueError, match=r"(?s)unexpected in the checkpoint.*encoder_k.*FORMAT:PATH"):
    weights.load("resnet18", f"plain:{path}", num_classes=K)


@pytest.mark.parametrize("prefix", ["encoder.", "backbone.", "swin_model.", "module.backbone."])
def test_sub_module_prefix_is_stripped_and_logged(tmp_path, resnet18, prefix, caplog):
  """A state dict saved from a wrapper's sub-module, as the study's loader strips it."""
  expected = publishers.resnet_backbone(resnet18)
  path = tmp_path / "model.pth"
  torch.save(publishers.prefixed(prefix, expected), path)
  with caplog.at_level(logging.INFO):
    variables = weights.load("resnet18", str(path), num_classes=0)
  parts = re.findall(r"[a-z_]+\.", prefix)
  assert weights.read_state_dict(str(path)).stripped_prefixes == {
      part: len(expected) for part in parts}
  for part in parts:
    assert f"Stripped prefix {part!r} from {len(expected)} keys" in caplog.text
  np.testing.assert_array_equal(variables["params"]["layer1_0"]["conv1"]["kernel"],
                                expected["layer1.0.conv1.weight"].numpy().transpose(2, 3, 1, 0))


def test_prefixes_of_a_whole_wrapper_are_kept(tmp_path, resnet18):
  """An smp U-Net's encoder.* beside decoder.* is the whole model: read as smp, unstripped."""
  state = {**publishers.prefixed("encoder.", publishers.resnet_backbone(resnet18)),
           "decoder.blocks.0.conv1.0.weight": torch.randn(8, 4, 3, 3),
           "segmentation_head.0.weight": torch.randn(1, 8, 3, 3)}
  torch.save(state, tmp_path / "unet.pth")
  normalised = weights.read_state_dict(str(tmp_path / "unet.pth"))
  assert normalised.format == "smp"
  assert normalised.stripped_prefixes == {}
  assert sorted(normalised.state_dict) == sorted(state)


def test_beit_is_refused_with_the_reason(tmp_path):
  state = {"cls_token": torch.zeros(1, 1, 8), "blocks.0.gamma_1": torch.ones(8),
           "rel_pos_bias.relative_position_bias_table": torch.zeros(10, 2)}
  torch.save({"model": state}, tmp_path / "beit.pth")
  with pytest.raises(ValueError, match="BEiT checkpoints need relative position biases"):
    weights.read_state_dict(str(tmp_path / "beit.pth"))


# --- BYOL: the Haiku pickle ---------------------------------------------------------------

def test_byol_haiku_pickle(tmp_path):
  model = _resnet("resnet50")
  path = str(tmp_path / "pretrain_res50x1.pkl")
  publishers.byol_pickle(model, path)
  normalised = weights.read_state_dict(path)
  assert normalised.format == "byol"
  assert set(normalised.ignored_entries) == {
      "step", "rng", "experiment_state.target_params", "experiment_state.target_state",
      "experiment_state.opt_state"}
  assert all(k.startswith(("projector/", "predictor/")) or k.endswith(("/hidden", "/counter"))
             for k in normalised.dropped)
  assert sorted(normalised.state_dict) == sorted(
      k for k in model.state_dict() if not k.endswith("num_batches_tracked"))
  # The online linear classifier becomes the head: logits agree.
  diff = parity.forward_max_diff("resnet50", model, path, torch.randn(2, 3, SIZE, SIZE),
                                 num_classes=K)
  assert diff <= 1e-4, diff


class _Exploit:
  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def _assert_refused_without_running(path, marker: str) -> None:
  try:
    with pytest.raises(weights.UnsafeCheckpointError, match=re.escape(path.name)):
      weights.load("resnet18", str(path), num_classes=K)
    assert not os.path.exists(marker)
  finally:
    if os.path.exists(marker):
      os.remove(marker)


@pytest.mark.parametrize("payload", ["global", "object_array"])
def test_malicious_haiku_pickle_is_refused_without_running(tmp_path, payload):
  marker = f"/tmp/pwned_{uuid.uuid4().hex}"
  exploit = _Exploit(f"touch {marker}")
  obj = exploit if payload == "global" else np.array([exploit, 1], dtype=object)
  path = tmp_path / "evil.pkl"
  with open(path, "wb") as f:
    pickle.dump({"experiment_state": obj, "step": 1}, f, protocol=2)
  _assert_refused_without_running(path, marker)


@pytest.mark.parametrize("legacy,payload", [(True, "global"), (True, "object_array"),
                                            (False, "object_array")])
def test_malicious_torch_checkpoint_is_refused_without_running(tmp_path, resnet18, legacy,
                                                               payload):
  """The paths added for publishers' files: legacy serialisation, numpy values."""
  marker = f"/tmp/pwned_{uuid.uuid4().hex}"
  exploit = _Exploit(f"touch {marker}")
  payload = dict(publishers.resnet_backbone(resnet18), **{
      "fc.weight": exploit if payload == "global" else np.array([exploit, 1], dtype=object)})
  path = tmp_path / "evil.pth.tar"
  torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
  _assert_refused_without_running(path, marker)


# --- self-supervised ViTs ---------------------------------------------------------------

VIT, VIT_SIZE = "vit_small_patch32_224", 64


def _unit_scale(model: torch.nn.Module) -> torch.nn.Module:
  """`model` in eval mode with its weights redrawn at unit scale, so that every block moves
  the output (timm's std 0.02 init leaves transformer residual branches near zero)."""
  with torch.no_grad():
    for key, p in model.named_parameters():
      if "norm" in key:
        p.uniform_(0.5, 1.5) if key.endswith("weight") else p.normal_(0, 0.1)
      elif p.ndim == 1:
        p.normal_(0, 0.1)
      else:
        p.normal_(0, p[0].numel()**-0.5 if p.ndim > 1 and key not in ("cls_token", "pos_embed")
                  else 0.5)
  return model.eval()


def _vit(global_pool: str = "token") -> torch.nn.Module:
  """Random-init timm ViT (pooled features) at unit scale."""
  torch.manual_seed(0)
  return _unit_scale(timm.create_model(VIT, pretrained=False, num_classes=0,
                                       img_size=VIT_SIZE, global_pool=global_pool))


VIT_CASES = [
    ("dino_vit", publishers.dino_vit, "dino", "token"),
    ("mocov3_vit", publishers.mocov3, "mocov3", "token"),
    ("mae_pretrain", publishers.mae, "mae", "token"),
    # MAE's fine-tuned global-pool encoders: fc_norm instead of norm (timm global_pool="avg").
    ("mae_global_pool", lambda b: ({"model": b}, []), "plain", "avg"),
]


@pytest.mark.parametrize("case,build,fmt,pool", VIT_CASES, ids=[c[0] for c in VIT_CASES])
def test_ssl_vit_formats(tmp_path, case, build, fmt, pool):
  reference = _vit(pool)
  backbone = reference.state_dict()
  ckpt, dropped = build(backbone)
  path = str(tmp_path / f"{case}.pth")
  torch.save(ckpt, path)
  normalised = weights.read_state_dict(path)
  assert normalised.format == fmt
  assert sorted(normalised.dropped) == sorted(dropped)
  assert sorted(normalised.state_dict) == sorted(backbone)
  for k, v in backbone.items():
    np.testing.assert_array_equal(normalised.state_dict[k], v.numpy(), err_msg=k)
  diff = parity.forward_max_diff(VIT, reference, path, torch.randn(2, 3, VIT_SIZE, VIT_SIZE),
                                 num_classes=0, img_size=VIT_SIZE, global_pool=pool)
  assert diff <= 1e-4, f"{case}: max |diff| {diff}"


def test_mae_pretrain_into_global_pool_vit(tmp_path, caplog):
  """MAE's global-pool fine-tuning (main_finetune.py --global_pool) builds fc_norm fresh and
  deletes the encoder's final norm: so does loading its pretraining checkpoint here, logged."""
  token = _vit("token")
  ckpt, _ = publishers.mae(token.state_dict())
  path = str(tmp_path / "mae_pretrain_vit_small.pth")
  torch.save(ckpt, path)
  dim = token.embed_dim
  reference = timm.create_model(VIT, pretrained=False, num_classes=0, img_size=VIT_SIZE,
                                global_pool="avg").eval()
  reference.load_state_dict({**{k: v for k, v in token.state_dict().items()
                                if not k.startswith("norm.")},
                             "fc_norm.weight": torch.ones(dim), "fc_norm.bias": torch.zeros(dim)})
  with caplog.at_level(logging.INFO):
    variables, report = weights.load_with_report(VIT, path, num_classes=K, img_size=VIT_SIZE,
                                                 global_pool="avg")
  assert set(report.reinitialised) == {"params/head/kernel", "params/head/bias",
                                       "params/fc_norm/scale", "params/fc_norm/bias"}
  assert {"params/norm/scale", "params/norm/bias"} <= set(report.dropped)
  np.testing.assert_array_equal(variables["params"]["fc_norm"]["scale"], np.ones(dim))
  np.testing.assert_array_equal(variables["params"]["fc_norm"]["bias"], np.zeros(dim))
  assert re.search(r"Freshly initialised .*mae.*params/fc_norm/bias", caplog.text)
  assert re.search(r"Dropped from the checkpoint \(not used by this model \(mae .*params/norm/bias",
                   caplog.text)
  diff = parity.forward_max_diff(VIT, reference, path, torch.randn(2, 3, VIT_SIZE, VIT_SIZE),
                                 num_classes=0, img_size=VIT_SIZE, global_pool="avg")
  assert diff <= 1e-4, diff


# --- SimMIM -------------------------------------------------------------------------------

SWIN_DEMO = dict(embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))


def _save_simmim(ckpt: dict, path) -> str:
  with publishers.fake_modules(publishers.YACS):
    torch.save(ckpt, path)
  return str(path)


@pytest.fixture
def simmim_interp2d(monkeypatch):
  """SimMIM's loader (utils.remap_pretrained_keys_swin) resizes bias tables with scipy's
  interp2d(kind='cubic'), removed in SciPy 1.14; timm's resize_rel_pos_bias_table, the same
  code (from BEiT), still calls it when TIMM_USE_SCIPY_INTERP is set. On a regular grid
  RectBivariateSpline is interp2d's exact replacement (scipy's interp2d transition guide)."""
  def interp2d(x, y, z, kind):
    assert kind == "cubic"
    spline = interpolate.RectBivariateSpline(np.asarray(x, float), np.asarray(y, float),
                                             np.asarray(z).T, kx=3, ky=3, s=0)
    return lambda x_new, y_new: spline(np.asarray(x_new, float), np.asarray(y_new, float)).T
  monkeypatch.setattr(interpolate, "interp2d", interp2d, raising=False)
  monkeypatch.setattr(pos_embed_rel, "_USE_SCIPY", True)


def test_simmim_swin(tmp_path, simmim_interp2d):
  """SimMIM pretrains Swin at a smaller window than it fine-tunes (192 px window 6 -> 224 px
  window 7); here 96 px window 3 -> swin_demo_patch4_window4_128 (128 px, window 4)."""
  torch.manual_seed(0)
  pretrained = _unit_scale(TimmSwin(num_classes=0, img_size=96, window_size=3, **SWIN_DEMO))
  ckpt, dropped = publishers.simmim_swin(pretrained)
  path = _save_simmim(ckpt, tmp_path / "simmim_pretrain__swin_demo__img96_window3.pth")
  normalised = weights.read_state_dict(path)
  assert normalised.format == "simmim"
  assert sorted(normalised.dropped) == sorted(dropped)
  assert set(normalised.ignored_entries) == {"optimizer", "lr_scheduler", "max_accuracy",
                                             "epoch", "config"}

  # The fine-tuning model loaded as SimMIM's loader does it (encoder.* without the prefix,
  # tables resized, buffers remade), through timm's filter, which runs the same resize.
  reference = TimmSwin(num_classes=0, img_size=128, window_size=4, **SWIN_DEMO).eval()
  encoder = {k[len("encoder."):]: v for k, v in ckpt["model"].items()
             if k.startswith("encoder.") and k != "encoder.mask_token"}
  reference.load_state_dict(swin_transformer.checkpoint_filter_fn(encoder, reference))
  diff = parity.forward_max_diff("swin_demo_patch4_window4_128", reference, path,
                                 torch.randn(2, 3, 128, 128), num_classes=0)
  print(f"SimMIM Swin, window 3 -> 4: max |feature diff| {diff:.2e}")
  assert diff <= 1e-4, diff
  # timm's default (linear) resize would give another model: the comparison tells them apart.
  key = "layers.2.blocks.1.attn.relative_position_bias_table"
  linear = swin.resize_relative_position_bias_table(encoder[key].numpy(), (4, 4), "linear")
  assert np.abs(linear - reference.state_dict()[key].numpy()).max() > 1e-2


def test_simmim_swin_into_another_architecture_fails_clearly(tmp_path):
  torch.manual_seed(0)
  ckpt, _ = publishers.simmim_swin(TimmSwin(num_classes=0, img_size=96, window_size=3,
                                            **SWIN_DEMO))
  path = _save_simmim(ckpt, tmp_path / "simmim_pretrain__swin.pth")
  with pytest.raises(ValueError, match=r"simmim checkpoints are converted with .*"
                     r"table_interpolation.*converter of resnet18 does not take"):
    weights.load("resnet18", path, num_classes=K)


def _vit_without_k_bias() -> torch.nn.Module:
  """_vit() as SimMIM's BEiT-style attention computes it: no k bias."""
  model = _vit()
  with torch.no_grad():
    for block in model.blocks:
      block.attn.qkv.bias[model.embed_dim:2 * model.embed_dim] = 0
  return model


def test_simmim_vit_fuses_q_and_v_biases(tmp_path):
  """SimMIM's ViT configured as timm's (USE_APE, no relative position bias or layer scale)."""
  reference = _vit_without_k_bias()
  ckpt, dropped = publishers.simmim_vit(reference.state_dict(), patch_size=32)
  path = _save_simmim(ckpt, tmp_path / "simmim_pretrain__vit_small.pth")
  normalised = weights.read_state_dict(path)
  assert normalised.format == "simmim_vit"
  assert sorted(normalised.dropped) == sorted(dropped)
  assert normalised.renamed["blocks.3.attn.v_bias"] == "blocks.3.attn.qkv.bias"
  assert sorted(normalised.state_dict) == sorted(reference.state_dict())
  for k, v in reference.state_dict().items():
    np.testing.assert_array_equal(normalised.state_dict[k], v.numpy(), err_msg=k)
  diff = parity.forward_max_diff(VIT, reference, path, torch.randn(2, 3, VIT_SIZE, VIT_SIZE),
                                 num_classes=0, img_size=VIT_SIZE)
  assert diff <= 1e-4, diff


@pytest.mark.parametrize("rel_pos_bias,layer_scale,reason", [
    ("shared", True, "relative position biases"),  # SimMIM's published ViT-B
    ("per_block", False, "relative position biases"),
    ("", True, "layer scale"),
])
def test_simmim_vit_variants_ours_lacks_are_refused(tmp_path, rel_pos_bias, layer_scale,
                                                    reason):
  backbone = _vit_without_k_bias().state_dict()
  ckpt, _ = publishers.simmim_vit(backbone, 32, rel_pos_bias, layer_scale)
  path = _save_simmim(ckpt, tmp_path / "simmim_pretrain__vit.pth")
  with pytest.raises(ValueError, match=rf"(?s)simmim_vit.*{reason}"):
    weights.load(VIT, path, num_classes=K, img_size=VIT_SIZE)


# --- RadImageNet --------------------------------------------------------------------------

@pytest.mark.parametrize("name,arch", [
    ("resnet50", {}),
    # The same layout with two layers per dense block: the full forward is slow to compile.
    ("densenet121", {"block_config": (2, 2, 2, 2)}),
    pytest.param("densenet121", {}, marks=pytest.mark.slow),
])
def test_radimagenet(tmp_path, name, arch):
  torch.manual_seed(0)
  # torchvision's DenseNet class defaults to densenet121's configuration.
  model = torchvision.models.DenseNet(**arch) if arch else torchvision.models.get_model(name)
  model = parity.calibrate_batch_norm(model, 64, lambda module: module.endswith("bn3"))
  path = tmp_path / f"RadImageNet-{name}.pt"
  torch.save(publishers.radimagenet(model), path)
  normalised = weights.read_state_dict(str(path))
  assert normalised.format == "radimagenet"
  head = "fc." if name.startswith("resnet") else "classifier."
  expected = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
  assert sorted(normalised.state_dict) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(normalised.state_dict[k], v.numpy(), err_msg=k)
  assert not normalised.dropped
  features = copy.deepcopy(model)
  setattr(features, head[:-1], torch.nn.Identity())
  diff = parity.forward_max_diff(name, features, str(path), torch.randn(2, 3, 64, 64),
                                 num_classes=0, **arch)
  print(f"RadImageNet {name} {arch}: max |feature diff| {diff:.2e}")
  assert diff <= 1e-4, diff
