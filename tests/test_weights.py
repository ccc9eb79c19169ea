"""Checkpoint loading: forward parity with the PyTorch references, head reset and its
initialisation per architecture, wrappers, architecture mismatches and refusal of
malicious pickles."""

import logging
import os
import pickle
import uuid
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import scipy.stats
import timm
from timm.models.swin_transformer import SwinTransformer as TimmSwin
import torch
import torchvision

from medbench_jax import models
from medbench_jax import weights
from medbench_jax.weights import torch_pickle
from tests import parity

K = 5
DEMO = "swin_demo_patch4_window4_128"
DEMO_ARCH = dict(img_size=128, window_size=4, embed_dim=48, depths=(2, 2, 2, 2),
                 num_heads=(2, 4, 8, 16))


def _torch_model(name: str, size: int, source: str = "timm", **kw) -> torch.nn.Module:
  """Random-init reference in eval mode, BatchNorm calibrated (see parity.calibrate_batch_norm)."""
  torch.manual_seed(0)
  if source == "torchvision":
    model = torchvision.models.get_model(name, num_classes=K, **kw)
  elif name == DEMO:
    model = TimmSwin(num_classes=K, **{**DEMO_ARCH, "img_size": size, **kw})
  else:
    kw = {"img_size": size, **kw} if name.startswith("swin") else kw
    model = timm.create_model(name, pretrained=False, num_classes=K, **kw)
  last_bn = "bn2" if name in ("resnet18", "resnet34") else "bn3"
  return parity.calibrate_batch_norm(model, size, lambda module: module.endswith(last_bn))


def _logits(name: str, variables, x_nchw: torch.Tensor, **model_kw) -> np.ndarray:
  model = models.create(name, K, **model_kw)
  x = jnp.asarray(x_nchw.numpy().transpose(0, 2, 3, 1))
  return np.asarray(jax.jit(model.apply)(variables, x))


