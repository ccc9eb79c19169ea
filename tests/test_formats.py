"""Checkpoint formats as their publishers save them: each fixture wraps a random-init
torchvision/timm model's state dict exactly as the publisher's training script does
(wrapper keys, prefixes, heads, momentum encoders, queues, optimizer state, legacy
serialisation where they released such files), then loads it through weights.load and
compares outputs with the torch model, and the normalised state dict with its backbone."""

import argparse
import collections
import contextlib
import copy
import os
import pickle
import re
import sys
import types
import uuid

import numpy as np
import pytest
import timm
import torch
import torchvision
from timm.models.swin_transformer import SwinTransformer as TimmSwin

from medbench_jax import weights
from medbench_jax.weights import formats
from tests import parity

K = 4
SIZE = 32


def _resnet(name: str = "resnet18", seed: int = 0) -> torch.nn.Module:
  torch.manual_seed(seed)
  model = torchvision.models.get_model(name, num_classes=K)
  last_bn = "bn2" if name in ("resnet18", "resnet34") else "bn3"
  return parity.calibrate_batch_norm(model, SIZE, lambda m: m.endswith(last_bn))


def _backbone(model: torch.nn.Module) -> dict[str, torch.Tensor]:
  return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _prefixed(prefix: str, state_dict: dict) -> dict:
  return {prefix + k: v for k, v in state_dict.items()}


def _optimizer_state(model: torch.nn.Module) -> dict:
  """SGD state after one step, as training checkpoints carry it."""
  optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
  for p in model.parameters():
    p.grad = torch.zeros_like(p)
  optimizer.step()
  return optimizer.state_dict()


def _mlp(prefix: str, dims: list[int], bn: bool = False) -> dict:
  """Linear layers (index 0, 2, ...) of an nn.Sequential MLP, with BatchNorm1d at odd
  indices when `bn` (SwAV's projection head)."""
  out, index = {}, 0
  for d_in, d_out in zip(dims, dims[1:]):
    out[f"{prefix}{index}.weight"] = torch.randn(d_out, d_in)
    out[f"{prefix}{index}.bias"] = torch.randn(d_out)
    if bn and d_out != dims[-1]:
      out.update({f"{prefix}{index + 1}.weight": torch.ones(d_out),
                  f"{prefix}{index + 1}.bias": torch.zeros(d_out),
                  f"{prefix}{index + 1}.running_mean": torch.zeros(d_out),
                  f"{prefix}{index + 1}.running_var": torch.ones(d_out),
                  f"{prefix}{index + 1}.num_batches_tracked": torch.tensor(7)})
      index += 1
    index += 2
  return out


def _features(model: torch.nn.Module) -> torch.nn.Module:
  features = copy.deepcopy(model)
  features.fc = torch.nn.Identity()
  return features.eval()


# --- publisher layouts: (checkpoint object, keys the format must drop) --------------------

