"""Pretrained checkpoints -> Flax variables of a registered model, loaded safely.

Reading never executes code from the file (.pth through a restricted unpickler, BYOL's
Haiku .pkl likewise, .safetensors, .npz without pickles). What the file holds is found by
key signature (weights/formats.py: the study's own checkpoints, MoCo, SwAV, PyContrast,
DINO, MoCo v3, MAE, SimMIM, BYOL, RadImageNet, plain state dicts) and unwrapped to the
backbone's state dict, with everything stripped or dropped logged. Merging is by flattened
parameter path into freshly initialised variables, as big_vision does: every tensor must
fit except the classifier, which is re-initialised (as its family registers: `head_init`)
unless `keep_head`, and what the format's fine-tuning recipe starts anew; anything else
that does not fit is an error naming the keys and shapes on both sides.

Segmentation models (`unet_<encoder>`, `upernet_<encoder>`; models/decoders.py) load the
same sources. A checkpoint of the encoder alone (any classification checkpoint, run or
convert folder of that architecture) fills the `encoder` sub-tree, with the encoder's
classifier and final norm dropped, and the decoder and heads start fresh; a whole
segmentation checkpoint (segmentation_models_pytorch's Unet/UPerNet, or a run of this
project) must fit everything but the heads. The registry's `encoder`, `encoder_path` and
`auxiliary_heads` entries drive this; nothing depends on model names.

Sources `load` accepts (also as --config.model.init):
  PATH             a checkpoint file, format detected
  FORMAT:PATH      a checkpoint file in the named format (formats.names(), e.g. dino_student)
  DIR              a directory written by `python -m medbench_jax.convert`
  run:WORKDIR      the best checkpoint of an earlier run (optionally run:WORKDIR/trial_K)
  timm:NAME.TAG    timm weights from the Hugging Face hub cache (downloaded when online)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import inspect
import os
import re
from typing import Any
import zipfile

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from medbench_jax import models
from medbench_jax.weights import formats
from medbench_jax.weights import haiku_pickle
from medbench_jax.weights import safetensors_file
from medbench_jax.weights import sources
from medbench_jax.weights import torch_pickle
from medbench_jax.weights.torch_pickle import UnsafeCheckpointError  # noqa: F401  (re-export)

_PICKLE_EXTENSIONS = (".pkl", ".pickle")
# Error messages list at most this many keys per category.
_MAX_LISTED = 30


def read_checkpoint(path: str) -> Any:
  """The object stored in `path`, tensors as numpy arrays: .safetensors and .npz by
  extension, BYOL-style Haiku pickles (.pkl), anything else as a torch.save file."""
  ext = os.path.splitext(path)[1].lower()
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Checkpoint {path} does not exist")
  if ext == ".safetensors":
    return safetensors_file.load(path)
  if ext == ".npz":
    with np.load(path, allow_pickle=False) as npz:
      return dict(npz)
  if ext in _PICKLE_EXTENSIONS and not zipfile.is_zipfile(path):
    return haiku_pickle.load(path)
  return torch_pickle.load(path)


def _split_source(path: str) -> tuple[formats.Format | None, str]:
  """('moco', '/x.pth') for 'moco:/x.pth'; (None, path) without a format prefix."""
  name, sep, rest = path.partition(":")
  if sep and name in formats.names():
    return formats.get(name), rest
  return None, path


def read_state_dict(path: str) -> formats.Unwrapped:
  """The backbone state dict in the checkpoint `path` ('FORMAT:PATH' names the format,
  otherwise it is detected), with the account of what was stripped and dropped."""
  fmt, path = _split_source(path)
  raw = read_checkpoint(path)
  return formats.unwrap(raw, fmt or formats.detect(raw), path)


@dataclasses.dataclass
class LoadReport:
  """What `load` did, for logs and the convert CLI's summary."""
  source: str
  format: str
  num_loaded: int  # values (not tensors) taken from the checkpoint
  dropped: dict[str, tuple[int, ...]]  # checkpoint key -> shape, with the reason below
  dropped_reason: dict[str, str]
  reinitialised: dict[str, tuple[int, ...]]  # Flax path -> shape
  unwrapped: formats.Unwrapped | None = None