PARITY = [
    ("resnet18", 64, "timm"),
    ("resnet34", 64, "timm"),
    ("resnet50", 64, "timm"),
    ("resnet50", 64, "torchvision"),
    pytest.param("resnet101", 64, "timm", marks=pytest.mark.slow),
    pytest.param("resnet152", 64, "timm", marks=pytest.mark.slow),
    (DEMO, 128, "timm"),
    # 96 px: stage grids 24, 12, 6, 3 exercise padding to whole windows and a clamped window.
    (DEMO, 96, "timm"),
    ("swin_tiny_patch4_window7_224", 112, "timm"),
    pytest.param("swin_tiny_patch4_window7_224", 224, "timm", marks=pytest.mark.slow),
    pytest.param("swin_small_patch4_window7_224", 112, "timm", marks=pytest.mark.slow),
    pytest.param("swin_base_patch4_window7_224", 112, "timm", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,size,source", PARITY)
def test_forward_parity_with_pytorch(tmp_path, name, size, source):
  reference = _torch_model(name, size, source)
  x = torch.randn(2, 3, size, size)
  with torch.no_grad():
    expected = reference(x).numpy()
  state_dict = reference.state_dict()
  torch.save(state_dict, tmp_path / "model.pth")
  safetensors.torch.save_file(state_dict, tmp_path / "model.safetensors")
  model_kw = {"img_size": size} if name.startswith("swin") else {}
  for file in ("model.pth", "model.safetensors"):
    variables = weights.load(name, str(tmp_path / file), num_classes=K, keep_head=True,
                             **model_kw)
    diff = np.abs(_logits(name, variables, x, **model_kw) - expected).max()
    assert diff <= 1e-4, f"{name} {source} {file} at {size}px: max |diff| {diff}"


@pytest.mark.parametrize("name,size,source,float64", [
    ("resnet18", 64, "timm", False), ("resnet18", 64, "torchvision", True),
    pytest.param("resnet50", 64, "torchvision", True, marks=pytest.mark.slow),
    (DEMO, 96, "timm", False)])
def test_sgd_steps_in_train_mode_match_pytorch(tmp_path, name, size, source, float64):
  """Train-mode semantics (BatchNorm batch statistics and torch's unbiased running variance,
  gradients through every layer), not just inference."""
  model_kw = {"img_size": size, "drop_path_rate": 0.0} if name == DEMO else {}
  reference = _torch_model(name, size, source, **({"drop_path_rate": 0.0} if name == DEMO else {}))
  rel, update_err = parity.sgd_steps_max_rel_diff(
      name, reference, tmp_path, torch.randn(4, 3, size, size), K, float64=float64, **model_kw)
  assert rel <= 1e-4 and update_err <= 1e-3, (rel, update_err)


@pytest.fixture(scope="module")
def resnet18_checkpoint(tmp_path_factory):
  """A resnet18 state dict (as numpy) with a 3-class head, saved as .pth."""
  model = timm.create_model("resnet18", pretrained=False, num_classes=3)
  path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
  torch.save(model.state_dict(), path)
  return str(path), {k: v.numpy() for k, v in model.state_dict().items()}


def test_head_reset_unless_keep_head(resnet18_checkpoint):
  path, state_dict = resnet18_checkpoint
  variables = weights.load("resnet18", path, num_classes=7, seed=3)
  head = variables["params"]["fc"]
  assert head["kernel"].shape == (512, 7) and head["bias"].shape == (7,)
  assert np.all(np.asarray(head["bias"]) == 0)
  assert 0.009 < float(jnp.std(head["kernel"])) < 0.011  # normal(std=0.01), 3584 draws
  # Everything else is the checkpoint, converted.
  np.testing.assert_array_equal(variables["params"]["layer1_0"]["conv1"]["kernel"],
                                state_dict["layer1.0.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"],
                                state_dict["bn1.running_var"])
  kept = weights.load("resnet18", path, num_classes=3, keep_head=True)
  np.testing.assert_array_equal(kept["params"]["fc"]["kernel"], state_dict["fc.weight"].T)
  features = weights.load("resnet18", path, num_classes=0)
  assert "fc" not in features["params"]


# What the reference study's code draws a fresh head from, per family: N(0, 0.01) for
# ResNet/DenseNet (its models.py), timm's trunc_normal_(std=.02), cut at absolute +-2, for
# ConvNeXt (timm), Swin (Microsoft's _init_weights) and ViT (timm); zero bias throughout.
_NORMAL = scipy.stats.norm(scale=0.01)
_TRUNC_NORMAL = scipy.stats.truncnorm(-2 / 0.02, 2 / 0.02, scale=0.02)
HEAD_INITS = [
    ("resnet18", {}, lambda: timm.create_model("resnet18", num_classes=3), _NORMAL, _TRUNC_NORMAL),
    ("densenet121", {"block_config": (2, 2, 2, 2)},
     lambda: torchvision.models.DenseNet(block_config=(2, 2, 2, 2), num_classes=3), _NORMAL,
     _TRUNC_NORMAL),
    ("convnext_tiny", {}, lambda: timm.create_model("convnext_tiny", num_classes=3),
     _TRUNC_NORMAL, _NORMAL),
    ("vit_small_patch32_224", {"img_size": 64},
     lambda: timm.create_model("vit_small_patch32_224", img_size=64, num_classes=3),
     _TRUNC_NORMAL, _NORMAL),
    (DEMO, {}, lambda: TimmSwin(num_classes=3, **DEMO_ARCH), _TRUNC_NORMAL, _NORMAL),
]


@pytest.mark.parametrize("name,model_kw,build,expected,other", HEAD_INITS,
                         ids=[c[0] for c in HEAD_INITS])
def test_fresh_head_follows_the_family_init(tmp_path, caplog, name, model_kw, build, expected,
                                            other):
  """The kernel's draws pass a Kolmogorov-Smirnov test against the family's distribution
  and fail it against the other family's; the log names the init."""
  torch.save(build().state_dict(), tmp_path / "model.pth")
  with caplog.at_level(logging.INFO):
    variables = weights.load(name, str(tmp_path / "model.pth"), num_classes=20, seed=1,
                             **model_kw)
  head = variables["params"]
  for part in models.pretrained_cfg(name)["classifier"].split("/"):
    head = head[part]
  kernel = np.asarray(head["kernel"]).ravel()
  assert np.all(np.asarray(head["bias"]) == 0)
  fit, misfit = scipy.stats.kstest(kernel, expected.cdf), scipy.stats.kstest(kernel, other.cdf)
  print(f"{name}: {kernel.size} draws, std {kernel.std():.4f}, KS p {fit.pvalue:.3f} "
        f"(other family's: {misfit.pvalue:.1e})")
  assert fit.pvalue > 1e-3 and misfit.pvalue < 1e-6, (fit, misfit)
  head_init = models.pretrained_cfg(name)["head_init"]
  assert f"Re-initialised the classifier ({head_init}, seed 1) for 20 classes" in caplog.text


def test_keep_head_with_other_class_count_names_the_mismatch(resnet18_checkpoint):
  path, _ = resnet18_checkpoint
  with pytest.raises(ValueError, match=r"params/fc/kernel \(512, 3\) vs \(512, 7\)"):
    weights.load("resnet18", path, num_classes=7, keep_head=True)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrappers_and_ddp_prefix_are_stripped(tmp_path, resnet18_checkpoint, wrapper):
  path, state_dict = resnet18_checkpoint
  wrapped = tmp_path / "wrapped.pth"
  torch.save({wrapper: {f"module.{k}": torch.from_numpy(v) for k, v in state_dict.items()},
              "epoch": 90, "args": ["--lr", 0.1]}, wrapped)
  expected = weights.load("resnet18", path, num_classes=3, keep_head=True)
  got = weights.load("resnet18", str(wrapped), num_classes=3, keep_head=True)
  jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_npz_and_bf16_checkpoints(tmp_path, resnet18_checkpoint):
  path, state_dict = resnet18_checkpoint
  expected = weights.load("resnet18", path, num_classes=3, keep_head=True)
  np.savez(tmp_path / "model.npz", **state_dict)
  got = weights.load("resnet18", str(tmp_path / "model.npz"), num_classes=3, keep_head=True)
  jax.tree.map(np.testing.assert_array_equal, got, expected)

  bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) if v.dtype == np.float32 else
          torch.from_numpy(v) for k, v in state_dict.items()}
  torch.save(bf16, tmp_path / "bf16.pth")
  safetensors.torch.save_file(bf16, tmp_path / "bf16.safetensors")
  rounded = bf16["layer2.0.conv2.weight"].float().numpy().transpose(2, 3, 1, 0)
  for file in ("bf16.pth", "bf16.safetensors"):
    got = weights.load("resnet18", str(tmp_path / file), num_classes=3, keep_head=True)
    kernel = got["params"]["layer2_0"]["conv2"]["kernel"]
    assert kernel.dtype == jnp.float32
    np.testing.assert_array_equal(kernel, rounded)


