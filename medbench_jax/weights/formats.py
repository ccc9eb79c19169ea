"""Checkpoint sources: how each publisher wraps its weights, recognised and normalised.

Every pretrained checkpoint the project reads holds a torch-layout state dict of one of
our architectures, wrapped the way its authors' training script saved it: under a key
('state_dict', 'model', 'teacher'), behind prefixes ('module.' from DDP, 'encoder_q.'
from MoCo's query encoder), next to parts that are not the backbone (projection heads,
momentum encoders, queues, prototypes, decoders). `FORMATS` describes each source as
data; `detect` picks one by key signature and `normalise` returns the backbone's state
dict with every key the model's converter expects, plus a `Normalised` report of what
was stripped, renamed and dropped. Nothing is dropped without being listed there, and
`weights.load` logs the report.

Choosing a format explicitly: prefix the path with its name (`moco:/ckpt/x.pth.tar`,
`dino_student:/ckpt/dino.pth`), in `weights.load` and hence in `--config.model.init`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

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
  drop: regexes on the stripped key for backbone-adjacent parts that are not ours
    (projection heads, prototypes, decoders).
  rename: (regex, replacement) on the stripped key, applied in order.
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
  drop: tuple[str, ...] = ()
  rename: tuple[tuple[str, str], ...] = ()
  signature: Callable[[Any], bool] = lambda raw: False
  unsupported: str | None = None
  extract: Callable[[Any, str], tuple[StateDict, dict, list]] | None = None


@dataclasses.dataclass
class Normalised:
  """A backbone state dict and the account of how it was taken out of the checkpoint."""
  state_dict: StateDict
  format: str
  wrappers: list[str] = dataclasses.field(default_factory=list)
  ignored_entries: list[str] = dataclasses.field(default_factory=list)
  stripped_prefixes: dict[str, int] = dataclasses.field(default_factory=dict)
  renamed: dict[str, str] = dataclasses.field(default_factory=dict)
  dropped: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


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


# --- the table ------------------------------------------------------------------------

_DINO = dict(prefixes=("module.backbone.", "backbone."), require_prefix=True,
             signature=_dino_signature)

# Order matters for detection: the first format whose signature matches is used; `plain`
# (no signature) is the fallback.
FORMATS: tuple[Format, ...] = (
    Format("beit", "microsoft/unilm beit",
           signature=_any_key(r"(^|\.)rel_pos_bias\.|blocks\.\d+\.gamma_1$"),
           unsupported="BEiT checkpoints need relative position biases and layer scale "
           "(rel_pos_bias, blocks.N.gamma_1/gamma_2) that the ViT here does not have; "
           "fine-tune a ViT from a DINO, MoCo v3 or MAE checkpoint instead."),
    Format("byol", "google-deepmind/deepmind-research byol (Haiku pickle, online network)",
           signature=haiku_pickle.is_byol, extract=haiku_pickle.byol_backbone),
    Format("reference", "jlianglab/BenchmarkTransferLearning (the study's own and "
           "domain-adapted checkpoints)",
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
    Format("mae", "facebookresearch/mae (pretraining checkpoints: decoder dropped)",
           wrappers=("model",), prefixes=(), drop=(r"^decoder_", r"^mask_token$"),
           signature=_any_key(r"^(decoder_|mask_token$)")),
    # Unet/UPerNet state dicts; smp's optional classification head (aux_params) has no
    # counterpart in models/unet.py and models/upernet.py.
    Format("smp", "qubvel-org/segmentation_models.pytorch (encoder., decoder., "
           "segmentation_head. keys)", drop=(r"^classification_head\.",),
           signature=_any_key(r"^(module\.)?(decoder|segmentation_head)\.")),
    Format("plain", "a state dict as torchvision/timm save it, optionally under 'state_dict'/"
           "'model' and DDP's 'module.' (Barlow Twins, DINO backbone-only files, timm, "
           "Microsoft Swin)"),
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


def normalise(raw: Any, fmt: Format, source: str) -> Normalised:
  """The backbone state dict of `raw` as `fmt` stores it. `source` names the file in errors."""
  if fmt.unsupported:
    raise ValueError(f"{source}: recognised as {fmt.name} ({fmt.publisher}). {fmt.unsupported}")
  if fmt.extract:
    state_dict, dropped, ignored = fmt.extract(raw, source)
    return Normalised(state_dict, fmt.name, ignored_entries=ignored, dropped=dropped)
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
  out = Normalised({}, fmt.name, wrappers, ignored)
  drop = [re.compile(p) for p in fmt.drop]
  rename = [(re.compile(p), r) for p, r in fmt.rename]
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
    stripped = key[len(prefix):] if prefix else key
    if prefix:
      out.stripped_prefixes[prefix] = out.stripped_prefixes.get(prefix, 0) + 1
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
  return out
