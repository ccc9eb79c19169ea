"""Reads BYOL's released Haiku checkpoints (deepmind-research/byol, pretrain_res50x1.pkl)
without Haiku, JAX's 2020 classes or BYOL's code, and without running anything in them.

What byol/utils/checkpointing.py writes (`dill.dump(..., protocol=2)`):
  {'experiment_state': _ByolExperimentState(online_params, target_params, online_state,
   target_state, opt_state), 'step': int, 'rng': array}
with the NamedTuple class from byol.byol_experiment (linear-eval checkpoints hold an
_EvalExperimentState(backbone_params, classif_params, backbone_state, ...) instead),
Haiku's params/state as `haiku._src.data_structures.frozendict` (pickled as
frozendict(dict)) of {module path: {name: numpy array}}, and numpy arrays through
numpy's `_reconstruct` / `dtype` and, at protocol 2, `_codecs.encode` for their bytes.

The unpickler resolves exactly those: numpy array reconstruction (object dtypes refused,
so no pickled object can hide in an array), latin-1 `_codecs.encode`, and Haiku's
mappings as plain dicts. Classes of the training code (byol.*, haiku.*, optax.*, jax.*)
become inert `Record`s holding their constructor arguments: the class is never imported
and nothing of it runs. Any other global is refused with UnsafeCheckpointError.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
import pickle
import re
from typing import Any

import numpy as np

from medbench_jax.weights import torch_pickle
from medbench_jax.weights.torch_pickle import UnsafeCheckpointError

# Modules whose classes may appear as inert records (NamedTuple states, optimizer states,
# device arrays); never imported.
_RECORD_MODULES = ("byol.", "haiku.", "optax.", "jax.", "jaxlib.")
_HAIKU_MAPPINGS = {"frozendict", "FrozenDict", "FlatMapping"}
# NamedTuple -> its fields; the backbone's params and state are the first and third.
_STATE_FIELDS = {
    "_ByolExperimentState": ("online_params", "target_params", "online_state",
                             "target_state", "opt_state"),
    "_EvalExperimentState": ("backbone_params", "classif_params", "backbone_state",
                             "backbone_opt_state", "classif_opt_state"),
}


class Record:
  """An object of a training-code class kept as data: `args` from its constructor call,
  `state` from BUILD. Subclassed per class name so NEWOBJ (which needs a type) works."""
  qualified_name = "?"

  def __new__(cls, *args: Any) -> Record:
    self = object.__new__(cls)
    self.args, self.state = args, None
    return self

  def __init__(self, *args: Any):
    del args  # Stored by __new__; REDUCE calls both.

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __repr__(self) -> str:
    return f"Record({self.qualified_name})"


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, path: str):
    super().__init__(file)
    self._path = path
    self._records: dict[str, type] = {}

  def find_class(self, module: str, name: str) -> Any:
    path = self._path
    numpy_stand_in = torch_pickle.numpy_global(module, name, path)
    if numpy_stand_in is not None:
      return numpy_stand_in
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module.startswith("haiku.") and name in _HAIKU_MAPPINGS:
      def mapping(contents):
        if not isinstance(contents, Mapping):
          raise pickle.UnpicklingError(f"{path}: unexpected {module}.{name} contents")
        return dict(contents)
      return mapping
    if module.startswith(_RECORD_MODULES):
      key = f"{module}.{name}"
      if key not in self._records:
        self._records[key] = type(name, (Record,), {"qualified_name": key})
      return self._records[key]
    raise UnsafeCheckpointError(
        f"Refusing to load {path}: its pickle asks for the global {module}.{name}, which is "
        "neither numpy array data nor a class of the BYOL/Haiku training code. A released "
        "BYOL checkpoint never needs it.")


def load(path: str) -> Any:
  """The object pickled in `path`, with numpy arrays and inert `Record`s (see module doc)."""
  with open(path, "rb") as f:
    return _Unpickler(f, path).load()


def is_byol(raw: Any) -> bool:
  return isinstance(raw, Mapping) and _experiment_state(raw) is not None


def _experiment_state(raw: Mapping) -> Record | None:
  state = raw.get("experiment_state")
  if isinstance(state, Record) and state.qualified_name.rsplit(".", 1)[-1] in _STATE_FIELDS:
    return state
  return None


# Haiku module path (under the encoder, e.g. 'res_net50/~/') -> torchvision key prefix.
_HAIKU_TO_TORCH = (
    (r"initial_conv", "conv1"),
    (r"initial_batchnorm", "bn1"),
    (r"block_group_(\d)/~/block_(\d+)/~/conv_(\d)",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}"),
    (r"block_group_(\d)/~/block_(\d+)/~/batchnorm_(\d)",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}"),
    (r"block_group_(\d)/~/block_(\d+)/~/shortcut_conv",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0"),
    (r"block_group_(\d)/~/block_(\d+)/~/shortcut_batchnorm",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1"),
)
_ENCODER = re.compile(r"^res_net\d+/~/")
_LEAF = {"w": "weight", "scale": "weight", "offset": "bias", "b": "bias"}
_EMA = {"mean_ema": "running_mean", "var_ema": "running_var"}


def _torch_module(path: str) -> str | None:
  for pattern, replacement in _HAIKU_TO_TORCH:
    m = re.fullmatch(pattern, path)
    if m:
      return replacement if isinstance(replacement, str) else replacement(m)
  return None


def byol_backbone(raw: Mapping, path: str
                  ) -> tuple[dict[str, np.ndarray], dict[str, tuple], list[str]]:
  """(torchvision-layout state dict of the online ResNet, dropped Haiku entries -> shapes,
  ignored checkpoint entries: target network, optimizer state, step, rng).

  Haiku's ResNet (byol/utils/networks.py on hk.nets.ResNet.BlockGroup, v1.5 bottlenecks)
  has torchvision's structure: initial_conv/initial_batchnorm -> conv1/bn1,
  block_group_G/~/block_B/~/{conv,batchnorm}_I -> layer{G+1}.B.{conv,bn}{I+1},
  shortcut_{conv,batchnorm} -> downsample.{0,1}; BatchNorm statistics are the
  `average` of its mean_ema/var_ema states. The online linear `classifier` becomes `fc`;
  the projector, predictor and the EMAs' hidden/counter states are dropped.
  One difference is kept on purpose: Haiku pads convs and the max pool 'SAME', i.e.
  (0, 1) at stride 2 where torchvision pads (1, 1); the weights run in our torchvision
  ResNet, as in the study, which used BYOL through a torchvision conversion.
  """
  state = _experiment_state(raw)
  if state is None:
    raise ValueError(f"{path}: not a BYOL checkpoint (no experiment_state NamedTuple)")
  fields = _STATE_FIELDS[state.qualified_name.rsplit(".", 1)[-1]]
  params, net_state = state.args[0], state.args[2]
  ignored = [k for k in raw if k != "experiment_state"] + [
      f"experiment_state.{f}" for i, f in enumerate(fields) if i not in (0, 2)]
  out: dict[str, np.ndarray] = {}
  dropped: dict[str, tuple] = {}
  for module, leaves in {**params, **net_state}.items():
    for leaf, value in leaves.items():
      value = np.asarray(value)
      key = None
      if module == "classifier":
        key = f"fc.{_LEAF[leaf]}"
      elif _ENCODER.match(module):
        inner = _ENCODER.sub("", module)
        ema = inner.rsplit("/~/", 1)
        if len(ema) == 2 and ema[1] in _EMA:
          torch_module = _torch_module(ema[0])
          if torch_module and leaf == "average":
            key = f"{torch_module}.{_EMA[ema[1]]}"
        else:
          torch_module = _torch_module(inner)
          if torch_module and leaf in _LEAF:
            key = f"{torch_module}.{_LEAF[leaf]}"
      if key is None:
        dropped[f"{module}/{leaf}"] = value.shape
        continue
      if value.ndim == 4 and leaf == "w":
        value = value.transpose(3, 2, 0, 1)  # Haiku conv HWIO -> torch OIHW.
      elif value.ndim == 2:
        value = value.T  # Haiku linear (in, out) -> torch (out, in).
      else:
        value = value.reshape(-1)  # BatchNorm (1, 1, 1, C) -> (C,).
      out[key] = value
  if not out:
    raise ValueError(f"{path}: no ResNet parameters (res_net*/~/...) in the BYOL checkpoint")
  return out, dropped, ignored
