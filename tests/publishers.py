"""Checkpoints as their publishers' training scripts save them, for the format tests.

Each builder takes a random-init torchvision/timm model (or its state dict) and returns the
object the publisher's code passes to torch.save (or pickles): wrapper keys, prefixes,
heads, momentum encoders, queues, optimizer state, configs; most also return the keys the
format must drop. Written from the publishers' code, independently of weights/formats.py.
"""

import argparse
import collections
import contextlib
import copy
import pickle
import re
import sys
import types

import numpy as np
import torch
import torchvision


def resnet_backbone(model: torch.nn.Module) -> dict[str, torch.Tensor]:
  """A torchvision ResNet's state dict without its classifier."""
  return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def prefixed(prefix: str, state_dict: dict) -> dict:
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


# --- self-supervised ResNets and the study's own checkpoints ----------------------------

def moco(model, version):
  """facebookresearch/moco main_moco.py: DDP(MoCo) with encoder_q/encoder_k, queue."""
  feat = model.fc.in_features
  head = (_mlp("fc.", [feat, feat, 16]) if version == 2 else
          {"fc.weight": torch.randn(16, feat), "fc.bias": torch.randn(16)})
  encoder = {**resnet_backbone(model), **head}
  state = {**prefixed("module.encoder_q.", encoder),
           **prefixed("module.encoder_k.", {k: v + 1 for k, v in encoder.items()}),
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
  state = prefixed("module.", {**resnet_backbone(model), **extra})
  return state, [f"module.{k}" for k in extra]


def pycontrast(model, method):
  """HobbitLong/PyContrast ContrastTrainer.save: DDP(RGBSingleHead/RGBMultiHeads) under
  'model', memory under 'contrast', and for MoCo-style methods (InfoMin) 'model_ema'."""
  feat = model.fc.in_features
  heads = prefixed("head.", _mlp("", [feat, feat, 16]) if method == "infomin"
                    else {"0.weight": torch.randn(16, feat), "0.bias": torch.randn(16)})
  if method == "pirl":
    heads.update({"head_jig.fc1.weight": torch.randn(16, feat), "head_jig.fc1.bias":
                  torch.randn(16), "head_jig.fc2.weight": torch.randn(16, 144),
                  "head_jig.fc2.bias": torch.randn(16)})
  online = {**prefixed("encoder.", resnet_backbone(model)), **heads}
  ckpt = {"model": prefixed("module.", online), "epoch": 200,
          "contrast": {"memory": torch.randn(32, 16), "params": torch.tensor([16.0, 0.07])},
          "optimizer": _optimizer_state(copy.deepcopy(model))}
  if method == "infomin":
    ckpt["model_ema"] = {k: v + 1 for k, v in online.items()}
  return ckpt, [f"module.{k}" for k in heads]


def dino(model):
  """facebookresearch/dino main_dino.py save_dict: MultiCropWrapper(backbone, DINOHead)
  for the DDP student and the plain teacher, argparse args, loss center."""
  return _dino_checkpoint(resnet_backbone(model), model.fc.in_features,
                          _optimizer_state(copy.deepcopy(model)))


def _dino_checkpoint(backbone: dict, dim: int, optimizer: dict):
  def network(prefix, shift):
    return {**prefixed(prefix + "backbone.", {k: v + shift if v.is_floating_point() else v
                                                for k, v in backbone.items()}),
            **prefixed(prefix + "head.mlp.", _mlp("", [dim, 32, 8])),
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
  return {"epoch": 12, "lossMIN": 0.18, "state_dict": prefixed("module.", state),
          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, []


# --- BYOL: the Haiku pickle -------------------------------------------------------------

@contextlib.contextmanager
def fake_modules(classes: dict[str, type]):
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
  with fake_modules({"haiku._src.data_structures.frozendict": _FrozenDict,
                      "byol.byol_experiment._ByolExperimentState": _ByolState,
                      "byol.utils.optimizers.LarsState": _LarsState}):
    experiment_state = _ByolState(frozen(params), frozen(params), frozen(state), frozen(state),
                                  _LarsState(frozen(params)))
    with open(path, "wb") as f:
      pickle.dump({"experiment_state": experiment_state, "step": 300_000,
                   "rng": np.array([0, 42], np.uint32)}, f, protocol=2)


# --- self-supervised ViTs ---------------------------------------------------------------

def dino_vit(backbone):
  return _dino_checkpoint(backbone, backbone["cls_token"].shape[-1], optimizer={})


def mocov3(backbone):
  """facebookresearch/moco-v3 main_moco.py: DDP(MoCo_ViT) state dict under 'state_dict':
  base_encoder with an MLP head, momentum_encoder, predictor; GradScaler state."""
  dim = backbone["cls_token"].shape[-1]
  head = _mlp("head.", [dim, 32, 16])
  state = {**prefixed("module.base_encoder.", {**backbone, **head}),
           **prefixed("module.momentum_encoder.", {**backbone, **head}),
           **prefixed("module.predictor.", _mlp("", [16, 32, 16]))}
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


# --- RadImageNet --------------------------------------------------------------------------

class RadImageNetBackbone(torch.nn.Module):
  """BMEII-AI/RadImageNet's `Backbone` (pytorch_example.ipynb): the torchvision model's
  children in an nn.Sequential named `backbone`, ResNet-50's up to its pooling
  (children()[:9]), DenseNet-121's up to its classifier (children()[:-1]: `features`)."""

  def __init__(self, model: torch.nn.Module):
    super().__init__()
    children = list(model.children())
    keep = children[:9] if isinstance(model, torchvision.models.ResNet) else children[:-1]
    self.backbone = torch.nn.Sequential(*keep)


def radimagenet(model: torch.nn.Module) -> dict[str, torch.Tensor]:
  """The released ResNet50.pt / DenseNet121.pt: the Backbone's state dict, which the
  notebook loads with backbone.load_state_dict(torch.load(...))."""
  return RadImageNetBackbone(model).state_dict()


# --- Microsoft's Swin and SimMIM ---------------------------------------------------------

def microsoft_swin(model: torch.nn.Module) -> dict[str, torch.Tensor]:
  """A timm Swin's state dict in Microsoft's layout (microsoft/Swin-Transformer, the study's
  and SimMIM's Swin): PatchMerging at the end of stage i (layers.i.downsample, timm's
  layers.{i+1}.downsample), head `head`, and the relative position indices and shifted-
  window masks it registers as persistent buffers (timm's are not persistent)."""
  buffers = {k: v for k, v in model.named_buffers()
             if k.endswith(("relative_position_index", "attn_mask"))}
  out = {}
  for key, value in {**model.state_dict(), **buffers}.items():
    key = re.sub(r"^layers\.(\d+)\.downsample",
                 lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
    out[key.replace("head.fc.", "head.")] = value
  return out


class CfgNode(dict):
  """yacs.config.CfgNode as it pickles: a dict subclass whose flags live in its __dict__
  (yacs 0.1.8). Saved under its real name through fake_modules."""

  def __init__(self, entries: dict | None = None):
    super().__init__({k: CfgNode(v) if isinstance(v, dict) else v
                      for k, v in (entries or {}).items()})
    self.__dict__.update({"__immutable__": True, "__deprecated_keys__": set(),
                          "__renamed_keys__": {}, "__new_allowed__": False})


def simmim(encoder: dict, embed_dim: int, num_features: int, encoder_stride: int,
           config: dict) -> tuple[dict, list[str]]:
  """microsoft/SimMIM main_simmim.py save_checkpoint: {'model': SimMIM state dict (encoder.*
  with the encoder's mask_token, decoder.0 the 1x1 conv before the pixel shuffle),
  'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch', 'config' (its yacs CfgNode)}; with
  AMP_OPT_LEVEL O0 there is no 'amp' entry. Save it inside `fake_modules(YACS)`."""
  decoder = {"decoder.0.weight": torch.randn(encoder_stride**2 * 3, num_features, 1, 1),
             "decoder.0.bias": torch.randn(encoder_stride**2 * 3)}
  state = {**prefixed("encoder.", encoder),
           "encoder.mask_token": torch.randn(1, 1, embed_dim) * 0.02, **decoder}
  optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-4)
  ckpt = {"model": state, "optimizer": optimizer.state_dict(),
          "lr_scheduler": {"t_initial": 800, "lr_min": 5e-7, "warmup_t": 10},
          "max_accuracy": 0.0, "epoch": 799,
          "config": CfgNode({**config, "AMP_OPT_LEVEL": "O0", "TRAIN": {"EPOCHS": 800}})}
  return ckpt, ["encoder.mask_token", *decoder]


YACS = {"yacs.config.CfgNode": CfgNode}


def simmim_swin(model: torch.nn.Module) -> tuple[dict, list[str]]:
  """SimMIM pretraining of a Swin (its SwinTransformerForSimMIM is Microsoft's Swin)."""
  config = {"MODEL": {"TYPE": "swin", "SWIN": {
      "EMBED_DIM": model.embed_dim, "DEPTHS": [len(s.blocks) for s in model.layers],
      "WINDOW_SIZE": model.layers[0].blocks[0].window_size[0]}}}
  return simmim(microsoft_swin(model), model.embed_dim, model.num_features, 32, config)


def simmim_vit(backbone: dict, patch_size: int, rel_pos_bias: str = "", layer_scale: bool = False
               ) -> tuple[dict, list[str]]:
  """SimMIM pretraining of its BEiT-style ViT from a timm ViT's state dict (whose qkv biases
  must have zero k parts): qkv without bias and q_bias, v_bias beside it. `rel_pos_bias`
  "shared" (USE_SHARED_RPB, no absolute position embedding, as its published ViT-B) or
  "per_block" (USE_RPB) adds the relative position bias tables, `layer_scale`
  (INIT_VALUES) each block's gamma_1 and gamma_2; by default the variant timm's ViT is
  (USE_APE, no relative position bias, INIT_VALUES None)."""
  dim = backbone["cls_token"].shape[-1]
  heads_table = lambda: torch.randn((2 * 7 - 1)**2 + 3, dim // 64)
  encoder = {}
  for key, value in backbone.items():
    if key.endswith(".attn.qkv.bias"):
      assert not value[dim:2 * dim].any(), "the SimMIM ViT has no k bias"
      encoder[key.replace("qkv.bias", "q_bias")] = value[:dim]
      encoder[key.replace("qkv.bias", "v_bias")] = value[2 * dim:]
      if rel_pos_bias == "per_block":
        encoder[key.replace("qkv.bias", "relative_position_bias_table")] = heads_table()
    elif not (key == "pos_embed" and rel_pos_bias == "shared"):
      encoder[key] = value
    if layer_scale and key.endswith(".norm1.weight"):
      block = key[:-len("norm1.weight")]
      encoder.update({block + "gamma_1": torch.full((dim,), 0.1),
                      block + "gamma_2": torch.full((dim,), 0.1)})
  if rel_pos_bias == "shared":
    encoder["rel_pos_bias.relative_position_bias_table"] = heads_table()
  config = {"MODEL": {"TYPE": "vit", "VIT": {
      "USE_APE": rel_pos_bias != "shared", "USE_RPB": rel_pos_bias == "per_block",
      "USE_SHARED_RPB": rel_pos_bias == "shared", "INIT_VALUES": 0.1 if layer_scale else None}}}
  return simmim(encoder, dim, dim, patch_size, config)
