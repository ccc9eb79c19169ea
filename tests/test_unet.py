"""U-Net (models/unet.py) against segmentation_models_pytorch 0.6: forward parity per encoder
family (random init, eval mode, loaded through weights.load from smp state dicts), train-mode
SGD steps, encoder-only checkpoints from every source, and checkpoints that do not fit."""

import re

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch

from medbench_jax import convert
from medbench_jax import models
from medbench_jax import weights
from tests import parity
from tests.test_models import _init as _random_variables
from tests.test_weight_sources import _save_trial

K = 3


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


def _smp_unet(encoder: str, size: int, **kw) -> torch.nn.Module:
  """Random-init smp Unet in eval mode with trained-like values (parity.trained_like),
  BatchNorm calibrated, the residual branches' last BN gammas kept small as in trained nets
  (parity.calibrate_batch_norm)."""
  torch.manual_seed(0)
  model = parity.trained_like(smp.Unet(encoder, encoder_weights=None, classes=K, **kw))
  return parity.calibrate_batch_norm(
      model, size, lambda name: re.search(r"^encoder\.(model\.)?layer\d\.\d+\.bn[23]$", name))


PARITY = [
    ("unet_resnet18", "resnet18", 64),
    # 72 px is no multiple of 32: maps of 36, 18, 9, 5, 3 px, nearest upsampling 3 -> 5 -> 9.
    ("unet_resnet18", "resnet18", 72),
    ("unet_resnet18", "tu-resnet18", 64),
    ("unet_resnet50", "resnet50", 64),
    ("unet_densenet121", "densenet121", 64),
    ("unet_convnext_tiny", "tu-convnext_tiny", 64),
    pytest.param("unet_resnet50", "resnet50", 224, marks=pytest.mark.slow),
    pytest.param("unet_resnet34", "resnet34", 64, marks=pytest.mark.slow),
    pytest.param("unet_resnet101", "resnet101", 64, marks=pytest.mark.slow),
    pytest.param("unet_resnet152", "resnet152", 64, marks=pytest.mark.slow),
    pytest.param("unet_densenet161", "densenet161", 64, marks=pytest.mark.slow),
    pytest.param("unet_densenet169", "densenet169", 64, marks=pytest.mark.slow),
    pytest.param("unet_densenet201", "densenet201", 64, marks=pytest.mark.slow),
    pytest.param("unet_densenet121", "densenet121", 224, marks=pytest.mark.slow),
    pytest.param("unet_convnext_small", "tu-convnext_small", 64, marks=pytest.mark.slow),
    pytest.param("unet_convnext_base", "tu-convnext_base", 64, marks=pytest.mark.slow),
    pytest.param("unet_convnext_large", "tu-convnext_large", 64, marks=pytest.mark.slow),
    pytest.param("unet_convnext_tiny", "tu-convnext_tiny", 224, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,encoder,size", PARITY)
def test_forward_parity_with_smp(tmp_path, name, encoder, size):
  reference = _smp_unet(encoder, size)
  torch.save(reference.state_dict(), tmp_path / "unet.pth")
  x = torch.randn(2, 3, size, size)
  diff = parity.forward_max_diff(name, reference, str(tmp_path / "unet.pth"), x, K)
  print(f"{name} vs smp.Unet({encoder!r}) at {size}px: max |diff| {diff:.2e}")
  assert diff <= 1e-4, diff

  variables = weights.load(name, str(tmp_path / "unet.pth"), K, keep_head=True)
  assert (sum(v.size for v in jax.tree.leaves(variables["params"]))
          == sum(p.numel() for p in reference.parameters()))


def test_registered_for_every_encoder_of_each_family():
  names = set(models.list_models())
  for encoder in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "densenet121",
                  "densenet161", "densenet169", "densenet201", "convnext_tiny",
                  "convnext_small", "convnext_base", "convnext_large"):
    assert f"unet_{encoder}" in names
    cfg = models.pretrained_cfg(f"unet_{encoder}")
    assert cfg["encoder"] == encoder and cfg["mean"] == models.pretrained_cfg(encoder)["mean"]
  assert not any(n.startswith("unet_") for n in names
                 if n[len("unet_"):].startswith(("swin", "vit", "resnet50x")))


def test_sgd_steps_in_train_mode_match_smp(tmp_path):
  """BatchNorm batch statistics and torch's running-variance update in encoder and decoder,
  gradients through skips and upsampling: two SGD steps with a per-pixel BCE loss."""
  reference = _smp_unet("resnet18", 64)
  rel, update_err = parity.sgd_steps_max_rel_diff(
      "unet_resnet18", reference, tmp_path, torch.randn(2, 3, 64, 64), K, float64=True)
  print(f"unet_resnet18 at 64px, 2 SGD steps: max rel diff {rel:.2e}, update error "
        f"{update_err:.2e}")
  assert rel <= 1e-4 and update_err <= 1e-3, (rel, update_err)


@pytest.fixture(scope="module")
def resnet18_classifier(tmp_path_factory):
  """A timm resnet18 classification checkpoint (1000 classes) and its variables as a
  classification model of this package loads them."""
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
  torch.save(timm.create_model("resnet18", num_classes=1000).state_dict(), path)
  return str(path), weights.load("resnet18", str(path), 1000, keep_head=True)


def _assert_encoder_only_load(variables, report, classifier) -> None:
  """The encoder is the classifier's backbone exactly; everything else starts fresh."""
  flat, expected = _flat(variables), _flat(classifier)
  encoder = {k for k in flat if k.split("/")[1] == "encoder"}
  assert {k.replace("/encoder", "", 1) for k in encoder} == {
      k for k in expected if not k.startswith("params/fc/")}
  for key in encoder:
    np.testing.assert_array_equal(flat[key], expected[key.replace("/encoder", "", 1)])
  assert set(report.reinitialised) == set(flat) - encoder
  assert {k.split("/")[1] for k in report.reinitialised} == {"decoder", "segmentation_head_0"}


def test_encoder_checkpoint_fills_exactly_the_encoder(resnet18_classifier):
  """The decoder and head start as smp's initialize_decoder/initialize_head draw them:
  kaiming-uniform convs, unit BatchNorm, xavier-uniform head with zero bias."""
  path, classifier = resnet18_classifier
  variables, report = weights.load_with_report("unet_resnet18", path, num_classes=K, seed=4)
  _assert_encoder_only_load(variables, report, classifier)
  assert set(report.dropped) == {"params/encoder/fc/kernel", "params/encoder/fc/bias"}
  assert all("classifier" in reason for reason in report.dropped_reason.values())

  flat = _flat(variables)
  torch.manual_seed(0)
  reference = smp.Unet("resnet18", encoder_weights=None, classes=K).state_dict()
  reference = _flat(models.converter("unet_resnet18")(
      {k: v.numpy() for k, v in reference.items()}))
  assert set(report.reinitialised) == {k for k in reference if k.split("/")[1] != "encoder"}
  for key in report.reinitialised:
    ours, theirs = np.asarray(flat[key]), reference[key]
    assert ours.shape == theirs.shape, key
    if theirs.ndim == 4 and theirs.size >= 4096:
      assert abs(ours.std() / theirs.std() - 1) < 0.1, key
      assert np.abs(ours).max() <= np.abs(theirs).max() * 1.01, key
    elif theirs.ndim == 1:
      np.testing.assert_array_equal(ours, theirs, err_msg=key)

  with pytest.raises(ValueError, match=r"(?s)missing in the checkpoint.*segmentation_head_0"):
    weights.load("unet_resnet18", path, num_classes=K, keep_head=True)


def test_encoder_from_a_convert_folder_and_a_run(tmp_path, resnet18_classifier):
  path, classifier = resnet18_classifier
  convert.convert("resnet18", path, str(tmp_path / "converted"))
  variables, report = weights.load_with_report("unet_resnet18", str(tmp_path / "converted"),
                                               num_classes=2)
  _assert_encoder_only_load(variables, report, classifier)

  # Grayscale input: the encoder's first conv is adapted as for classification.
  _save_trial(tmp_path / "run", 0, classifier, best_val_loss=0.1)
  variables, report = weights.load_with_report("unet_resnet18", f"run:{tmp_path / 'run'}",
                                               num_classes=2, seed=1, in_chans=1)
  stem = np.asarray(classifier["params"]["conv1"]["kernel"])
  gray = {**classifier, "params": {**classifier["params"],
                                   "conv1": {"kernel": stem.sum(axis=2, keepdims=True)}}}
  _assert_encoder_only_load(variables, report, gray)


def test_whole_checkpoint_resets_only_the_head_and_drops_smp_aux_head(tmp_path):
  """smp's aux_params classification head has no counterpart: dropped by the smp format."""
  torch.manual_seed(0)
  reference = smp.Unet("resnet18", encoder_weights=None, classes=K,
                       aux_params={"classes": 4})
  torch.save({"state_dict": reference.state_dict()}, tmp_path / "unet.pth")
  variables, report = weights.load_with_report("unet_resnet18", str(tmp_path / "unet.pth"), 5)
  assert report.format == "smp"
  assert set(report.reinitialised) == {"params/segmentation_head_0/kernel",
                                       "params/segmentation_head_0/bias"}
  assert set(report.dropped) == {"classification_head.3.weight", "classification_head.3.bias",
                                 "params/segmentation_head_0/kernel",
                                 "params/segmentation_head_0/bias"}
  np.testing.assert_array_equal(
      variables["params"]["decoder"]["blocks_4"]["conv2_0"]["kernel"],
      reference.state_dict()["decoder.blocks.4.conv2.0.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      variables["batch_stats"]["encoder"]["layer4_1"]["bn2"]["var"],
      reference.state_dict()["encoder.layer4.1.bn2.running_var"].numpy())
  with pytest.raises(ValueError, match=r"segmentation_head_0/kernel \(3, 3, 16, 3\) vs "
                     r"\(3, 3, 16, 5\)"):
    weights.load("unet_resnet18", str(tmp_path / "unet.pth"), 5, keep_head=True)


def test_checkpoints_that_do_not_fit_name_the_keys(tmp_path):
  torch.manual_seed(0)
  torch.save(timm.create_model("resnet34").state_dict(), tmp_path / "resnet34.pth")
  with pytest.raises(ValueError) as err:
    weights.load("unet_resnet18", str(tmp_path / "resnet34.pth"), 2)
  assert "unexpected in the checkpoint" in str(err.value)
  assert "params/encoder/layer1_2/conv1/kernel (3, 3, 64, 64)" in str(err.value)

  other = smp.Unet("resnet18", encoder_weights=None, decoder_channels=(128, 64, 32, 16, 8))
  state_dict = other.state_dict()
  del state_dict["decoder.blocks.0.conv1.1.running_mean"]
  torch.save(state_dict, tmp_path / "narrow.pth")
  with pytest.raises(ValueError) as err:
    weights.load("unet_resnet18", str(tmp_path / "narrow.pth"), 1)
  message = str(err.value)
  assert "missing in the checkpoint (1)" in message
  assert "batch_stats/decoder/blocks_0/conv1_1/mean (256,)" in message
  assert "params/decoder/blocks_0/conv1_0/kernel (3, 3, 768, 128) vs (3, 3, 768, 256)" in message


def test_bf16_compute_keeps_float32_params_and_logits():
  model = models.create("unet_resnet18", K, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  variables = _random_variables(model, 64)
  logits = jax.jit(model.apply)(variables, x)
  reference = jax.jit(models.create("unet_resnet18", K).apply)(variables, x)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 64, 64, K)
  scale = float(jnp.abs(reference).max())
  assert float(jnp.abs(logits - reference).max()) <= 0.05 * scale


def test_num_classes_zero_returns_decoder_features():
  model = models.create("unet_convnext_tiny", 0)
  x = jnp.zeros((1, 64, 64, 3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert "segmentation_head_0" not in shapes["params"]
  assert jax.eval_shape(model.apply, shapes, x).shape == (1, 64, 64, 16)
  with pytest.raises(ValueError, match="decoder_channels"):
    jax.eval_shape(models.create("unet_resnet18", 1, decoder_channels=(64, 32, 16, 8)).init,
                   jax.random.PRNGKey(0), x)
