"""Class activation maps (models/cam.py) against pytorch-grad-cam on the same converted
weights, occlusion against a numpy reference, and the explain command line."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam import GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
import timm
import torch

from medbench_jax import explain
from medbench_jax import models
from medbench_jax import weights
from medbench_jax.data import inputs
from medbench_jax.data import transforms
from medbench_jax.data.prepare.errors import DataFormatError
from medbench_jax.models import cam
from tests import helpers
from tests import parity

K = 4
CLASSES = (0, 2)


def _resnet():
  return parity.calibrate_batch_norm(
      timm.create_model("resnet18", pretrained=False, num_classes=K), 128,
      residual_gamma=lambda name: name.endswith("bn2"))


def _densenet():
  torch.manual_seed(0)
  return parity.calibrate_batch_norm(timm.create_model(
      "densenet121", pretrained=False, num_classes=K, growth_rate=8, block_config=(2, 2, 2, 2)),
      128)


def _convnext():
  torch.manual_seed(0)
  return parity.trained_like(timm.create_model(
      "convnext_tiny", pretrained=False, num_classes=K, depths=(1, 1, 1, 1),
      dims=(16, 32, 64, 128))).eval()


def _swin():
  torch.manual_seed(0)
  return parity.trained_like(timm.create_model(
      "swin_tiny_patch4_window7_224", pretrained=False, num_classes=K, img_size=128,
      window_size=4, embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))).eval()


def _vit():
  torch.manual_seed(0)
  return parity.trained_like(timm.create_model(
      "vit_small_patch16_224", pretrained=False, num_classes=K, img_size=64, depth=2)).eval()


def _vit_reshape(tensor, height=4, width=4):
  """pytorch-grad-cam's ViT tutorial: drop the class token, tokens -> NCHW grid."""
  result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
  return result.transpose(2, 3).transpose(1, 2)


# family: (flax name, flax kw, reference, its target layer, reshape_transform, input size)
FAMILIES = {
    "resnet": ("resnet18", {}, _resnet, lambda m: m.layer4[-1], None, 128),
    "densenet": ("densenet121", dict(growth_rate=8, block_config=(2, 2, 2, 2)), _densenet,
                 lambda m: m.features, None, 128),
    "convnext": ("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
                 _convnext, lambda m: m.stages[-1], None, 128),
    "swin": ("swin_demo_patch4_window4_128", {}, _swin, lambda m: m.layers[-1],
             lambda t: t.permute(0, 3, 1, 2), 128),
    "vit": ("vit_small_patch16_224", dict(img_size=64, depth=2), _vit,
            lambda m: m.blocks[-1].norm1, _vit_reshape, 64),
}


def _converted(family: str, directory: pathlib.Path):
  """(reference, flax model, its variables) of one family, the same random weights."""
  name, kw, build, *_ = FAMILIES[family]
  reference = build()
  path = parity.save_formats(reference, directory)[1]
  variables = weights.load(name, path, num_classes=K, keep_head=True, **kw)
  return reference, models.create(name, K, **kw), variables


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradcam_and_gradcam_plusplus_match_pytorch_grad_cam(tmp_path, family):
  _, _, _, layer, reshape, size = FAMILIES[family]
  reference, model, variables = _converted(family, tmp_path)
  x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, size, size))
                       .astype(np.float32))
  classes = jnp.asarray(CLASSES)
  ours = jax.jit(lambda v, x: [cam.gradient_cam(model, v, x, classes, m)
                               for m in ("gradcam", "gradcam++")])(variables, parity.to_nhwc(x))
  for method, reference_cam, got in zip(("gradcam", "gradcam++"), (GradCAM, GradCAMPlusPlus),
                                        ours):
    with reference_cam(model=reference, target_layers=[layer(reference)],
                       reshape_transform=reshape) as explainer:
      want = explainer(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in CLASSES])
    got = np.asarray(got)
    assert got.shape == want.shape == (2, size, size)
    for i in range(2):
      # A constant reference map (every weighted activation negative) would prove nothing.
      assert want[i].std() > 0.05, f"{family} {method} image {i}: flat reference map"
      r = _pearson(got[i], want[i])
      diff = float(np.abs(got[i] - want[i]).max())
      print(f"{family} {method} image {i}: Pearson r {r:.6f}, max |diff| {diff:.2e}")
      assert r >= 0.99, (family, method, i, r)


