"""weights/sources.py, the init sources besides checkpoint files: timm:NAME.TAG from the
Hugging Face hub cache, run:WORKDIR (an earlier run's best orbax checkpoint, as the trainer
writes it)."""

import json
import os

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import safetensors.torch
import timm
import torch

from medbench_jax import models
from medbench_jax import weights
from medbench_jax.trainer import state as trainer_state
from tests import parity

K = 3


@pytest.fixture(scope="module")
def timm_resnet18():
  torch.manual_seed(0)
  return parity.calibrate_batch_norm(timm.create_model("resnet18", num_classes=K), 32,
                                     lambda m: m.endswith("bn2"))


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_timm_weights_from_the_hub_cache(tmp_path, monkeypatch, timm_resnet18, env):
  cache = tmp_path / "hub" if env == "HF_HUB_CACHE" else tmp_path / "hf_home" / "hub"
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv(env, str(cache if env == "HF_HUB_CACHE" else cache.parent))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  snapshot = cache / "models--timm--resnet18.a1_in1k" / "snapshots" / "0123abcd"
  snapshot.mkdir(parents=True)
  safetensors.torch.save_file(timm_resnet18.state_dict(), snapshot / "model.safetensors")
  diff = parity.forward_max_diff("resnet18", timm_resnet18, "timm:resnet18.a1_in1k",
                                 torch.randn(2, 3, 32, 32), num_classes=K)
  assert diff <= 1e-4, diff


def test_timm_offline_without_cache_says_what_to_download(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  expected = os.path.join(str(tmp_path), "models--timm--resnet50.a1_in1k", "snapshots", "main",
                          "model.safetensors")
  with pytest.raises(FileNotFoundError) as err:
    weights.load("resnet50", "timm:resnet50.a1_in1k", num_classes=K)
  assert "https://huggingface.co/timm/resnet50.a1_in1k" in str(err.value)
  assert expected in str(err.value)
  with pytest.raises(ValueError, match="timm:NAME.TAG"):
    weights.load("resnet50", "timm:resnet50", num_classes=K)


def _save_trial(workdir, trial: int, variables: dict, best_val_loss: float) -> None:
  """A trial directory as trainer.trials leaves it: best checkpoint + result.json."""
  trial_dir = workdir / f"trial_{trial}"
  state = trainer_state.TrainState.create(
      apply_fn=None, params=variables["params"], batch_stats=variables["batch_stats"],
      tx=optax.adam(1e-3))
  manager = ocp.CheckpointManager(trial_dir / "ckpt" / "best",
                                  options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
  manager.save(40, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           progress=ocp.args.JsonSave({"step": 40})))
  manager.wait_until_finished()
  manager.close()
  (trial_dir / "result.json").write_text(json.dumps({"best_val_loss": best_val_loss}))


def test_run_chaining_takes_the_encoder_of_the_best_trial(tmp_path):
  """Domain-adaptive chaining: a later run starts from everything but the head of an
  earlier run's best checkpoint (the trial with the lowest validation loss)."""
  model = models.create("resnet18", 14)
  dummy = np.zeros((1, 32, 32, 3), np.float32)
  init = jax.jit(model.init)
  trials = [init(jax.random.key(seed), dummy) for seed in (1, 2)]
  workdir = tmp_path / "cxr14_run"
  _save_trial(workdir, 0, trials[0], best_val_loss=0.30)
  _save_trial(workdir, 1, trials[1], best_val_loss=0.25)

  variables, report = weights.load_with_report("resnet18", f"run:{workdir}", num_classes=5)
  assert report.format == "run" and "trial_1" in report.source
  jax.tree.map(np.testing.assert_array_equal,
               {k: v for k, v in variables["params"].items() if k != "fc"},
               {k: v for k, v in trials[1]["params"].items() if k != "fc"})
  jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"], trials[1]["batch_stats"])
  assert variables["params"]["fc"]["kernel"].shape == (512, 5)
  assert set(report.dropped) == {"params/fc/kernel", "params/fc/bias"}

  named = weights.load("resnet18", f"run:{workdir}/trial_0", num_classes=5)
  np.testing.assert_array_equal(named["params"]["conv1"]["kernel"],
                                trials[0]["params"]["conv1"]["kernel"])
  with pytest.raises(FileNotFoundError, match="no finished trial"):
    weights.load("resnet18", f"run:{tmp_path}", num_classes=5)
