"""export.py: a finished run's best checkpoint -> timm / torchvision / smp safetensors with a
config and a model card. Each family's export loads into the PyTorch library with strict
names and shapes and gives the Flax logits (max |diff| printed); imported back through
weights.load it is unchanged; the licence gate, the default trial and the card."""

import json
import subprocess
import sys

from etils import epath
from flax import traverse_util
import jax
import ml_collections
import numpy as np
import optax
import pytest
import safetensors.torch
import segmentation_models_pytorch as smp
import timm
import torch
import torchvision

from medbench_jax import config_lib
from medbench_jax import export
from medbench_jax import models
from medbench_jax import weights
from medbench_jax.models import common
from medbench_jax.trainer import checkpoints
from medbench_jax.trainer import state as trainer_state
from tests import helpers
from tests import parity
from tests.test_models import _init as _random_variables

CLASSES = ("Cardiomegaly", "Nodule", "Effusion")
K = len(CLASSES)
SWIN_TINY = dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                 drop_path_rate=0.0)

# (registered name, model.kw, input size, format): every classification family to timm,
# the CNNs to torchvision too, and each segmentation model smp can rebuild.
CASES = [
    ("resnet18", {}, 32, "timm"),
    ("resnet18", {}, 32, "torchvision"),
    ("densenet121", dict(block_config=(2, 2, 2, 2)), 32, "timm"),
    # torchvision's builder fixes the blocks: the full DenseNet-121 (its compile is slow).
    pytest.param("densenet121", {}, 32, "torchvision", marks=pytest.mark.slow),
    ("convnext_tiny", dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64)), 32, "timm"),
    ("swin_demo_patch4_window4_64", SWIN_TINY, 64, "timm"),
    ("vit_small_patch16_224", dict(img_size=32, depth=2, embed_dim=48, num_heads=2), 32,
     "timm"),
    ("unet_resnet18", {}, 64, "smp"),
    ("unet_convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)), 64, "smp"),
    ("upernet_convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)), 64, "smp"),
    ("upernet_swin_demo_patch4_window4_64", SWIN_TINY, 64, "smp"),
]


def _config(name: str, kw: dict, size: int, dataset: str) -> ml_collections.ConfigDict:
  config = config_lib.default_config()
  config.dataset.name = dataset
  config.model.name = name
  config.model.kw = ml_collections.ConfigDict(kw)
  config.input.pp_eval = f"resize({size + size // 8})|center_crop({size})"
  return config


def finished_run(workdir: epath.Path, name: str, kw: dict, size: int, *,
                 dataset: str = "phantom_cxr", metrics=(0.8,), seed: int = 0) -> list[dict]:
  """A run folder as trainer.trials leaves it (config.json, results.json, per trial
  result.json and a best checkpoint saved by the trainer's own checkpoint code), holding
  random variables; returns each trial's variables."""
  model = models.create(name, K, **kw)
  segmentation = name.startswith(("unet_", "upernet_"))
  config = _config(name, kw, size, dataset)
  trials, records = [], []
  for k, metric in enumerate(metrics):
    variables = _random_variables(model, size, seed=seed + k)
    state = trainer_state.TrainState.create(
        apply_fn=None, params=variables["params"], batch_stats=variables.get("batch_stats"),
        tx=optax.sgd(0.1))
    ckpt = checkpoints.Checkpoints(workdir / f"trial_{k}" / "ckpt")
    ckpt.save_best(10 + k, state, {"loss": 0.5})
    ckpt.close()
    key = "dice" if segmentation else "mean_auc"
    record = {"seed": k, "best_step": 10 + k, "best_val_loss": 0.5 - k / 100,
              "skipped_updates": 0, "test": {key: metric, "loss": 0.4},
              "operating_points": {"classes": {"Nodule": {
                  "threshold": 0.3, "sensitivity": {"value": 0.75, "ci_low": 0.5,
                                                    "ci_high": 0.9}}}}}
    (workdir / f"trial_{k}" / "result.json").write_text(json.dumps(record))
    trials.append(variables)
    records.append(record)
  run = {"task": "segmentation" if segmentation else "classification",
         "metric": "dice" if segmentation else "mean_auc",
         "dataset_kind": "segmentation" if segmentation else "multi-label",
         "class_names": list(CLASSES), "dataset": dataset, "model": name, "init": "random",
         "label_fraction": 0.5, "label_subset": {"num_selected": 48, "num_examples": 96,
                                                 "method": "random"},
         "trials": records, "summary": {"mean": float(np.mean(metrics)), "std": None,
                                        "n": len(metrics)},
         "provenance": {"version": "0.3.0", "revision": "abc123", "config_sha256": "c0ffee",
                        "weights_file": None, "weights_sha256": None,
                        "splits_sha1": {"train": "d4", "test": "7f"}}}
  (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(config)))
  (workdir / "results.json").write_text(json.dumps(run))
  return trials