def test_wrong_architecture_names_keys_and_shapes(resnet18_checkpoint):
  path, _ = resnet18_checkpoint
  with pytest.raises(ValueError) as err:
    weights.load("resnet50", path, num_classes=3)
  message = str(err.value)
  assert path in message
  assert "missing in the checkpoint" in message
  assert "params/layer1_0/conv3/kernel (1, 1, 64, 256)" in message
  assert "shape mismatches" in message
  assert "params/layer2_0/conv1/kernel (3, 3, 64, 128) vs (1, 1, 256, 128)" in message
  with pytest.raises(ValueError, match=r"unexpected in the checkpoint(.|\n)*params/layer1_2"):
    weights.load("resnet18", _resnet34_path(path), num_classes=3)


def _resnet34_path(resnet18_path: str) -> str:
  path = os.path.join(os.path.dirname(resnet18_path), "resnet34.pth")
  if not os.path.exists(path):
    torch.save(timm.create_model("resnet34", num_classes=3).state_dict(), path)
  return path


class _Exploit:
  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


class _EvalExploit(_Exploit):
  def __reduce__(self):
    return eval, (f"__import__('os').system({self.command!r})",)


@pytest.mark.parametrize("exploit", [_Exploit, _EvalExploit])
def test_malicious_pickle_is_refused_without_running(tmp_path, resnet18_checkpoint, exploit):
  _, state_dict = resnet18_checkpoint
  marker = f"/tmp/pwned_{uuid.uuid4().hex}"
  payload = {k: torch.from_numpy(v) for k, v in state_dict.items()}
  payload["fc.weight"] = exploit(f"touch {marker}")  # pickled, never called, by torch.save
  path = tmp_path / "evil.pth"
  torch.save(payload, path)
  try:
    with pytest.raises(weights.UnsafeCheckpointError, match=r"evil\.pth(.|\n)*(system|eval)"):
      weights.load("resnet18", str(path), num_classes=3)
    with pytest.raises(torch_pickle.UnsafeCheckpointError):
      torch_pickle.load(str(path))
    assert not os.path.exists(marker)
  finally:
    if os.path.exists(marker):
      os.remove(marker)


def test_out_of_bounds_strides_are_refused(tmp_path):
  """A crafted stride must not make the reader copy memory beyond the storage."""
  # torch cannot build such a tensor: save a valid 2x2 one, then enlarge its recorded size.
  torch.save({"w": torch.zeros(2, 2)}, tmp_path / "ok.pth")
  with zipfile.ZipFile(tmp_path / "ok.pth") as src, \
       zipfile.ZipFile(tmp_path / "bad.pth", "w") as dst:
    for item in src.infolist():
      data = src.read(item.filename)
      if item.filename.endswith("data.pkl"):
        data = data.replace(b"K\x02K\x02\x86", b"K\x40K\x40\x86", 1)  # size (2, 2) -> (64, 64)
      dst.writestr(item, data)
  with pytest.raises(pickle.UnpicklingError, match="exceeds its storage"):
    torch_pickle.load(str(tmp_path / "bad.pth"))
