r"""Exports a finished run's model to PyTorch: safetensors weights, a config and a model card.

  python -m medbench_jax.export --workdir=workdirs/swin_demo --out=exports/swin_demo
  python -m medbench_jax.export --workdir=RUN --out=DIR --trial=2 --format=torchvision
  python -m medbench_jax.export --workdir=SEG_RUN --out=DIR --format=smp

Writes, in DIR (a local folder or gs://...):
  model.safetensors  trial K's best checkpoint as the state dict of the format's model:
                     timm (resnet, densenet, convnext, swin, vit), torchvision (resnet,
                     densenet) or segmentation_models_pytorch (unet_<resnet|densenet|
                     convnext>, upernet_<convnext|swin>); names and layouts are PyTorch's
  config.json        timm: its hub layout (architecture, num_classes, num_features,
                     global_pool, label_names, model_args, pretrained_cfg with mean, std,
                     input_size, interpolation, crop_pct, ...), which
                     `timm.create_model("local-dir:DIR", pretrained=True)` loads; smp: the
                     model's arguments and `_model_class`, which `smp.from_pretrained(DIR)`
                     loads, the same preprocessing fields under `_pretrained_cfg`;
                     torchvision: the builder (`torchvision.models.get_model`) and its
                     arguments, and the preprocessing fields
  README.md          the model card: data set, licence and access tier, protocol, test
                     metrics (with their intervals where results.json has them), provenance

The trial: `--trial=K`, or by default the run's median trial, the one whose test metric
(results.json's `metric`: mean AUC or Dice) is the median of the finished trials (the lower
of the two middle ones for an even count, ties by trial index): a typical model of the run,
not the best test score picked after the fact. A run without any test metric exports trial 0.

The weights are converted back by one rule, the inverse of the forward layout conversion
(models.common.convert_torch_state_dict: conv kernel HWIO -> OIHW weight, dense kernel ->
its transpose, norm scale -> weight, batch_stats mean/var -> running_mean/var, Flax names
`stages_0` -> `stages.0`), plus per format the few names the forward converters rename
(`_TORCH_NAMES`). Every export is then checked against the forward conversion itself: the
model's converter (models.converter) must turn the written state dict back into exactly the
trial's variables, or nothing is written. Torch's BatchNorm counters (num_batches_tracked),
which the forward conversion drops, are written as 0. UperNet's auxiliary head (training
only; smp has none) is left out and named in the card.

Data sets whose terms do not clearly allow publishing trained models (data/prepare/
licences.py, `redistribute_models`; `python -m medbench_jax.prepare --list`) are exported
only with --allow_restricted, and the card then says so at its top.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import datetime
import hashlib
import json
import os
import re
from typing import Any

from absl import app
from absl import flags
from absl import logging
from flax import traverse_util
import ml_collections
import numpy as np
import safetensors.numpy

from medbench_jax import config_lib
from medbench_jax import evaluate
from medbench_jax import models
from medbench_jax import paths
from medbench_jax import tool_flags
from medbench_jax.data import transforms
from medbench_jax.data.prepare import licences
from medbench_jax.models import decoders
from medbench_jax.weights import sources

FORMATS = ("timm", "torchvision", "smp")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"

# --workdir is evaluate's flag (a finished run's workdir), defined when it is imported;
# --out and --trial are tool_flags', which predict and explain share.
_OUT, _TRIAL = tool_flags.OUT, tool_flags.TRIAL
flags.declare_key_flag("out")
flags.declare_key_flag("trial")
_FORMAT = flags.DEFINE_enum("format", "timm", FORMATS, "State-dict names and config layout.")
_ALLOW_RESTRICTED = flags.DEFINE_bool(
    "allow_restricted", False, "Export a model trained on a data set whose terms do not "
    "clearly allow publishing trained models (the card says so).")


class ExportError(ValueError):
  """A run that cannot be exported as asked: the message says why and what would work."""


# --- the families and their PyTorch counterparts --------------------------------------

@dataclasses.dataclass(frozen=True)
class _Family:
  """How one architecture family of models/ appears in PyTorch.

  formats: the formats it exports to. timm_args: the Flax module's fields that timm's
  constructor takes under the same name (written to model_args, so a variant timm does not
  register, e.g. the demo Swins, or a run's model.kw, is rebuilt exactly). fixed: fields
  PyTorch's builders take under no name, which must be the registered model's. timm_base:
  the timm architecture of registered names timm does not have, by pattern; unsupported:
  a pattern of names PyTorch has no builder for. global_pool: timm's pooling name (a field
  name, or a fixed value)."""
  formats: tuple[str, ...]
  timm_args: tuple[str, ...] = ()
  fixed: tuple[str, ...] = ()
  timm_base: Mapping[str, str] = dataclasses.field(default_factory=dict)
  unsupported: str = "$^"
  global_pool: str = "avg"


_FAMILIES = {
    # SimCLR's wider ResNets (width_multiplier 2, 4) have no timm or torchvision builder.
    "ResNet": _Family(("timm", "torchvision"),
                      fixed=("block", "stage_sizes", "width_multiplier", "width_per_group"),
                      timm_base={"resnet50x1": "resnet50"}, unsupported=r"resnet50x[24]"),
    "DenseNet": _Family(("timm", "torchvision"), ("growth_rate", "block_config", "bn_size")),
    "ConvNeXt": _Family(("timm",), ("depths", "dims", "ls_init_value")),
    "SwinTransformer": _Family(
        ("timm",), ("img_size", "patch_size", "embed_dim", "depths", "num_heads",
                    "window_size", "mlp_ratio"),
        timm_base={r"swin_demo_\w+": "swin_tiny_patch4_window7_224"}),
    "VisionTransformer": _Family(
        ("timm",), ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                    "global_pool"), global_pool="global_pool"),
    "UNet": _Family(("smp",)),
    "UperNet": _Family(("smp",)),
}

# Names the forward converters rename, per (family, format): (Flax-side torch prefix, the
# format's prefix). Every other name is the Flax path with dots (models.common).
_TORCH_NAMES = {
    ("SwinTransformer", "timm"): (("head.", "head.fc."),),  # swin.convert_timm: head.fc -> head
}

# smp's encoder of each registered encoder family: its own (`resnet50`, keys encoder.*) or
# timm's through `tu-` (keys encoder.model.*, models/decoders.py). smp's UPerNet has no
# neck for plain ViTs, and its `tu-densenet*` taps other features (decoders.py).
_SMP_ENCODERS = {
    "UNet": {r"resnet\d+": "", r"densenet\d+": "", r"convnext_\w+": "tu-"},
    "UperNet": {r"convnext_\w+": "tu-", r"swin_\w+": "tu-"},
}
_SMP_CLASSES = {"UNet": "Unet", "UperNet": "UPerNet"}


def _family(module: Any) -> tuple[str, _Family]:
  name = type(module).__name__
  if name not in _FAMILIES:
    raise ExportError(f"No PyTorch export for {name} models (families: {sorted(_FAMILIES)}).")
  return name, _FAMILIES[name]


def _json_value(value: Any) -> Any:
  return list(value) if isinstance(value, tuple) else value


def _timm_model(model_name: str, module: Any, in_chans: int) -> tuple[str, dict[str, Any], str]:
  """(timm architecture, model_args, global_pool) of a classification model."""
  _, family = _family(module)
  architecture = next((base for pattern, base in family.timm_base.items()
                       if re.fullmatch(pattern, model_name)), model_name)
  args = {f: _json_value(getattr(module, f)) for f in family.timm_args}
  if in_chans != 3:
    args["in_chans"] = in_chans
  return architecture, args, getattr(module, family.global_pool, family.global_pool)


# --- Flax variables <-> PyTorch state dict ---------------------------------------------

# A Flax name ending in _<digits> is a torch list member: 'stages_0' <- 'stages.0'.
_MEMBER = re.compile(r"_(\d+)(?=_\d|$)")


def flax_to_torch(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The inverse of models.common.convert_torch_state_dict on '/'-flattened variables:
  PyTorch names and layouts, with num_batches_tracked (0) beside each BatchNorm's stats."""
  state = {}
  for path, value in flat.items():
    collection, *module, leaf = path.split("/")
    value = np.asarray(value)
    if collection == "batch_stats":
      leaf = f"running_{leaf}"
    elif leaf == "kernel" and value.ndim == 4:
      leaf, value = "weight", value.transpose(3, 2, 0, 1)
    elif leaf == "kernel" and value.ndim == 2:
      leaf, value = "weight", value.T
    elif leaf == "scale" and value.ndim == 1:
      leaf = "weight"
    prefix = ".".join(_MEMBER.sub(r".\1", m) for m in module)
    key = f"{prefix}.{leaf}" if prefix else leaf
    state[key] = np.ascontiguousarray(value)
    if leaf == "running_mean":
      state[f"{prefix}.num_batches_tracked"] = np.zeros((), np.int64)
  return state