def _reference(fmt: str, out: epath.Path) -> torch.nn.Module:
  """The PyTorch model the export describes, built from its config.json alone, its weights
  loaded with strict names and shapes."""
  cfg = json.loads((out / "config.json").read_text())
  if fmt == "timm":
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.pretrained_cfg["label_names"] == list(CLASSES)
  elif fmt == "smp":
    model = smp.from_pretrained(str(out))
  else:
    model = torchvision.models.get_model(cfg["builder"], **cfg["kwargs"])
  # Loaded again explicitly: strict=True raises on any missing, unexpected or misshapen key.
  model.load_state_dict(safetensors.torch.load_file(str(out / "model.safetensors")),
                        strict=True)
  return model.eval()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name,kw,size,fmt", CASES,
                         ids=lambda v: v if isinstance(v, str) else None)
def test_export_loads_in_pytorch_and_gives_the_flax_logits(tmp_path, name, kw, size, fmt):
  workdir, out = epath.Path(tmp_path / "run"), epath.Path(tmp_path / "export")
  variables = finished_run(workdir, name, kw, size)[0]
  summary = export.export(str(workdir), str(out), fmt=fmt)
  assert summary["trial"] == 0 and not summary["restricted"]

  reference = _reference(fmt, out)
  torch.manual_seed(0)
  x = torch.randn(2, 3, size, size)
  with torch.no_grad():
    expected = reference(x).numpy()
  model = models.create(name, K, **kw)
  actual = np.asarray(jax.jit(model.apply)(variables, parity.to_nhwc(x)))
  if actual.ndim == 4:
    actual = actual.transpose(0, 3, 1, 2)  # NHWC masks -> NCHW as smp's
  diff = float(np.abs(actual - expected).max())
  print(f"export {name} ({fmt}): max |logit diff| {diff:.2e} (logits up to "
        f"{np.abs(expected).max():.2f})")
  assert diff <= 1e-4, diff

  # Imported back through weights.load (format detected from the keys), unchanged; UperNet's
  # training-only auxiliary head is not exported, so it comes back fresh.
  back = traverse_util.flatten_dict(
      weights.load(name, str(out / "model.safetensors"), K, keep_head=True, **kw), sep="/")
  flat = traverse_util.flatten_dict(variables, sep="/")
  aux = {k for k in flat if "aux_head" in k}
  assert set(back) == set(flat)
  for key in set(flat) - aux:
    np.testing.assert_array_equal(back[key], flat[key], err_msg=key)
  card = (out / "README.md").read_text()
  assert ("aux_head" in card) == bool(aux)