def _random_init(name: str, size: int, **kw):
  model = models.create(name, K, **kw)
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  return model, jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)


def test_capturing_the_target_layer_leaves_the_logits_unchanged():
  model, variables = _random_init("vit_small_patch16_224", 64, img_size=64, depth=2)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 64, 3)), jnp.float32)
  acts, grads, logits = jax.jit(functools.partial(cam.activations_and_gradients, model))(
      variables, x)
  # Equal up to XLA fusing the two compiled graphs differently.
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model.apply(variables, x)),
                             rtol=1e-5, atol=1e-6)
  assert acts.shape == grads.shape == (2, 4, 4, 384)


def test_the_default_class_is_the_top_logit():
  model, variables = _random_init("resnet18", 64, stage_sizes=(1, 1, 1, 1))
  images = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 1), np.uint8)
  normalize = lambda i: (i.astype(jnp.float32) / 255.0 - 0.5).repeat(3, axis=-1)
  top = jnp.argmax(model.apply(variables, normalize(jnp.asarray(images))), -1)
  cam_fn = cam.make_cam_fn(model, normalize)
  np.testing.assert_array_equal(np.asarray(cam_fn(variables, images)),
                                np.asarray(cam_fn(variables, images, top)))


def test_a_model_without_a_target_layer_is_refused():
  with pytest.raises(ValueError, match="No class activation map target"):
    cam.make_cam_fn(models.create("unet_resnet18", 2), lambda i: i)


def _numpy_occlusion(score, x, patch, stride, baseline):
  """Occlusion by loops: every window (the last ones moved in to end at the edge), the
  drop of `score`, averaged per pixel over the windows covering it."""
  h, w = x.shape[:2]
  tops = list(range(0, h - patch + 1, stride))
  lefts = list(range(0, w - patch + 1, stride))
  tops += [h - patch] if tops[-1] != h - patch else []
  lefts += [w - patch] if lefts[-1] != w - patch else []
  total, count = np.zeros((h, w)), np.zeros((h, w))
  clean = score(x)
  for top in tops:
    for left in lefts:
      hidden = x.copy()
      hidden[top:top + patch, left:left + patch] = baseline
      total[top:top + patch, left:left + patch] += clean - score(hidden)
      count[top:top + patch, left:left + patch] += 1
  return total / count


@pytest.mark.parametrize("size,patch,stride", [(16, 4, 2), (18, 5, 3), (12, 12, 6)])
def test_occlusion_matches_a_numpy_reference(size, patch, stride):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  # Two classes, one linear and one not in the pixels, so windows interact.
  w = rng.normal(size=(size, size, 3)).astype(np.float32)

  def logits(images):
    linear = (images * w).sum(axis=(-3, -2, -1))
    return jnp.stack([linear, jnp.tanh(linear / 10) * (images**2).mean(axis=(-3, -2, -1))], -1)

  classes = np.array([0, 1])
  got = np.asarray(cam.occlusion(logits, jnp.asarray(x), jnp.asarray(classes), patch=patch,
                                 stride=stride, baseline=0.5, chunk=3))
  for i, c in enumerate(classes):
    score = lambda image, c=c: float(np.asarray(logits(image))[c])
    want = _numpy_occlusion(score, x[i], patch, stride, 0.5)
    np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-4)


def test_overlay_colours_low_blue_and_high_red():
  images = np.full((2, 4, 4, 1), 128, np.uint8)
  maps = np.stack([np.zeros((4, 4)), np.ones((4, 4))])
  out = cam.overlay(images, maps, alpha=1.0)
  assert out.dtype == np.uint8 and out.shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(out[0, 0, 0], [0, 0, 128])  # jet(0): dark blue
  np.testing.assert_array_equal(out[1, 0, 0], [128, 0, 0])  # jet(1): dark red
  np.testing.assert_array_equal(cam.overlay(images, maps, alpha=0.0)[..., 0], 128)


