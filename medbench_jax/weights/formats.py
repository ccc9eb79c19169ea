"""Checkpoint sources: how each publisher wraps its weights, recognised and unwrapped.

Every pretrained checkpoint the project reads holds a torch-layout state dict of one of
our architectures, wrapped the way its authors' training script saved it: under a key
('state_dict', 'model', 'teacher'), behind prefixes ('module.' from DDP, 'encoder_q.'
from MoCo's query encoder, 'encoder.' / 'backbone.' / 'swin_model.' of a wrapper's
sub-module), next to parts that are not the backbone (projection heads, momentum
encoders, queues, prototypes, decoders), sometimes under other names (RadImageNet's
nn.Sequential indices) or split differently (SimMIM's ViT q/v biases). `FORMATS`
describes each source as data; `detect` picks one by key signature and `unwrap`
returns the backbone's state dict with every key the model's converter expects, plus a
`Unwrapped` report of what was stripped, renamed and dropped. Nothing is dropped without
being listed there, and `weights.load` logs the report. Layouts that do not map onto our
architectures are recognised and refused with the reason.

Choosing a format explicitly: prefix the path with its name (`moco:/ckpt/x.pth.tar`,
`dino_student:/ckpt/dino.pth`), in `weights.load` and hence in `--config.model.init`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import re
from typing import Any

import numpy as np

from medbench_jax.weights import haiku_pickle

StateDict = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Format:
  """How one publisher stores a backbone.

  wrappers: keys descended into, first one present wins, repeatedly (a training
    checkpoint's {'state_dict': ...}); the other top-level entries (optimizer, epoch,
    momentum encoder copies) are reported as ignored.
  prefixes: stripped from keys, the first that matches; with `require_prefix`, keys
    carrying none of them are not part of the backbone and are dropped (MoCo's
    encoder_k and queue next to encoder_q).
  common_prefixes: stripped, after `prefixes`, only when every key carries the same one: a
    state dict saved from a wrapper's sub-module. A whole wrapper's keys (an smp U-Net's
    encoder.* beside decoder.*) are left alone for its model's converter.
  drop: regexes on the stripped key for backbone-adjacent parts that are not ours
    (projection heads, prototypes, decoders).
  rename: (regex, replacement) on the stripped key, applied in order.
  regroup: state dict, source -> (state dict, old key -> new key) for tensors the publisher
    splits differently from timm (applied after `rename`).
  refuse: (regex, reason): a stripped key matching the regex means a variant of the
    architecture that ours is not; loading fails with the reason.
  converter_kw: options for the model's converter that this source needs (how SimMIM
    resizes relative position tables).
  start_fresh, unused: regexes on Flax paths (params/fc_norm/scale) of model parameters the
    checkpoint may lack, which keep their fresh initialisation, and of checkpoint entries
    the model may lack, which are dropped; both logged. For fine-tuning recipes that
    replace part of the pretrained network (MAE's global pooling).
  signature: recognises the raw checkpoint (the unpickled object) for auto-detection.
  unsupported: when set, the format is recognised only to fail with this explanation.
  extract: for checkpoints that are not a wrapped state dict (BYOL's Haiku pickle):
    raw, source -> (torch-layout state dict, dropped key -> shape, ignored entries).
  """
  name: str
  publisher: str
  wrappers: tuple[str, ...] = ("state_dict", "model")
  prefixes: tuple[str, ...] = ("module.",)
  require_prefix: bool = False
  common_prefixes: tuple[str, ...] = ()
  drop: tuple[str, ...] = ()
  rename: tuple[tuple[str, str], ...] = ()
  regroup: Callable[[StateDict, str], tuple[StateDict, dict[str, str]]] | None = None
  refuse: tuple[tuple[str, str], ...] = ()
  converter_kw: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  start_fresh: tuple[str, ...] = ()
  unused: tuple[str, ...] = ()
  signature: Callable[[Any], bool] = lambda raw: False
  unsupported: str | None = None
  extract: Callable[[Any, str], tuple[StateDict, dict, list]] | None = None


@dataclasses.dataclass
class Unwrapped:
  """A backbone state dict and the account of how it was taken out of the checkpoint."""
  state_dict: StateDict
  format: str
  wrappers: list[str] = dataclasses.field(default_factory=list)
  ignored_entries: list[str] = dataclasses.field(default_factory=list)
  stripped_prefixes: dict[str, int] = dataclasses.field(default_factory=dict)
  renamed: dict[str, str] = dataclasses.field(default_factory=dict)
  dropped: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  converter_kw: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- signatures -----------------------------------------------------------------------

def _flat_keys(raw: Any) -> list[str]:
  """String keys of the raw checkpoint and of the mappings one or two levels down."""
  if not isinstance(raw, Mapping):
    return []
  keys = [k for k in raw if isinstance(k, str)]
  for value in raw.values():
    if isinstance(value, Mapping):
      keys += [k for k in value if isinstance(k, str)]
      for inner in value.values():
        if isinstance(inner, Mapping):
          keys += [k for k in inner if isinstance(k, str)]
  return keys


def _any_key(pattern: str) -> Callable[[Any], bool]:
  regex = re.compile(pattern)
  return lambda raw: any(regex.search(k) for k in _flat_keys(raw))


def _reference_signature(raw: Any) -> bool:
  """The study's checkpoints: its engine saves 'lossMIN' beside 'state_dict', and its
  classifiers are nn.Sequential(Linear, Sigmoid), saved as fc.0.* / classifier.0.*."""
  if isinstance(raw, Mapping) and "lossMIN" in raw:
    return True
  keys = _flat_keys(raw)
  sigmoid_head = re.compile(r"(^|\.)(fc|classifier)\.0\.weight$")
  mlp_head = re.compile(r"(^|\.)(fc|classifier)\.[1-9]\d*\.weight$")
  return any(sigmoid_head.search(k) for k in keys) and not any(mlp_head.search(k) for k in keys)


def _dino_signature(raw: Any) -> bool:
  return isinstance(raw, Mapping) and "teacher" in raw and "student" in raw


def _simmim_signature(encoder_part: str) -> Callable[[Any], bool]:
  """SimMIM's pretraining model: encoder.mask_token beside the encoder's `encoder_part`."""
  mask_token, encoder = _any_key(r"^encoder\.mask_token$"), _any_key(
      rf"^encoder\.{encoder_part}\.")
  return lambda raw: mask_token(raw) and encoder(raw)


# --- layouts that differ from timm's ----------------------------------------------------

def _fuse_qv_biases(state_dict: StateDict, source: str) -> tuple[StateDict, dict[str, str]]:
  """BEiT-style attention (SimMIM's ViT) keeps the q and v biases apart and has no k bias;
  timm's qkv.bias is their concatenation with zeros for k, which computes the same."""
  out, renamed = {}, {}
  for key, value in state_dict.items():
    if key.endswith(".attn.v_bias"):
      continue  # Fused with its q_bias.
    if not key.endswith(".attn.q_bias"):
      out[key] = value
      continue
    attn = key[:-len("q_bias")]
    if attn + "v_bias" not in state_dict:
      raise ValueError(f"{source}: {key} has no {attn}v_bias beside it.")
    out[attn + "qkv.bias"] = np.concatenate(
        [value, np.zeros_like(value), state_dict[attn + "v_bias"]])
    renamed.update({key: attn + "qkv.bias", attn + "v_bias": attn + "qkv.bias"})
  return out, renamed


# --- the table ------------------------------------------------------------------------

_DINO = dict(prefixes=("module.backbone.", "backbone."), require_prefix=True,
             signature=_dino_signature)
# Prefixes of a sub-module saved on its own, which the study's loader strips (its Version2
# models.py: 'backbone.', 'encoder.'; 'swin_model.' for its segmentation encoders).
_SUBMODULE_PREFIXES = ("backbone.", "encoder.", "swin_model.")
# RadImageNet's Backbone holds the torchvision model's children but the classifier in an
# nn.Sequential `backbone`, saved as its state dict: ResNet-50's conv1, bn1, relu, maxpool,
# layer1..4, avgpool are indices 0..8 (BMEII-AI/RadImageNet pytorch_example.ipynb:
# children()[:9]; the study's loader renames them so), DenseNet-121's `features` index 0.
_RADIMAGENET_RENAMES = (
    (r"^backbone\.0\.weight$", "conv1.weight"),
    (r"^backbone\.1\.", "bn1."),
    *((rf"^backbone\.{i + 4}\.", f"layer{i + 1}.") for i in range(4)),
    (r"^backbone\.0\.", "features."),
)
# microsoft/SimMIM main_simmim.py saves {'model': SimMIM.state_dict(), 'optimizer',
# 'lr_scheduler', 'max_accuracy', 'epoch', 'config'[, 'amp']}; SimMIM holds `encoder` (the
# backbone, with the mask token) and `decoder` (a 1x1 conv + pixel shuffle). Its
# fine-tuning loader (utils.load_pretrained) keeps encoder.* without the prefix.
_SIMMIM = dict(wrappers=("model",), prefixes=("encoder.",), require_prefix=True,
               drop=(r"^mask_token$",))

# Order matters for detection: the first format whose signature matches is used; `plain`
# (no signature) is the fallback.
FORMATS: tuple[Format, ...] = (
    # Before beit: SimMIM's ViT shares BEiT's relative position bias and layer scale keys.
    Format("simmim", "microsoft/SimMIM pretraining checkpoint of a Swin (relative position "
           "tables resized as its fine-tuning loader does: geometric offsets, cubic spline)",
           converter_kw={"table_interpolation": "cubic"},
           refuse=((r"^absolute_pos_embed$", "this Swin was pretrained with an absolute "
                    "position embedding (APE), which the Swin here, as timm's, does not have."),),
           signature=_simmim_signature("layers"), **_SIMMIM),
    Format("simmim_vit", "microsoft/SimMIM pretraining checkpoint of a ViT (q/v biases fused "
           "into timm's qkv bias)",
           regroup=_fuse_qv_biases, refuse=(
               (r"^rel_pos_bias\.|^blocks\.\d+\.attn\.relative_position_bias_table$",
                "this ViT was pretrained with relative position biases (USE_SHARED_RPB or "
                "USE_RPB, as SimMIM's published ViT-B), which the ViT here, as timm's, does "
                "not have: it has absolute position embeddings only. SimMIM ViTs pretrained "
                "with USE_APE and without relative position bias or layer scale load."),
               (r"^blocks\.\d+\.gamma_[12]$",
                "this ViT was pretrained with layer scale (INIT_VALUES, gamma_1/gamma_2), "
                "which the ViT here, as timm's vit_* models, does not have."),
           ), signature=_simmim_signature("blocks"), **_SIMMIM),
    Format("beit", "microsoft/unilm beit",
           signature=_any_key(r"(^|\.)rel_pos_bias\.|blocks\.\d+\.gamma_1$"),
           unsupported="BEiT checkpoints need relative position biases and layer scale "
           "(rel_pos_bias, blocks.N.gamma_1/gamma_2) that the ViT here does not have; "
           "fine-tune a ViT from a DINO, MoCo v3 or MAE checkpoint instead."),
    Format("byol", "google-deepmind/deepmind-research byol (Haiku pickle, online network)",
           signature=haiku_pickle.is_byol, extract=haiku_pickle.byol_backbone),
    Format("reference", "jlianglab/BenchmarkTransferLearning (the study's own and "
           "domain-adapted checkpoints)", common_prefixes=_SUBMODULE_PREFIXES,
           rename=((r"^(fc|classifier)\.0\.", r"\1."),), signature=_reference_signature),
    Format("moco", "facebookresearch/moco (v1, v2); salesforce/PCL (v1, v2)",
           wrappers=("state_dict",), prefixes=("module.encoder_q.", "encoder_q."),
           require_prefix=True, drop=(r"^fc\.",), signature=_any_key(r"(^|\.)encoder_q\.")),
    Format("mocov3", "facebookresearch/moco-v3",
           wrappers=("state_dict",), prefixes=("module.base_encoder.", "base_encoder."),
           require_prefix=True, drop=(r"^(fc|head)\.",),
           signature=_any_key(r"(^|\.)base_encoder\.")),
    Format("swav", "facebookresearch/swav (SwAV, DeepCluster-v2, SeLa-v2)",
           wrappers=("state_dict",), drop=(r"^projection_head\.", r"^prototypes\."),
           signature=_any_key(r"^(module\.)?(projection_head|prototypes)\.")),
    Format("pycontrast", "HobbitLong/PyContrast (InsDis, PIRL, InfoMin; 'model' holds the "
           "DDP-wrapped online network, 'model_ema' its momentum copy)",
           wrappers=("model",), prefixes=("module.encoder.", "encoder."), require_prefix=True,
           signature=lambda raw: isinstance(raw, Mapping) and isinstance(
               raw.get("model"), Mapping) and any(
                   str(k).startswith("module.encoder.") for k in raw["model"])),
    Format("dino", "facebookresearch/dino full checkpoint, teacher network", wrappers=(
        "teacher",), **_DINO),
    Format("dino_student", "facebookresearch/dino full checkpoint, student network",
           wrappers=("student",), **{**_DINO, "signature": lambda raw: False}),
    # Its own backbone keys (net.0.0.weight, ...) are renamed by models/resnet.py's converter.
    Format("simclrv2", "Separius/SimCLRv2-Pytorch conversions of google-research/simclr v2 "
           "({'resnet': backbone, 'head': contrastive projection head})",
           wrappers=("resnet",), signature=lambda raw: isinstance(raw, Mapping) and isinstance(
               raw.get("resnet"), Mapping) and "net.0.0.weight" in raw["resnet"]),
    # Into a global-pool ViT as MAE's main_finetune.py does it: fc_norm starts fresh and the
    # encoder's final norm goes unused (its model deletes it).
    Format("mae", "facebookresearch/mae (pretraining checkpoints: decoder dropped)",
           wrappers=("model",), prefixes=(), drop=(r"^decoder_", r"^mask_token$"),
           start_fresh=(r"^params/fc_norm/",), unused=(r"^params/norm/",),
           signature=_any_key(r"^(decoder_|mask_token$)")),
    # Unet/UPerNet state dicts; smp's optional classification head (aux_params) has no
    # counterpart in models/unet.py and models/upernet.py.
    Format("smp", "qubvel-org/segmentation_models.pytorch (encoder., decoder., "
           "segmentation_head. keys)", drop=(r"^classification_head\.",),
           signature=_any_key(r"^(module\.)?(decoder|segmentation_head)\.")),
    Format("radimagenet", "BMEII-AI/RadImageNet PyTorch weights (ResNet-50, DenseNet-121: "
           "the state dict of a `backbone` nn.Sequential of torchvision's children)",
           rename=_RADIMAGENET_RENAMES, signature=_any_key(r"^(module\.)?backbone\.\d+\.")),
    Format("plain", "a state dict as torchvision/timm save it, optionally under 'state_dict'/"
           "'model', DDP's 'module.' and a sub-module's 'backbone.'/'encoder.'/'swin_model.' "
           "(Barlow Twins, DINO backbone-only files, timm, Microsoft Swin)",
           common_prefixes=_SUBMODULE_PREFIXES),
)
_BY_NAME = {f.name: f for f in FORMATS}


def names() -> list[str]:
  return [f.name for f in FORMATS]


def get(name: str) -> Format:
  if name not in _BY_NAME:
    raise ValueError(f"Unknown checkpoint format {name!r}; known: {', '.join(_BY_NAME)}")
  return _BY_NAME[name]


def detect(raw: Any) -> Format:
  """The first format in FORMATS whose signature matches; `plain` otherwise."""
  return next((f for f in FORMATS if f.signature(raw)), _BY_NAME["plain"])


def unwrap(raw: Any, fmt: Format, source: str) -> Unwrapped:
  """The backbone state dict of `raw` as `fmt` stores it. `source` names the file in errors."""
  if fmt.unsupported:
    raise ValueError(f"{source}: recognised as {fmt.name} ({fmt.publisher}). {fmt.unsupported}")
  if fmt.extract:
    state_dict, dropped, ignored = fmt.extract(raw, source)
    return Unwrapped(state_dict, fmt.name, ignored_entries=ignored, dropped=dropped)
  wrappers, ignored = [], []
  obj = raw
  while isinstance(obj, Mapping):
    wrapper = next((k for k in fmt.wrappers if isinstance(obj.get(k), Mapping)), None)
    if wrapper is None:
      break
    ignored += [f"{'.'.join(wrappers + [str(k)])}" for k in obj if k != wrapper]
    wrappers.append(wrapper)
    obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{source}: expected a state dict (name -> tensor) for format "
                     f"{fmt.name}, got {type(obj).__name__}")
  out = Unwrapped({}, fmt.name, wrappers, ignored, converter_kw=dict(fmt.converter_kw))
  entries = []  # (checkpoint key, key without prefixes, value)
  for key, value in obj.items():
    if not isinstance(value, np.ndarray):
      raise ValueError(f"{source}: entry {'.'.join(wrappers + [str(key)])!r} is a "
                       f"{type(value).__name__}, not a tensor; pass a checkpoint holding "
                       "only the model's state dict, or name its format explicitly "
                       f"(FORMAT:PATH, formats: {', '.join(_BY_NAME)}).")
    prefix = next((p for p in fmt.prefixes if key.startswith(p)), None)
    if prefix is None and fmt.require_prefix:
      out.dropped[key] = value.shape
      continue
    if prefix:
      out.stripped_prefixes[prefix] = out.stripped_prefixes.get(prefix, 0) + 1
    entries.append((key, key[len(prefix):] if prefix else key, value))
  common = next((p for p in fmt.common_prefixes
                 if entries and all(k.startswith(p) for _, k, _ in entries)), None)
  if common:
    entries = [(key, k[len(common):], value) for key, k, value in entries]
    out.stripped_prefixes[common] = len(entries)

  drop = [re.compile(p) for p in fmt.drop]
  rename = [(re.compile(p), r) for p, r in fmt.rename]
  for key, stripped, value in entries:
    if any(r.search(stripped) for r in drop):
      out.dropped[key] = value.shape
      continue
    new = stripped
    for regex, replacement in rename:
      new = regex.sub(replacement, new)
    if new != stripped:
      out.renamed[stripped] = new
    # bf16/fp8 arrive as ml_dtypes types (numpy kind 'V') numpy cannot compute with.
    out.state_dict[new] = value.astype(np.float32) if value.dtype.kind == "V" else value
  for pattern, reason in fmt.refuse:
    hit = next((k for k in out.state_dict if re.search(pattern, k)), None)
    if hit is not None:
      raise ValueError(f"{source}: recognised as {fmt.name} ({fmt.publisher}); its key "
                       f"{hit!r} shows that {reason}")
  if fmt.regroup:
    out.state_dict, regrouped = fmt.regroup(out.state_dict, source)
    out.renamed.update(regrouped)
  return out