def _rename(state: Mapping[str, np.ndarray], renames: Sequence[tuple[str, str]]
            ) -> dict[str, np.ndarray]:
  def rename(key: str) -> str:
    for old, new in renames:
      if key.startswith(old):
        return new + key[len(old):]
    return key
  return {rename(k): v for k, v in state.items()}


def _smp_encoder_prefix(key: str, timm_universal: bool) -> str:
  """The inverse of decoders._smp_encoder_key: 'layer1.0.conv1.weight' ->
  'encoder.layer1.0.conv1.weight'; for `tu-` encoders 'stages.0.blocks.0.gamma' ->
  'encoder.model.stages_0.blocks.0.gamma'. Uses the forward conversion's own constants, so
  the two directions cannot drift apart."""
  if not timm_universal:
    return f"{decoders.ENCODER}.{key}"
  container, _, rest = key.partition(".")
  index, _, rest = rest.partition(".")
  if container in decoders._TIMM_FLATTENED and index.isdigit():
    return f"{decoders._TIMM_WRAPPER}{container}_{index}.{rest}"
  return decoders._TIMM_WRAPPER + key


@dataclasses.dataclass
class Converted:
  """A state dict of the format, and what it needs to be rebuilt."""
  state_dict: dict[str, np.ndarray]
  config: dict[str, Any]  # the format's config.json, preprocessing fields aside
  left_out: list[str]  # Flax variables the format has no place for