def _log_unwrapped(n: formats.Unwrapped, path: str) -> None:
  logging.info("%s: format %s%s", path, n.format,
               f", weights under {'/'.join(n.wrappers)}" if n.wrappers else "")
  if n.ignored_entries:
    logging.info("Ignored checkpoint entries (not weights of this network): %s",
                 ", ".join(n.ignored_entries))
  for prefix, count in n.stripped_prefixes.items():
    logging.info("Stripped prefix %r from %d keys", prefix, count)
  if n.renamed:
    logging.info("Renamed: %s", ", ".join(f"{a} -> {b}" for a, b in n.renamed.items()))
  if n.dropped:
    logging.info("Dropped %d entries that are not part of the backbone: %s", len(n.dropped),
                 ", ".join(f"{k} {tuple(s)}" for k, s in n.dropped.items()))


def _read_variables(name: str, path: str, model_kw: Mapping[str, Any]
                    ) -> tuple[dict[str, Any], formats.Unwrapped | None, str, str]:
  """(flat Flax variables, unwrapping report or None, format name, readable source)."""
  if path.startswith(sources.RUN_PREFIX):
    flat, ckpt = sources.read_run(path)
    return flat, None, "run", ckpt
  if path.startswith(sources.TIMM_PREFIX):
    path = sources.resolve_timm(path)
  if os.path.isdir(path):
    if not sources.is_converted(path):
      raise ValueError(f"{path} is a directory but not one written by medbench_jax.convert "
                       f"(no {sources.CONVERTED_INFO}).")
    flat, info = sources.read_converted(path)
    if info["model"] not in (name, models.pretrained_cfg(name).get("encoder")):
      raise ValueError(f"{path} holds {info['model']} weights (converted from "
                       f"{info.get('source')}), not {name}.")
    return flat, None, "converted", path
  unwrapped = read_state_dict(path)
  _log_unwrapped(unwrapped, path)
  convert = models.converter(name)
  options = unwrapped.converter_kw
  accepted = inspect.signature(convert).parameters
  if any(option not in accepted for option in options):
    raise ValueError(f"{path}: {unwrapped.format} checkpoints are converted with {options}, "
                     f"which the converter of {name} does not take; is it a checkpoint of "
                     "this architecture?")
  flat = _flatten(convert(unwrapped.state_dict, model_kw, **options))
  return flat, unwrapped, unwrapped.format, path


def _sum_input_channels(loaded: dict[str, Any], first_conv: str, in_chans: int) -> None:
  """Adapts the first conv to 1-channel input as timm does: the RGB kernels summed."""
  key = f"params/{first_conv}/kernel"
  kernel = np.asarray(loaded[key])  # HWIO
  if kernel.shape[2] == in_chans:  # Adapted already (a convert output).
    return
  if in_chans != 1 or kernel.shape[2] != 3:
    raise ValueError(f"in_chans={in_chans}: only 3 -> 1 channel adaptation is supported, "
                     f"{key} has {kernel.shape[2]} input channels")
  loaded[key] = kernel.sum(axis=2, keepdims=True)
  logging.info("Summed the RGB kernels of %s for 1-channel input", key)


def _under(key: str, path: str) -> bool:
  """Whether the flat variable `key` ('params/encoder/conv1/kernel') lies in the sub-tree
  `path` ('encoder') of any collection."""
  return key.split("/", 1)[1].startswith(path + "/")


def _place_encoder(loaded: dict[str, Any], encoder_path: str) -> tuple[dict[str, Any], bool]:
  """A segmentation model's variables from a checkpoint: (variables, whether they hold the
  encoder alone). Trees of the encoder by itself move under `encoder_path`."""
  if not any(_under(k, encoder_path) for k in loaded):
    loaded = {k.replace("/", f"/{encoder_path}/", 1): v for k, v in loaded.items()}
  return loaded, all(_under(k, encoder_path) for k in loaded)


def _ordered(keys: list[str]) -> list[str]:
  """Parameters before batch statistics: they tell the architecture apart more readably."""
  return sorted(keys, key=lambda k: (not k.startswith("params/"), k))


def _describe(keys: list[str], shape_of: Mapping[str, Any]) -> str:
  lines = [f"    {k} {tuple(shape_of[k].shape)}" for k in _ordered(keys)[:_MAX_LISTED]]
  if len(keys) > _MAX_LISTED:
    lines.append(f"    ... and {len(keys) - _MAX_LISTED} more")
  return "\n".join(lines)