def test_the_map_of_the_evaluation_crop_lands_where_the_crop_lies():
  image = inputs.InputImage("x.png", np.zeros((72, 72, 1), np.uint8),
                            np.zeros((144, 216, 1), np.uint8))
  item = explain.prepare(image, transforms.parse("resize(72)|center_crop(64)"))
  assert item.image.shape == (64, 64, 1) and item.box == (4, 4, 64, 64)
  full = explain.to_input_resolution(np.ones((2, 64, 64), np.float32), item)
  assert full.shape == (2, 144, 216)
  # 4 of 72 stored rows (8 of 144 file rows) lie outside the crop: 0 there, 1 inside.
  assert full[:, 72, 108].tolist() == [1.0, 1.0] and full[:, 0, 0].tolist() == [0.0, 0.0]
  np.testing.assert_allclose(full[0].mean(), (64 / 72) ** 2, atol=0.02)


def test_classes_by_name_or_index():
  names = ("Atelectasis", "Effusion", "Nodule")
  assert explain.parse_classes("", names) is None
  assert explain.parse_classes("Nodule, 0", names) == [2, 0]
  with pytest.raises(Exception, match="neither a class"):
    explain.parse_classes("Pneumonia", names)


def test_inputs_from_a_folder_a_csv_and_a_glob(tmp_path):
  for name in ("a.png", "sub/b.dcm", "notes.txt"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(b"x")
  (tmp_path / "list.csv").write_text("Image,label\na.png,1\n,0\n")
  assert inputs.list_inputs(str(tmp_path))[0] == [str(tmp_path / "a.png"),
                                                   str(tmp_path / "sub/b.dcm")]
  files, problems = inputs.list_inputs(str(tmp_path / "list.csv"))
  assert files == [str(tmp_path / "a.png")] and problems[0].reason == "empty 'Image'"
  assert inputs.list_inputs(str(tmp_path / "**/*.dcm"))[0] == [str(tmp_path / "sub/b.dcm")]


def test_an_unreadable_file_raises_a_data_format_error_naming_it(tmp_path):
  (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
  (tmp_path / "bad.dcm").write_bytes(b"not a dicom")
  for name in ("bad.png", "bad.dcm"):
    with pytest.raises(DataFormatError, match=name):
      inputs.read_input(tmp_path / name, 64)




@pytest.mark.e2e
@pytest.mark.parametrize("method", cam.METHODS)
def test_explain_writes_maps_and_overlays_and_lists_bad_files(finished_run, phantom_dir,
                                                              tmp_path, method):
  files = sorted((phantom_dir / "images").glob("*.png"))[:3]
  for f in files:
    (tmp_path / "in" / f.name).parent.mkdir(exist_ok=True)
    (tmp_path / "in" / f.name).write_bytes(f.read_bytes())
  (tmp_path / "in" / "broken.png").write_bytes(files[0].read_bytes()[:100])
  out = tmp_path / "out"
  helpers.run_module("medbench_jax.explain", f"--workdir={finished_run}",
                     f"--inputs={tmp_path / 'in'}", f"--out={out}", f"--method={method}",
                     "--classes=0,1", "--batch_size=2")
  summary = json.loads((out / "explain.json").read_text())
  assert [p["path"] for p in summary["problems"]] == [str(tmp_path / "in" / "broken.png")]
  maps = np.load(out / "maps.npz")
  assert sorted(maps) == sorted(str(tmp_path / "in" / f.name) for f in files)
  for f in files:
    m = maps[str(tmp_path / "in" / f.name)]
    assert m.shape == (2, *np.asarray(Image.open(f)).shape[:2])
    assert 0.0 <= m.min() and m.max() <= 1.0
    for png in summary["files"][str(tmp_path / "in" / f.name)]["overlays"]:
      assert np.asarray(Image.open(out / png)).shape == (*m.shape[1:], 3)
  # A class with no positive evidence in an image has a flat (zero) map; not all of them.
  assert max(float(m.max()) for m in maps.values()) > 0.5