def to_torch(model_name: str, variables: Mapping[str, np.ndarray], fmt: str,
             model_kw: Mapping[str, Any], label_names: Sequence[str]) -> Converted:
  """Flat Flax variables ('params/fc/kernel') of `model_name` -> the format's state dict and
  config; checked against the forward converter (ExportError when it does not invert)."""
  cfg = models.pretrained_cfg(model_name)
  classifier = f"params/{cfg['classifier']}/kernel"
  if classifier not in variables:
    raise ExportError(f"{model_name}: the checkpoint has no classifier {classifier}.")
  num_classes = int(variables[classifier].shape[-1])
  in_chans = int(variables[f"params/{cfg['first_conv']}/kernel"].shape[-2])
  module = models.create(model_name, num_classes, **model_kw)
  family_name, family = _family(module)
  if fmt not in family.formats:
    raise ExportError(f"{model_name} ({family_name}) exports to {', '.join(family.formats)}, "
                      f"not {fmt}.")
  registered = models.create(model_name, num_classes)
  changed = [f for f in family.fixed if getattr(module, f) != getattr(registered, f)]
  if changed or re.fullmatch(family.unsupported, model_name):
    raise ExportError(f"{model_name}{' with ' + str(changed) if changed else ''} has no "
                      f"{fmt} builder.")
  left_out = sorted(k for k in variables
                    if any(f"params/{h}/" in k or k.startswith(f"batch_stats/{h}/")
                           for h in cfg.get("auxiliary_heads", ())))
  kept = {k: v for k, v in variables.items() if k not in left_out}
  if family_name in _SMP_CLASSES:
    state, config = _to_smp(model_name, module, kept, num_classes, in_chans, family_name)
  else:
    state = _rename(flax_to_torch(kept), _TORCH_NAMES.get((family_name, fmt), ()))
    num_features = int(variables[classifier].shape[0])
    config = (_timm_config(model_name, module, num_classes, num_features, in_chans,
                           label_names)
              if fmt == "timm" else
              _torchvision_config(model_name, module, num_classes, in_chans, family))
  _check_inverse(model_name, state, kept, model_kw)
  return Converted(state, config, left_out)