def moco(model, version):
  """facebookresearch/moco main_moco.py: DDP(MoCo) with encoder_q/encoder_k, queue."""
  feat = model.fc.in_features
  head = (_mlp("fc.", [feat, feat, 16]) if version == 2 else
          {"fc.weight": torch.randn(16, feat), "fc.bias": torch.randn(16)})
  encoder = {**_backbone(model), **head}
  state = {**_prefixed("module.encoder_q.", encoder),
           **_prefixed("module.encoder_k.", {k: v + 1 for k, v in encoder.items()}),
           "module.queue": torch.randn(16, 32),
           "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
  ckpt = {"epoch": 200, "arch": "resnet50", "state_dict": state,
          "optimizer": _optimizer_state(copy.deepcopy(model))}
  dropped = [k for k in state if not k.startswith("module.encoder_q.")] + [
      f"module.encoder_q.{k}" for k in head]
  return ckpt, dropped


def swav(model, prototypes):
  """facebookresearch/swav: the released *_pretrain.pth.tar is the DDP state dict itself,
  with projection_head and prototypes (MultiPrototypes for DeepCluster-v2/SeLa-v2)."""
  feat = model.fc.in_features
  extra = _mlp("projection_head.", [feat, 32, 16], bn=True)
  if prototypes == "single":
    extra["prototypes.weight"] = torch.randn(30, 16)
  else:
    extra.update({f"prototypes.prototypes{i}.weight": torch.randn(30, 16) for i in range(3)})
  state = _prefixed("module.", {**_backbone(model), **extra})
  return state, [f"module.{k}" for k in extra]


def pycontrast(model, method):
  """HobbitLong/PyContrast ContrastTrainer.save: DDP(RGBSingleHead/RGBMultiHeads) under
  'model', memory under 'contrast', and for MoCo-style methods (InfoMin) 'model_ema'."""
  feat = model.fc.in_features
  heads = _prefixed("head.", _mlp("", [feat, feat, 16]) if method == "infomin"
                    else {"0.weight": torch.randn(16, feat), "0.bias": torch.randn(16)})
  if method == "pirl":
    heads.update({"head_jig.fc1.weight": torch.randn(16, feat), "head_jig.fc1.bias":
                  torch.randn(16), "head_jig.fc2.weight": torch.randn(16, 144),
                  "head_jig.fc2.bias": torch.randn(16)})
  online = {**_prefixed("encoder.", _backbone(model)), **heads}
  ckpt = {"model": _prefixed("module.", online), "epoch": 200,
          "contrast": {"memory": torch.randn(32, 16), "params": torch.tensor([16.0, 0.07])},
          "optimizer": _optimizer_state(copy.deepcopy(model))}
  if method == "infomin":
    ckpt["model_ema"] = {k: v + 1 for k, v in online.items()}
  return ckpt, [f"module.{k}" for k in heads]


def dino(model):
  """facebookresearch/dino main_dino.py save_dict: MultiCropWrapper(backbone, DINOHead)
  for the DDP student and the plain teacher, argparse args, loss center."""
  return _dino_checkpoint(_backbone(model), model.fc.in_features,
                          _optimizer_state(copy.deepcopy(model)))


def _dino_checkpoint(backbone: dict, dim: int, optimizer: dict):
  def network(prefix, shift):
    return {**_prefixed(prefix + "backbone.", {k: v + shift if v.is_floating_point() else v
                                                for k, v in backbone.items()}),
            **_prefixed(prefix + "head.mlp.", _mlp("", [dim, 32, 8])),
            prefix + "head.last_layer.weight_g": torch.ones(64, 1),
            prefix + "head.last_layer.weight_v": torch.randn(64, 8)}
  teacher, student = network("", 0.0), network("module.", 0.5)
  ckpt = {"student": student, "teacher": teacher, "epoch": 100, "optimizer": optimizer,
          "args": argparse.Namespace(arch="resnet50", out_dim=64, lr=0.0005, local_crops_number=6),
          "dino_loss": {"center": torch.randn(1, 64)}}
  return ckpt, [k for k in teacher if not k.startswith("backbone.")]


def reference(model):
  """jlianglab/BenchmarkTransferLearning engine: DataParallel model with an
  nn.Sequential(Linear, Sigmoid) classifier, Adam and ReduceLROnPlateau state, lossMIN."""
  state = {("fc.0." + k[3:] if k.startswith("fc.") else k): v
           for k, v in model.state_dict().items()}
  model_copy = copy.deepcopy(model)
  optimizer = torch.optim.Adam(model_copy.parameters(), lr=2e-4)
  scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=5)
  scheduler.step(0.3)
  return {"epoch": 12, "lossMIN": 0.18, "state_dict": _prefixed("module.", state),
          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, []


FEATURE_CASES = [
    # (id, layout builder, expected format, torch.save legacy format as released, compare
    # outputs too: once per format; variants of a format compare the normalised parameters)
    ("moco_v1", lambda m: moco(m, 1), "moco", True, False),
    ("moco_v2", lambda m: moco(m, 2), "moco", True, True),
    ("swav", lambda m: swav(m, "single"), "swav", True, True),
    ("deepcluster_v2", lambda m: swav(m, "multi"), "swav", False, False),
    ("insdis", lambda m: pycontrast(m, "insdis"), "pycontrast", False, False),
    ("pirl", lambda m: pycontrast(m, "pirl"), "pycontrast", False, False),
    ("infomin", lambda m: pycontrast(m, "infomin"), "pycontrast", False, True),
    ("dino_resnet", dino, "dino", False, True),
    ("barlow_twins", lambda m: (_backbone(m), []), "plain", False, True),
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
  expected = _backbone(resnet18)
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
  ckpt, _ = reference(resnet18)
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
  microsoft = {}
  for key, value in model.state_dict().items():
    for stage in (1, 2, 3):
      key = key.replace(f"layers.{stage}.downsample", f"layers.{stage - 1}.downsample")
    microsoft[key.replace("head.fc.", "head.")] = value
  torch.save({"epoch": 30, "lossMIN": 0.15, "state_dict": _prefixed("module.", microsoft)},
             tmp_path / "swin_mimic.pth.tar")
  path = str(tmp_path / "swin_mimic.pth.tar")
  assert weights.read_state_dict(path).format == "reference"
  diff = parity.forward_max_diff("swin_demo_patch4_window4_128", model, path,
                                 torch.randn(2, 3, 96, 96), num_classes=K, img_size=96)
  assert diff <= 1e-4, diff


def test_dino_student_by_explicit_format(tmp_path, resnet18):
  ckpt, _ = dino(resnet18)
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
  ckpt, _ = moco(resnet18, 2)
  path = tmp_path / "moco.pth.tar"
  torch.save(ckpt, path)
  with pytest.raises(ValueError, match=r"(?s)unexpected in the checkpoint.*encoder_k.*FORMAT:PATH"):
    weights.load("resnet18", f"plain:{path}", num_classes=K)


def test_beit_is_refused_with_the_reason(tmp_path):
  state = {"cls_token": torch.zeros(1, 1, 8), "blocks.0.gamma_1": torch.ones(8),
           "rel_pos_bias.relative_position_bias_table": torch.zeros(10, 2)}
  torch.save({"model": state}, tmp_path / "beit.pth")
  with pytest.raises(ValueError, match="BEiT checkpoints need relative position biases"):
    weights.read_state_dict(str(tmp_path / "beit.pth"))


# --- BYOL: the Haiku pickle ---------------------------------------------------------------

@contextlib.contextmanager
def _fake_modules(classes: dict[str, type]):
  """Importable stand-ins for byol.* / haiku.* classes while pickling, as dill would find
  the real ones; removed afterwards so the reader cannot rely on them."""
  created = []
  for qualified, cls in classes.items():
    module_name, _, name = qualified.rpartition(".")
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
      prefix = ".".join(parts[:i])
      if prefix not in sys.modules:
        sys.modules[prefix] = types.ModuleType(prefix)
        created.append(prefix)
    cls.__module__, cls.__qualname__, cls.__name__ = module_name, name, name
    setattr(sys.modules[module_name], name, cls)
  try:
    yield
  finally:
    for name in created:
      del sys.modules[name]


class _FrozenDict(dict):
  """haiku._src.data_structures.frozendict pickles as frozendict(dict)."""

  def __reduce__(self):
    return type(self), (dict(self),)


_ByolState = collections.namedtuple(
    "_ByolState", "online_params target_params online_state target_state opt_state")
_LarsState = collections.namedtuple("_LarsState", "momentum")


def _haiku_module(torch_module: str) -> str:
  """torchvision module name -> BYOL's Haiku module path (written independently of the
  reader's table)."""
  if torch_module in ("conv1", "bn1"):
    return "res_net50/~/" + {"conv1": "initial_conv", "bn1": "initial_batchnorm"}[torch_module]
  layer, block, *rest = torch_module.split(".")
  group = f"res_net50/~/block_group_{int(layer[5:]) - 1}/~/block_{block}/~/"
  if rest[0] == "downsample":
    return group + ("shortcut_conv" if rest[1] == "0" else "shortcut_batchnorm")
  kind, index = rest[0][:-1], int(rest[0][-1]) - 1
  return group + {"conv": "conv_", "bn": "batchnorm_"}[kind] + str(index)


def byol_pickle(model: torch.nn.Module, path: str) -> None:
  """byol/utils/checkpointing.py: dill.dump(dict(experiment_state=..., step, rng), protocol=2)
  of numpy arrays in Haiku frozendicts inside the _ByolExperimentState NamedTuple."""
  params, state = {}, {}
  for key, value in model.state_dict().items():
    module, leaf = key.rsplit(".", 1)
    value = value.numpy()
    if module == "fc":
      params.setdefault("classifier", {})["w" if leaf == "weight" else "b"] = (
          value.T if leaf == "weight" else value)
      continue
    name = _haiku_module(module)
    if value.ndim == 4:
      params[name] = {"w": value.transpose(2, 3, 1, 0)}
    elif leaf in ("weight", "bias"):
      params.setdefault(name, {})["scale" if leaf == "weight" else "offset"] = value.reshape(
          1, 1, 1, -1)
    elif leaf in ("running_mean", "running_var"):
      ema = "mean_ema" if leaf == "running_mean" else "var_ema"
      state[f"{name}/~/{ema}"] = {"average": value.reshape(1, 1, 1, -1),
                                  "hidden": value.reshape(1, 1, 1, -1) * 0.9,
                                  "counter": np.int32(1000)}
  for mlp in ("projector", "predictor"):
    params[f"{mlp}/~/linear"] = {"w": np.ones((8, 16), np.float32), "b": np.zeros(16, np.float32)}
    params[f"{mlp}/~/batch_norm"] = {"scale": np.ones((1, 16), np.float32),
                                     "offset": np.zeros((1, 16), np.float32)}
    params[f"{mlp}/~/linear_1"] = {"w": np.ones((16, 8), np.float32)}
  frozen = lambda tree: _FrozenDict({k: _FrozenDict(v) for k, v in tree.items()})
  with _fake_modules({"haiku._src.data_structures.frozendict": _FrozenDict,
                      "byol.byol_experiment._ByolExperimentState": _ByolState,
                      "byol.utils.optimizers.LarsState": _LarsState}):
    experiment_state = _ByolState(frozen(params), frozen(params), frozen(state), frozen(state),
                                  _LarsState(frozen(params)))
    with open(path, "wb") as f:
      pickle.dump({"experiment_state": experiment_state, "step": 300_000,
                   "rng": np.array([0, 42], np.uint32)}, f, protocol=2)


def test_byol_haiku_pickle(tmp_path):
  model = _resnet("resnet50")
  path = str(tmp_path / "pretrain_res50x1.pkl")
  byol_pickle(model, path)
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
  payload = dict(_backbone(resnet18), **{
      "fc.weight": exploit if payload == "global" else np.array([exploit, 1], dtype=object)})
  path = tmp_path / "evil.pth.tar"
  torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
  _assert_refused_without_running(path, marker)


# --- self-supervised ViTs ---------------------------------------------------------------

VIT, VIT_SIZE = "vit_small_patch32_224", 64


def _vit(global_pool: str = "token") -> torch.nn.Module:
  """Random-init timm ViT (pooled features) with weights redrawn at unit scale, so that
  every block moves the output (timm's std 0.02 init leaves residual branches near zero)."""
  torch.manual_seed(0)
  model = timm.create_model(VIT, pretrained=False, num_classes=0, img_size=VIT_SIZE,
                            global_pool=global_pool)
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


def dino_vit(backbone):
  return _dino_checkpoint(backbone, backbone["cls_token"].shape[-1], optimizer={})


def mocov3(backbone):
  """facebookresearch/moco-v3 main_moco.py: DDP(MoCo_ViT) state dict under 'state_dict':
  base_encoder with an MLP head, momentum_encoder, predictor; GradScaler state."""
  dim = backbone["cls_token"].shape[-1]
  head = _mlp("head.", [dim, 32, 16])
  state = {**_prefixed("module.base_encoder.", {**backbone, **head}),
           **_prefixed("module.momentum_encoder.", {**backbone, **head}),
           **_prefixed("module.predictor.", _mlp("", [16, 32, 16]))}
  ckpt = {"epoch": 300, "arch": "vit_small", "state_dict": state,
          "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}}
  dropped = [k for k in state if not k.startswith("module.base_encoder.")] + [
      f"module.base_encoder.{k}" for k in head]
  return ckpt, dropped


def mae(backbone):
  """facebookresearch/mae main_pretrain.py misc.save_model: {'model': MaskedAutoencoderViT
  state dict (encoder, mask_token, decoder_*), 'optimizer', 'epoch', 'scaler', 'args'}."""
  dim = backbone["cls_token"].shape[-1]
  decoder = {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, dim),
             "decoder_embed.bias": torch.zeros(16), "decoder_pos_embed": torch.zeros(1, 5, 16),
             "decoder_blocks.0.norm1.weight": torch.ones(16), "decoder_norm.weight":
             torch.ones(16), "decoder_pred.weight": torch.randn(3072, 16)}
  ckpt = {"model": {**backbone, **decoder}, "epoch": 799, "scaler": {"scale": 1024.0},
          "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75)}
  return ckpt, list(decoder)


VIT_CASES = [
    ("dino_vit", dino_vit, "dino", "token"),
    ("mocov3_vit", mocov3, "mocov3", "token"),
    ("mae_pretrain", mae, "mae", "token"),
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