def load(name: str, path: str, num_classes: int, keep_head: bool = False, seed: int = 0,
         in_chans: int = 3, **model_kw: Any) -> dict[str, Any]:
  """Variables ({'params', ['batch_stats']}) of `models.create(name, num_classes, **model_kw)`
  initialised from `path` (any source in the module docstring).

  The classifier (the pretrained config's `classifier` path, and its `auxiliary_heads`) is
  dropped from the checkpoint and keeps its fresh initialisation (the family's registered
  `head_init`: normal std 0.01 for ResNet/DenseNet, truncated normal std 0.02 for
  ConvNeXt/ViT/Swin, zero bias; segmentation heads as segmentation_models_pytorch draws
  them; `seed` drives it) unless `keep_head`, in which case it is loaded and must match
  `num_classes`. Segmentation models also take checkpoints of their encoder alone (module
  docstring). `in_chans=1` sums the first conv's RGB kernels for grayscale input. Raises
  ValueError listing missing keys, unexpected keys and shape mismatches (with shapes)
  otherwise.
  """
  return load_with_report(name, path, num_classes, keep_head, seed, in_chans, **model_kw)[0]


def load_with_report(name: str, path: str, num_classes: int, keep_head: bool = False,
                     seed: int = 0, in_chans: int = 3, **model_kw: Any
                     ) -> tuple[dict[str, Any], LoadReport]:
  """`load`, and the LoadReport of what was taken, dropped and re-initialised."""
  model = models.create(name, num_classes, **model_kw)
  cfg = models.pretrained_cfg(name)
  loaded, unwrapped, fmt, source = _read_variables(name, path, model_kw)
  encoder_only = False
  if "encoder_path" in cfg:
    loaded, encoder_only = _place_encoder(loaded, cfg["encoder_path"])
  if in_chans != cfg["input_size"][2]:
    _sum_input_channels(loaded, cfg["first_conv"], in_chans)

  # Models with a fixed input size (Swin, ViT) declare it; the others accept the default one.
  img_size = getattr(model, "img_size", None) or cfg["input_size"][:2]
  img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
  dummy = jnp.zeros((1, *img_size, in_chans), jnp.float32)
  init = lambda rng: _flatten(model.init(rng, dummy))
  rng = jax.random.PRNGKey(seed)
  shapes_of = lambda module: jax.eval_shape(lambda r: _flatten(module.init(r, dummy)), rng)
  fresh = shapes_of(model)

  dropped, may_start_fresh = _set_aside(loaded, model, cfg, keep_head, encoder_only,
                                        shapes_of, fresh)
  # What the format's fine-tuning recipe starts anew or leaves unused (MAE's global pool).
  recipe = formats.get(unwrapped.format) if unwrapped else None
  fresh_ok, unused_ok = (recipe.start_fresh, recipe.unused) if recipe else ((), ())
  recipe_fresh = [k for k in fresh if k not in loaded and _matches(fresh_ok, k)]
  dropped.update({k: (loaded.pop(k).shape, f"not used by this model ({fmt} fine-tuning)")
                  for k in sorted(loaded) if k not in fresh and _matches(unused_ok, k)})
  missing = [k for k in fresh if k not in loaded and k not in recipe_fresh
             and not may_start_fresh(k)]
  unexpected = [k for k in loaded if k not in fresh]
  mismatched = [k for k in loaded if k in fresh and loaded[k].shape != fresh[k].shape]
  if missing or unexpected or mismatched:
    parts = [f"Checkpoint {source} ({fmt}) does not fit model {name} (num_classes="
             f"{num_classes}, keep_head={keep_head}, {model_kw or 'default architecture'}):"]
    if missing:
      parts.append(f"  missing in the checkpoint ({len(missing)}), model shapes:\n"
                   + _describe(missing, fresh))
    if unexpected:
      parts.append(f"  unexpected in the checkpoint ({len(unexpected)}), checkpoint shapes:\n"
                   + _describe(unexpected, loaded))
    if mismatched:
      parts.append(f"  shape mismatches ({len(mismatched)}), checkpoint vs model:\n" + "\n".join(
          f"    {k} {loaded[k].shape} vs {tuple(fresh[k].shape)}"
          for k in _ordered(mismatched)[:_MAX_LISTED]))
    parts.append("Check that the checkpoint is for this architecture; Flax paths mirror the "
                 "PyTorch keys ('layer1.0.conv1.weight' -> params/layer1_0/conv1/kernel). "
                 "If the checkpoint's format was misdetected, name it: FORMAT:PATH with "
                 f"FORMAT one of {', '.join(formats.names())}.")
    raise ValueError("\n".join(parts))

  reinit = sorted(k for k in fresh if k not in loaded)
  # Only the re-initialised leaves leave the jitted init: XLA prunes the random draws of
  # all others, which on CPU would cost more than everything else here.
  variables = jax.jit(lambda rng: {k: v for k, v in init(rng).items() if k in reinit})(rng)
  variables.update((k, jnp.asarray(v, fresh[k].dtype)) for k, v in loaded.items())
  report = LoadReport(
      source=source, format=fmt, num_loaded=sum(int(np.size(v)) for v in loaded.values()),
      dropped={**(unwrapped.dropped if unwrapped else {}),
               **{k: shape for k, (shape, _) in dropped.items()}},
      dropped_reason={**{k: "not part of the backbone" for k in
                         (unwrapped.dropped if unwrapped else {})},
                      **{k: reason for k, (_, reason) in dropped.items()}},
      reinitialised={k: tuple(fresh[k].shape) for k in reinit}, unwrapped=unwrapped)
  logging.info("Loaded %d tensors (%d values) of %s from %s%s.", len(loaded),
               report.num_loaded, name, source,
               f" into its encoder ({cfg['encoder']})" if encoder_only else "")
  for reason in sorted({reason for _, reason in dropped.values()}):
    logging.info("Dropped from the checkpoint (%s): %s", reason, ", ".join(
        f"{k} {shape}" for k, (shape, r) in dropped.items() if r == reason))
  if recipe_fresh:
    logging.info("Freshly initialised (not in the checkpoint, as %s fine-tuning starts them): "
                 "%s", fmt, ", ".join(f"{k} {fresh[k].shape}" for k in recipe_fresh))
  heads = _head_paths(cfg)
  reinit_head = [k for k in reinit if k not in recipe_fresh and _under_any(k, heads)]
  if reinit_head:
    logging.info("Re-initialised the classifier (%s, seed %d) for %d classes: %s",
                 getattr(model, "head_init", "the model's own init"), seed, num_classes,
                 ", ".join(f"{k} {fresh[k].shape}" for k in reinit_head))
  reinit_rest = [k for k in reinit if k not in recipe_fresh and k not in reinit_head]
  if reinit_rest:
    logging.info("Freshly initialised (not in an encoder checkpoint; the model's "
                 "initialisers, seed %d): %s", seed,
                 ", ".join(f"{k} {fresh[k].shape}" for k in reinit_rest))
  return traverse_util.unflatten_dict(variables, sep="/"), report