def _check_inverse(model_name: str, state: Mapping[str, np.ndarray],
                   variables: Mapping[str, np.ndarray], model_kw: Mapping[str, Any]) -> None:
  """The forward converter must give back exactly the variables."""
  back = traverse_util.flatten_dict(models.converter(model_name)(dict(state), model_kw), sep="/")
  missing, extra = sorted(set(variables) - set(back)), sorted(set(back) - set(variables))
  differ = [k for k in set(variables) & set(back)
            if np.shape(back[k]) != np.shape(variables[k])
            or not np.array_equal(back[k], variables[k])]
  if missing or extra or differ:
    raise ExportError(f"{model_name}: the exported state dict does not convert back to the "
                      f"checkpoint (missing {missing[:10]}, unexpected {extra[:10]}, "
                      f"different {sorted(differ)[:10]}).")


def _timm_config(model_name: str, module: Any, num_classes: int, num_features: int,
                 in_chans: int, label_names: Sequence[str]) -> dict[str, Any]:
  architecture, args, pool = _timm_model(model_name, module, in_chans)
  return {"architecture": architecture, "num_classes": num_classes,
          "num_features": num_features, "global_pool": pool,
          "label_names": list(label_names), "model_args": args}


def _torchvision_config(model_name: str, module: Any, num_classes: int, in_chans: int,
                        family: _Family) -> dict[str, Any]:
  # torchvision's builders fix the architecture: only the registered shapes export.
  changed = [f for f in family.timm_args + family.fixed
             if getattr(module, f) != getattr(models.create(model_name, num_classes), f)]
  if changed or in_chans != 3:
    raise ExportError(f"torchvision's {model_name} builder takes no {changed or 'in_chans'}; "
                      "export this run with --format=timm.")
  return {"builder": model_name, "kwargs": {"num_classes": num_classes}}