def test_inverse_layout_matches_the_forward_conversion():
  """flax_to_torch is the inverse of models.common.convert_torch_state_dict."""
  state = {"stem.0.weight": np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4),
           "stem.1.weight": np.ones(2, np.float32), "stem.1.bias": np.zeros(2, np.float32),
           "stem.1.running_mean": np.full(2, 0.5, np.float32),
           "stem.1.running_var": np.full(2, 2.0, np.float32),
           "stem.1.num_batches_tracked": np.zeros((), np.int64),
           "layers.0.blocks.1.fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
           "segmentation_head.0.bias": np.ones(2, np.float32),
           "cls_token": np.ones((1, 1, 2), np.float32)}
  flat = traverse_util.flatten_dict(common.convert_torch_state_dict(state), sep="/")
  back = export.flax_to_torch(flat)
  assert set(back) == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_default_trial_is_the_median_and_the_card_reports_the_run(tmp_path):
  workdir, out = epath.Path(tmp_path / "run"), epath.Path(tmp_path / "export")
  trials = finished_run(workdir, "resnet18", {}, 32, metrics=(0.9, 0.7, 0.8))
  summary = export.export(str(workdir), str(out))
  assert summary["trial"] == 2  # test metrics 0.9, 0.7, 0.8: the median is trial 2's
  exported = safetensors.torch.load_file(str(out / "model.safetensors"))
  np.testing.assert_array_equal(exported["conv1.weight"].numpy(),
                                np.asarray(trials[2]["params"]["conv1"]["kernel"]
                                           ).transpose(3, 2, 0, 1))
  assert export.export(str(workdir), str(out), trial=1)["trial"] == 1
  assert export.median_trial({"metric": "m", "trials": [{"test": {"m": v}}
                                                        for v in (0.2, 0.9, 0.5, 0.1)]}) == 0
  assert export.median_trial({"metric": "m", "trials": [{"test": {"m": None}}]}) == 0
  with pytest.raises(export.ExportError, match="trials 0..2"):
    export.export(str(workdir), str(out), trial=3)

  cfg = json.loads((out / "config.json").read_text())
  assert cfg["architecture"] == "resnet18" and cfg["num_classes"] == K
  assert cfg["label_names"] == list(CLASSES) and cfg["num_features"] == 512
  pretrained = cfg["pretrained_cfg"]
  assert pretrained["input_size"] == [3, 32, 32] and pretrained["crop_pct"] == 0.8889
  assert pretrained["mean"] == list(config_lib.normalization(config_lib.default_config())[
      "mean"])
  assert {"interpolation", "std", "num_classes", "label_names"} <= set(pretrained)
  card = (out / "README.md").read_text()
  for text in ("Phantom chest X-rays", "Apache-2.0", "Access tier: open", "Label fraction: 0.5",
               "patience", "| mean_auc | 0.7000 |", "[0.5000, 0.9000]", "c0ffee", "abc123",
               "trial 1", "sha256"):
    assert text in card, text
  assert "RESTRICTED" not in card


def test_restricted_data_set_needs_allow_restricted_and_the_card_says_so(tmp_path):
  workdir, out = epath.Path(tmp_path / "run"), epath.Path(tmp_path / "export")
  finished_run(workdir, "resnet18", {}, 32, dataset="chexpert")
  with pytest.raises(export.ExportError, match="allow_restricted"):
    export.export(str(workdir), str(out))
  assert not out.exists()
  assert export.export(str(workdir), str(out), allow_restricted=True)["restricted"]
  card = (out / "README.md").read_text()
  assert card.index("RESTRICTED") < card.index("## Model")
  assert "Stanford University Research Use Agreement" in card


@pytest.mark.parametrize("name,kw,fmt,match", [
    ("vit_small_patch16_224", dict(img_size=32, depth=1, embed_dim=48, num_heads=2), "smp",
     "exports to timm, not smp"),
    ("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)), "torchvision",
     "exports to timm, not torchvision"),
    ("densenet121", dict(block_config=(1, 1, 1, 1)), "torchvision", "takes no"),
    ("resnet18", dict(stage_sizes=(1, 1, 1, 1)), "timm", "with .'stage_sizes'. has no timm"),
    ("resnet50x2", {}, "timm", "resnet50x2 has no timm builder"),
    ("upernet_vit_small_patch16_224", dict(img_size=32, depth=1, embed_dim=48, num_heads=2),
     "smp", "has no vit_small_patch16_224 encoder"),
])
def test_formats_a_family_has_not_are_refused_by_name(name, kw, fmt, match):
  model = models.create(name, K, **kw)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)))
  flat = {k: np.zeros(v.shape, v.dtype)
          for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
  with pytest.raises(export.ExportError, match=match):
    export.to_torch(name, flat, fmt, kw, CLASSES)


@pytest.mark.timeout(120)
def test_cli_exits_with_the_reason(tmp_path):
  workdir, out = epath.Path(tmp_path / "run"), tmp_path / "export"
  finished_run(workdir, "resnet18", {}, 32, dataset="chexpert")
  proc = subprocess.run([sys.executable, "-m", "medbench_jax.export", f"--workdir={workdir}",
                         f"--out={out}"], cwd=helpers.REPO, env=helpers.subprocess_env(),
                        capture_output=True, text=True, timeout=110)
  assert proc.returncode == 1 and "--allow_restricted" in proc.stderr, proc.stderr
  proc = subprocess.run([sys.executable, "-m", "medbench_jax.export", f"--workdir={workdir}",
                         f"--out={out}", "--allow_restricted", "--format=torchvision"],
                        cwd=helpers.REPO, env=helpers.subprocess_env(), capture_output=True,
                        text=True, timeout=110)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout.strip().splitlines()[-1])["format"] == "torchvision"
  assert (out / "model.safetensors").exists()
