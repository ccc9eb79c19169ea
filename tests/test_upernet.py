"""UperNet (models/upernet.py): forward parity with segmentation_models_pytorch 0.6's UPerNet
on timm encoders (random init, eval mode, loaded through weights.load from smp state dicts),
the ViT variant's encoder and neck against timm and torch, encoder-only checkpoints and the
auxiliary head."""

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F

from medbench_jax import models
from medbench_jax import weights
from medbench_jax.models import swin
from medbench_jax.models import upernet
from tests import parity
from tests import publishers
from tests.test_models import _init as _random_variables

K = 3
SWIN_DEMO = dict(window_size=4, embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


def _smp_upernet(encoder: str, size: int, **kw) -> torch.nn.Module:
  """Random-init smp UPerNet in eval mode with trained-like values (parity.trained_like:
  live ConvNeXt blocks, non-trivial norms), decoder BatchNorm calibrated."""
  torch.manual_seed(0)
  model = smp.UPerNet(f"tu-{encoder}", encoder_weights=None, classes=K, **kw)
  return parity.calibrate_batch_norm(parity.trained_like(model), size)


PARITY = [
    ("upernet_convnext_tiny", "convnext_tiny", 64, {}),
    # Stage grids 16, 8, 4, 2: padded and clamped windows; the pyramid pools 2 px to 6 cells.
    ("upernet_swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224", 64, {}),
    ("upernet_swin_demo_patch4_window4_128", "swin_tiny_patch4_window7_224", 128, SWIN_DEMO),
    pytest.param("upernet_convnext_tiny", "convnext_tiny", 224, {}, marks=pytest.mark.slow),
    pytest.param("upernet_swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224", 224, {},
                 marks=pytest.mark.slow),
    pytest.param("upernet_convnext_small", "convnext_small", 64, {}, marks=pytest.mark.slow),
    pytest.param("upernet_convnext_base", "convnext_base", 64, {}, marks=pytest.mark.slow),
    pytest.param("upernet_convnext_large", "convnext_large", 64, {}, marks=pytest.mark.slow),
    pytest.param("upernet_swin_small_patch4_window7_224", "swin_small_patch4_window7_224", 64,
                 {}, marks=pytest.mark.slow),
    pytest.param("upernet_swin_base_patch4_window7_224", "swin_base_patch4_window7_224", 64, {},
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,encoder,size,arch", PARITY)
def test_forward_parity_with_smp(tmp_path, name, encoder, size, arch):
  swin = encoder.startswith("swin")
  reference = _smp_upernet(encoder, size, **({"img_size": size, **arch} if swin else {}))
  torch.save(reference.state_dict(), tmp_path / "upernet.pth")
  x = torch.randn(2, 3, size, size)
  model_kw = {"img_size": size} if swin else {}
  diff = parity.forward_max_diff(name, reference, str(tmp_path / "upernet.pth"), x, K,
                                 **model_kw)
  print(f"{name} vs smp.UPerNet('tu-{encoder}') at {size}px: max |diff| {diff:.2e}")
  assert diff <= 1e-4, diff

  variables = weights.load(name, str(tmp_path / "upernet.pth"), K, keep_head=True, **model_kw)
  assert (sum(v.size for v in jax.tree.leaves(variables["params"]))
          == sum(p.numel() for p in reference.parameters()))


def test_registered_for_every_swin_convnext_and_vit():
  names = set(models.list_models())
  encoders = [n for n in names if n.startswith(("swin_", "convnext_", "vit_"))]
  assert len(encoders) >= 4 + 6 + 6
  assert {f"upernet_{n}" for n in encoders} <= names
  assert models.pretrained_cfg("upernet_vit_base_patch16_224")["mean"] == (0.5, 0.5, 0.5)


def test_auxiliary_head(tmp_path):
  """Off by default; when on, train mode returns (logits, aux_logits) at the input
  resolution, the main logits unchanged, and an smp checkpoint leaves it fresh."""
  name, size = "upernet_convnext_tiny", 64
  reference = _smp_upernet("convnext_tiny", size)
  torch.save(reference.state_dict(), tmp_path / "upernet.pth")
  x = torch.randn(2, 3, size, size)
  variables, report = weights.load_with_report(name, str(tmp_path / "upernet.pth"), K,
                                               keep_head=True, aux_head=True)
  assert report.reinitialised and all(k.split("/")[1] == upernet.AUX_HEAD
                                      for k in report.reinitialised)
  model = models.create(name, K, aux_head=True)
  plain = models.create(name, K)
  assert jax.eval_shape(model.apply, variables, parity.to_nhwc(x)).shape == (2, size, size, K)
  apply = jax.jit(lambda m, v, x: m.apply(v, x, train=True, mutable=["batch_stats"],
                                          rngs={"dropout": jax.random.PRNGKey(0)})[0],
                  static_argnums=0)
  logits, aux = apply(model, variables, parity.to_nhwc(x))
  assert logits.shape == aux.shape == (2, size, size, K)
  assert logits.dtype == aux.dtype == jnp.float32
  without_aux = {c: {k: v for k, v in tree.items() if k != upernet.AUX_HEAD}
                 for c, tree in variables.items()}
  np.testing.assert_allclose(logits, apply(plain, without_aux, parity.to_nhwc(x)),
                             rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def vit_small_64(tmp_path_factory):
  """A timm ViT-S/16 classifier built for 64 px, saved as a classification checkpoint."""
  torch.manual_seed(0)
  reference = parity.trained_like(
      timm.create_model("vit_small_patch16_224", img_size=64, num_classes=10)).eval()
  path = tmp_path_factory.mktemp("vit") / "vit.pth"
  torch.save(reference.state_dict(), path)
  return reference, str(path)


def test_vit_encoder_matches_timm_and_neck_gives_strides_4_to_32(vit_small_64):
  reference, path = vit_small_64
  name = "upernet_vit_small_patch16_224"
  variables, report = weights.load_with_report(name, path, K, img_size=64)
  assert set(report.dropped) == {"params/encoder/norm/scale", "params/encoder/norm/bias",
                                 "params/encoder/head/kernel", "params/encoder/head/bias"}
  assert {k.split("/")[1] for k in report.reinitialised} == {"neck", "decoder",
                                                             "segmentation_head_0"}
  x = torch.randn(2, 3, 64, 64)
  model = models.create(name, K, img_size=64)
  capture = lambda module, method: module.name in ("encoder", "neck")
  logits, state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=capture))(
      variables, parity.to_nhwc(x))
  assert logits.shape == (2, 64, 64, K) and logits.dtype == jnp.float32
  encoder_maps = state["intermediates"]["encoder"]["__call__"][0]
  with torch.no_grad():
    expected = reference.forward_intermediates(x, indices=[2, 5, 8, 11],
                                               intermediates_only=True)
  assert len(encoder_maps) == 4
  for ours, theirs in zip(encoder_maps, expected):
    assert np.abs(np.asarray(ours) - parity.to_nhwc(theirs)).max() <= 1e-4
  neck_maps = state["intermediates"]["neck"]["__call__"][0]
  assert [m.shape for m in neck_maps] == [(2, 64 // s, 64 // s, 384) for s in (4, 8, 16, 32)]


def test_multi_level_neck_matches_torch_ops():
  """Per level: 1x1 conv, F.interpolate(scale_factor, bilinear), 3x3 conv, as
  mmsegmentation's MultiLevelNeck computes it."""
  scales = (4.0, 2.0, 1.0, 0.5)
  rng = np.random.default_rng(0)
  maps = [rng.normal(size=(2, 6, 6, 8)).astype(np.float32) for _ in scales]
  neck = upernet.MultiLevelNeck(scales)
  variables = neck.init(jax.random.PRNGKey(0), maps)
  variables = jax.tree.map(lambda v: v + rng.normal(size=v.shape).astype(np.float32) * 0.1,
                           variables)
  ours = neck.apply(variables, maps)
  params = variables["params"]
  torch_weight = lambda p: torch.from_numpy(np.array(p["kernel"]).transpose(3, 2, 0, 1))
  for i, scale in enumerate(scales):
    lateral, smooth = params[f"lateral_convs_{i}"], params[f"convs_{i}"]
    x = torch.from_numpy(maps[i].transpose(0, 3, 1, 2))
    x = F.conv2d(x, torch_weight(lateral), torch.from_numpy(np.array(lateral["bias"])))
    x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    x = F.conv2d(x, torch_weight(smooth), torch.from_numpy(np.array(smooth["bias"])),
                 padding=1)
    assert np.abs(np.asarray(ours[i]) - parity.to_nhwc(x)).max() <= 1e-5


def test_convnext_encoder_checkpoint_drops_head_and_final_norm(tmp_path):
  torch.manual_seed(0)
  torch.save(timm.create_model("convnext_tiny").state_dict(), tmp_path / "convnext.pth")
  variables, report = weights.load_with_report("upernet_convnext_tiny",
                                               str(tmp_path / "convnext.pth"), K)
  assert set(report.dropped) == {f"params/encoder/head/{p}" for p in
                                 ("norm/scale", "norm/bias", "fc/kernel", "fc/bias")}
  classifier = _flat(weights.load("convnext_tiny", str(tmp_path / "convnext.pth"), 0))
  flat = _flat(variables)
  encoder = {k for k in flat if k.split("/")[1] == "encoder"}
  assert {k.replace("/encoder", "", 1) for k in encoder} == {
      k for k in classifier if not k.startswith("params/head/")}
  for key in encoder:
    np.testing.assert_array_equal(flat[key], classifier[key.replace("/encoder", "", 1)])
  assert set(report.reinitialised) == set(flat) - encoder


def test_simmim_swin_checkpoint_fills_the_encoder_as_for_classification(tmp_path):
  """A SimMIM pretraining checkpoint (window 3 at 96 px, under 'model' beside SimMIM's own
  decoder.*) is read as SimMIM, not as an smp state dict, and its encoder converted as for
  classification, bias tables resized with SimMIM's cubic spline (test_formats checks that
  against SimMIM's loader)."""
  torch.manual_seed(0)
  arch = {k: v for k, v in SWIN_DEMO.items() if k != "window_size"}
  pretrained = timm.models.swin_transformer.SwinTransformer(
      num_classes=0, img_size=96, window_size=3, **arch)
  ckpt, _ = publishers.simmim_swin(pretrained)
  path = tmp_path / "simmim_pretrain__swin_demo__img96_window3.pth"
  with publishers.fake_modules(publishers.YACS):
    torch.save(ckpt, path)
  variables, report = weights.load_with_report("upernet_swin_demo_patch4_window4_96",
                                               str(path), K)
  assert report.format == "simmim"
  classifier = _flat(weights.load("swin_demo_patch4_window4_96", str(path), 0))
  flat = _flat(variables)
  encoder = {k for k in flat if k.split("/")[1] == "encoder"}
  assert {k.replace("/encoder", "", 1) for k in encoder} == {
      k for k in classifier if not k.startswith(("params/norm/", "params/head/"))}
  for key in encoder:
    np.testing.assert_array_equal(flat[key], classifier[key.replace("/encoder", "", 1)])
  # timm's linear resize would give other tables: the comparison above tells them apart.
  table = "layers.2.blocks.1.attn.relative_position_bias_table"
  linear = swin.resize_relative_position_bias_table(
      ckpt["model"][f"encoder.{table}"].numpy(), (4, 4), "linear")
  ours = flat["params/encoder/layers_2/blocks_1/attn/relative_position_bias_table"]
  assert np.abs(linear - np.asarray(ours)).max() > 1e-2


def test_bf16_compute_keeps_float32_logits():
  name, size = "upernet_convnext_tiny", 64
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 3))
  variables = _random_variables(models.create(name, K), size)
  logits = jax.jit(models.create(name, K, dtype=jnp.bfloat16).apply)(variables, x)
  reference = jax.jit(models.create(name, K).apply)(variables, x)
  assert logits.dtype == jnp.float32 and logits.shape == (2, size, size, K)
  scale = float(jnp.abs(reference).max())
  assert float(jnp.abs(logits - reference).max()) <= 0.05 * scale


@pytest.mark.slow
def test_sgd_steps_in_train_mode_match_smp(tmp_path):
  """In float64: the pyramid's BatchNorms over a few pooled cells make float32 train-mode
  gradients too ill-conditioned for either framework to be a 1e-4 reference. XLA's float64
  compile makes this test peak at about 7 GB of host memory."""
  reference = _smp_upernet("convnext_tiny", 32)
  rel, update_err = parity.sgd_steps_max_rel_diff(
      "upernet_convnext_tiny", reference, tmp_path, torch.randn(2, 3, 32, 32), K, float64=True)
  print(f"upernet_convnext_tiny at 32px, 2 SGD steps: max rel diff {rel:.2e}, update error "
        f"{update_err:.2e}")
  assert rel <= 1e-4 and update_err <= 1e-3, (rel, update_err)