def _head_paths(cfg: Mapping[str, Any]) -> list[str]:
  """The classifier and any auxiliary heads (UperNet's deep supervision) of a model."""
  return [cfg["classifier"], *cfg.get("auxiliary_heads", ())]


def _under_any(key: str, paths: list[str]) -> bool:
  return any(_under(key, path) for path in paths)


def _set_aside(loaded: dict[str, Any], model: Any, cfg: Mapping[str, Any], keep_head: bool,
               encoder_only: bool, shapes_of: Callable[[Any], Mapping[str, Any]],
               fresh: Mapping[str, Any]
               ) -> tuple[dict[str, tuple[tuple[int, ...], str]], Callable[[str], bool]]:
  """Takes out of `loaded` what the model does not use: the heads (the classifier and any
  `auxiliary_heads`) unless keep_head, and for a segmentation model given its encoder alone,
  the encoder's classifier and final norm. Returns (dropped key -> (shape, reason), whether a
  model variable may start fresh instead of coming from the checkpoint).
  `shapes_of(module)` is the flat variable shapes of a module at the model's input size."""
  heads = _head_paths(cfg)
  in_head = lambda k: _under_any(k, heads)
  # Auxiliary heads are training aids: one the checkpoint lacks starts fresh even with
  # keep_head (smp has none); the classifier must be there to be kept.
  absent = [h for h in cfg.get("auxiliary_heads", ()) if not any(_under(k, h) for k in loaded)]
  kept = lambda k: keep_head and in_head(k) and not _under_any(k, absent)
  if encoder_only:
    path = cfg["encoder_path"]
    # The encoder built as a classifier has these beyond what the decoder reads.
    classifier = getattr(model, path).clone(parent=None, num_classes=1)
    unused = {k.replace("/", f"/{path}/", 1) for k in shapes_of(classifier)} - set(fresh)
    reason = f"{cfg['encoder']}'s classifier or final norm, which the decoder does not use"
    return ({k: (loaded.pop(k).shape, reason) for k in sorted(loaded) if k in unused},
            lambda k: not _under(k, path) and not kept(k))
  dropped = {} if keep_head else {k: (loaded.pop(k).shape, "classifier (keep_head=False)")
                                  for k in sorted(loaded) if in_head(k)}
  return dropped, lambda k: in_head(k) and not kept(k)


def _matches(patterns: tuple[str, ...], key: str) -> bool:
  return any(re.search(p, key) for p in patterns)


def _flatten(variables: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.flatten_dict(variables, sep="/")