def _to_smp(model_name: str, module: Any, variables: Mapping[str, np.ndarray],
            num_classes: int, in_chans: int, family_name: str
            ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  encoder_name = models.pretrained_cfg(model_name)["encoder"]
  kind = next((v for p, v in _SMP_ENCODERS[family_name].items()
               if re.fullmatch(p, encoder_name)), None)
  if kind is None:
    raise ExportError(f"segmentation_models_pytorch's {_SMP_CLASSES[family_name]} has no "
                      f"{encoder_name} encoder that fits {model_name}.")
  prefix = f"params/{decoders.ENCODER}/", f"batch_stats/{decoders.ENCODER}/"
  encoder_vars = {k.replace(f"/{decoders.ENCODER}/", "/", 1): v for k, v in variables.items()
                  if k.startswith(prefix)}
  encoder_family = _family(module.encoder)[0]
  encoder_state = _rename(flax_to_torch(encoder_vars),
                          _TORCH_NAMES.get((encoder_family, "timm"), ()))
  state = flax_to_torch({k: v for k, v in variables.items() if not k.startswith(prefix)})
  state.update({_smp_encoder_prefix(k, kind == "tu-"): v for k, v in encoder_state.items()})
  config = {"_model_class": _SMP_CLASSES[family_name]}
  timm_name = encoder_name
  if kind == "tu-":
    timm_name, args, _ = _timm_model(encoder_name, module.encoder, in_chans)
    config.update({k: v for k, v in args.items() if k != "in_chans"})
  config.update(encoder_name=f"{kind}{timm_name}", encoder_weights=None,
                in_channels=in_chans, classes=num_classes,
                decoder_channels=_json_value(module.decoder_channels))
  return state, config


# --- the run -----------------------------------------------------------------------------

def median_trial(run: Mapping[str, Any]) -> int:
  """The trial whose test metric is the median (the lower middle one of an even count,
  ties by index); 0 when no trial has one."""
  scored = [(t["test"].get(run["metric"]), k) for k, t in enumerate(run["trials"])]
  scored = sorted((v, k) for v, k in scored if v is not None)
  return scored[(len(scored) - 1) // 2][1] if scored else 0


def _preprocessing(config: ml_collections.ConfigDict, model_name: str, in_chans: int
                   ) -> dict[str, Any]:
  """timm's pretrained_cfg fields of the run's evaluation preprocessing: the crop (or the
  resize) is input_size, crop / resize is crop_pct, the normalisation is mean and std."""
  norm = config_lib.normalization(config)
  resize = crop = None
  interpolation = "area"
  for op in transforms.parse_spec(config.input.pp_eval):
    if op.name == "resize":
      resize = op.arguments["size"]
      interpolation = op.arguments["interpolation"]
    elif op.name == "center_crop":
      crop = op.arguments["size"]
  size = crop or resize or models.pretrained_cfg(model_name)["input_size"][:2]
  size = (size, size) if isinstance(size, int) else tuple(size)
  shorter = min(resize) if isinstance(resize, (tuple, list)) else resize
  crop_pct = round(min(size) / shorter, 4) if crop and shorter else 1.0
  mean, std = tuple(norm["mean"]), tuple(norm["std"])
  if in_chans != len(mean):
    mean, std = mean[:1] * in_chans, std[:1] * in_chans
  return {"input_size": [in_chans, *size], "interpolation": "bilinear", "crop_pct": crop_pct,
          "crop_mode": "center", "mean": list(mean), "std": list(std),
          # timm has no "area"; its antialiased bilinear is the nearest of its options.
          "medbench_interpolation": interpolation}


def export(workdir: str, out: str, trial: int | None = None, fmt: str = "timm",
           allow_restricted: bool = False) -> dict[str, Any]:
  """Writes OUT/model.safetensors, config.json and README.md for trial `trial` (default:
  the median trial) of the finished run in `workdir`; returns a summary."""
  root = paths.as_path(workdir)
  if not (root / "results.json").exists():
    raise ExportError(f"{workdir} has no results.json: not a finished run.")
  run = paths.read_json(root / "results.json")
  config = evaluate.run_config(workdir)
  source = licences.of(run["dataset"])
  if not source.redistribute_models and not allow_restricted:
    raise ExportError(
        f"{run['dataset']} ({source.title}, {source.licence}, access {source.access}): its "
        "terms do not clearly allow publishing trained models "
        f"({source.note or 'see ' + source.url}). "
        "Export with --allow_restricted only if you have the right to; the card will say so.")
  if trial is None:
    trial = median_trial(run)
  if not 0 <= trial < len(run["trials"]):
    raise ExportError(f"--trial={trial}: the run has trials 0..{len(run['trials']) - 1}.")
  flat, ckpt = sources.read_run(f"{sources.RUN_PREFIX}{os.fspath(root / f'trial_{trial}')}")
  flat = {k: np.asarray(v) for k, v in flat.items()}
  model_name, model_kw = config.model.name, config.model.kw.to_dict()
  converted = to_torch(model_name, flat, fmt, model_kw, run["class_names"])
  cfg = models.pretrained_cfg(model_name)
  in_chans = int(flat[f"params/{cfg['first_conv']}/kernel"].shape[-2])
  pre = _preprocessing(config, model_name, in_chans)
  medbench = {"workdir": os.fspath(root), "trial": trial, "checkpoint": ckpt,
              "model": model_name, "model_kw": model_kw, "dataset": run["dataset"],
              "task": run["task"], "pp_eval": config.input.pp_eval,
              "interpolation": pre.pop("medbench_interpolation"),
              "left_out": converted.left_out}
  file_config = _file_config(fmt, converted.config, pre, run, medbench)

  weights_bytes = safetensors.numpy.save(converted.state_dict, metadata={"format": "pt"})
  target = paths.as_path(out)
  target.mkdir(parents=True, exist_ok=True)
  paths.write_atomic(target / WEIGHTS_FILE, weights_bytes)
  paths.write_json(target / CONFIG_FILE, file_config)
  sha = hashlib.sha256(weights_bytes).hexdigest()
  card = model_card(run, config, source, fmt=fmt, trial=trial, converted=converted,
                    preprocessing=pre, weights_sha256=sha, checkpoint=ckpt,
                    restricted=not source.redistribute_models)
  paths.write_atomic(target / CARD_FILE, card)
  logging.info("Exported trial %d of %s (%s) to %s", trial, workdir, fmt, out)
  return {"out": os.fspath(target), "format": fmt, "trial": trial, "model": model_name,
          "tensors": len(converted.state_dict), "sha256": sha,
          "restricted": not source.redistribute_models}


def _file_config(fmt: str, config: dict[str, Any], pre: dict[str, Any], run: Mapping[str, Any],
                 medbench: dict[str, Any]) -> dict[str, Any]:
  """config.json in the format's own layout (module docstring)."""
  if fmt == "timm":
    pretrained = {"architecture": config["architecture"], **pre,
                  "num_classes": config["num_classes"], "label_names": config["label_names"],
                  "license": "other"}
    return {**config, "pretrained_cfg": pretrained, "medbench": medbench}
  if fmt == "smp":
    # smp.from_pretrained passes every key to the model; those starting with "_" it drops.
    return {**config, "_pretrained_cfg": pre, "_label_names": list(run["class_names"]),
            "_medbench": medbench}
  return {**config, "pretrained_cfg": pre, "label_names": list(run["class_names"]),
          "medbench": medbench}


# --- the model card ----------------------------------------------------------------------

def _number(x: Any) -> str:
  return "n/a" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def _intervals(record: Any, path: str = "") -> list[tuple[str, Any, Any, Any]]:
  """(name, value, low, high) of every {"value", "ci_low", "ci_high"} in a trial record."""
  if not isinstance(record, Mapping):
    return []
  if {"value", "ci_low", "ci_high"} <= set(record):
    return [(path, record["value"], record["ci_low"], record["ci_high"])]
  return [row for k, v in record.items() for row in _intervals(v, f"{path}/{k}".strip("/"))]


def model_card(run: Mapping[str, Any], config: ml_collections.ConfigDict,
               source: licences.Source, *, fmt: str, trial: int, converted: Converted,
               preprocessing: Mapping[str, Any], weights_sha256: str, checkpoint: str,
               restricted: bool) -> str:
  """README.md: what the model is, what it was trained on and how, how it scored."""
  record = run["trials"][trial]
  library = {"timm": "timm", "smp": "segmentation-models-pytorch",
             "torchvision": "pytorch"}[fmt]
  lines = ["---", f"library_name: {library}", "license: other",
           f"tags: [medical-imaging, {run['task']}, medbench_jax]",
           f"datasets: [{run['dataset']}]", "---", "",
           f"# {config.model.name} fine-tuned on {source.title}", ""]
  if restricted:
    lines += [
        "> **RESTRICTED: the terms of the training data do not clearly allow publishing "
        f"models trained on it.** {source.title} is distributed under {source.licence} "
        f"(access: {source.access}){'; ' + source.note if source.note else ''}. This export "
        "was made with `--allow_restricted`: share it only as those terms allow.", ""]
  pre = preprocessing
  lines += [
      "## Model", "",
      f"- Architecture: `{config.model.name}` exported as a {fmt} state dict "
      f"(`{WEIGHTS_FILE}`, config in `{CONFIG_FILE}`).",
      f"- Task: {run['task']} ({run.get('dataset_kind', '')}), outputs: "
      + ", ".join(f"`{n}`" for n in run["class_names"]),
      f"- Input: {pre['input_size'][1]}x{pre['input_size'][2]} px, {pre['input_size'][0]} "
      f"channel(s), mean {pre['mean']}, std {pre['std']} (pixels in [0, 1]); evaluation "
      f"preprocessing `{config.input.pp_eval}` (crop_pct {pre['crop_pct']}).",
      f"- Initialisation before fine-tuning: `{run['init']}`.", ""]
  if converted.left_out:
    lines += ["- Not exported (used in training only): "
              + ", ".join(f"`{k}`" for k in converted.left_out), ""]
  lines += _usage(fmt)
  lines += [
      "## Training data", "",
      f"- Data set: `{run['dataset']}`, {source.title}", f"- Licence: {source.licence}",
      f"- Access tier: {source.access}",
      f"- Trained models may be published: {'yes' if source.redistribute_models else 'no'}"
      + (f" ({source.note})" if source.note else ""),
      f"- URL: {source.url}", f"- Citation: {source.citation or source.title}", ""]
  optim, train = config.optim, config.train
  subset = run.get("label_subset", {})
  lines += [
      "## Protocol", "",
      f"- Label fraction: {run['label_fraction']} ({subset.get('num_selected', '?')} of "
      f"{subset.get('num_examples', '?')} training examples, method "
      f"{subset.get('method', '?')})",
      f"- Up to {train.num_epochs} epochs, evaluated every "
      f"{train.eval_every_steps or 'epoch'}{' steps' if train.eval_every_steps else ''}; "
      f"early stopping on the validation loss, patience {train.patience}; the checkpoint "
      "with the lowest validation loss is the one exported.",
      f"- Recipe: {optim.optimizer}, lr {optim.lr}, weight decay {optim.weight_decay}, "
      f"schedule {optim.schedule}, batch {config.input.batch_size}; training preprocessing "
      f"`{config.input.pp_train}`; test preprocessing `{config.input.pp_test}` "
      f"(test-time augmentation: {train.test_tta}).",
      f"- Trials: {len(run['trials'])} (seeds "
      + ", ".join(str(t["seed"]) for t in run["trials"]) + f"); exported: trial {trial} "
      f"(seed {record['seed']}, best step {record['best_step']}, best validation loss "
      f"{_number(record['best_val_loss'])}).", ""]
  summary = run.get("summary", {})
  lines += ["## Test metrics", "",
            f"Headline `{run['metric']}` over the {summary.get('n', '?')} trials: mean "
            f"{_number(summary.get('mean'))}, std {_number(summary.get('std'))} (ddof 1).", "",
            f"Trial {trial}:", "", "| metric | value |", "|---|---|"]
  lines += [f"| {k} | {_number(v)} |" for k, v in sorted(record["test"].items())]
  rows = _intervals({k: v for k, v in record.items() if k != "test"})
  if rows:
    lines += ["", "With bootstrap intervals:", "", "| metric | value | interval |",
              "|---|---|---|"]
    lines += [f"| {n} | {_number(v)} | [{_number(lo)}, {_number(hi)}] |"
              for n, v, lo, hi in rows]
  provenance = run.get("provenance", {})
  lines += ["", "## Provenance", "",
            f"- medbench_jax {provenance.get('version')}, revision "
            f"`{provenance.get('revision')}`",
            f"- Config sha256: `{provenance.get('config_sha256')}`",
            "- Split sha1: " + ", ".join(f"{k} `{v}`" for k, v in
                                         provenance.get("splits_sha1", {}).items()),
            f"- Initial weights: `{provenance.get('weights_file')}` (sha256 "
            f"`{provenance.get('weights_sha256')}`)",
            f"- Trained on: {provenance.get('devices')}",
            f"- Checkpoint: `{checkpoint}`",
            f"- `{WEIGHTS_FILE}` sha256: `{weights_sha256}`",
            f"- Exported {datetime.date.today().isoformat()} by "
            "`python -m medbench_jax.export`.", "",
            "## Limitations", "",
            "A research model, evaluated on the test split above only; not a medical device. "
            "Thresholds, calibration and performance on other populations, scanners and "
            "label definitions are not established by these figures.", ""]
  return "\n".join(lines)


def _usage(fmt: str) -> list[str]:
  code = {
      "timm": ["import timm", "model = timm.create_model('local-dir:PATH', pretrained=True)",
               "cfg = timm.data.resolve_data_config({}, model=model)",
               "transform = timm.data.create_transform(**cfg)"],
      "smp": ["import segmentation_models_pytorch as smp",
              "model = smp.from_pretrained('PATH')"],
      "torchvision": ["import json, safetensors.torch, torchvision",
                      "cfg = json.load(open('PATH/config.json'))",
                      "model = torchvision.models.get_model(cfg['builder'], **cfg['kwargs'])",
                      "model.load_state_dict(safetensors.torch.load_file("
                      "'PATH/model.safetensors'))"],
  }[fmt]
  return ["## Use", "", "```python", *code, "model.eval()", "```", ""]


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = flags.FLAGS.workdir
  if not workdir or not _OUT.value:
    raise app.UsageError("--workdir=RUN and --out=DIR are required.")
  try:
    summary = export(workdir, _OUT.value, _TRIAL.value, _FORMAT.value,
                     _ALLOW_RESTRICTED.value)
  except (ExportError, FileNotFoundError) as e:
    raise SystemExit(f"export: {e}") from None
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
