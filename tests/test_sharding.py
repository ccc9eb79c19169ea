"""trainer/sharding.py: the data x fsdp mesh, FSDP rules, and what they do to a real train
state on 8 simulated devices; training on 1 device, on 8 and with FSDP gives the same
losses; checkpoints move between device counts."""

import re
import signal

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from medbench_jax import config_lib
from medbench_jax import models
from medbench_jax.trainer import optim
from medbench_jax.trainer import sharding
from medbench_jax.trainer import state as state_lib
from tests import helpers

RULES = config_lib.default_config().mesh.fsdp_rules


def test_spec_picks_the_largest_divisible_axis_and_respects_size_and_rules():
  assert sharding.spec_for("params/fc/kernel", (768, 14), 4, RULES, 0) == P("fsdp")
  assert sharding.spec_for("params/fc/kernel", (3, 3, 64, 256), 4, RULES, 0) == P(
      None, None, None, "fsdp")
  assert sharding.spec_for("params/fc/kernel", (3, 5), 4, RULES, 0) == P()  # indivisible
  assert sharding.spec_for("params/fc/bias", (768,), 4, RULES, 0) == P()  # rule: replicate
  assert sharding.spec_for("params/fc/kernel", (768, 14), 4, RULES, 10**6) == P()  # small
  assert sharding.spec_for("params/fc/kernel", (768, 14), 1, RULES, 0) == P()  # no fsdp


def test_bad_mesh_configs_name_the_key():
  config = config_lib.default_config()
  config.mesh.fsdp = 3
  with pytest.raises(ValueError, match=re.escape("config.mesh.fsdp=3") + ".*8 devices"):
    sharding.validate(config)
  config.mesh.fsdp = 2
  config.mesh.fsdp_rules = (("kernel$", "scatter"),)
  with pytest.raises(ValueError, match="config.mesh.fsdp_rules"):
    sharding.validate(config)


def test_train_state_is_really_sharded_over_fsdp():
  config = config_lib.default_config()
  config.mesh.fsdp = 4
  config.mesh.fsdp_min_size = 4096
  mesh = sharding.make_mesh(4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  model = models.create("resnet18", 14)
  variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  tx = optim.make_optimizer(config.optim, 10)
  state, shardings = state_lib.create_sharded_state(
      model, variables, tx, mesh, lambda abstract: sharding.state_shardings(abstract, mesh,
                                                                            config))
  # Created sharded, with the values of a state created on one device.
  unsharded = state_lib.create_state(model, variables, tx)
  assert jax.tree.structure(state) == jax.tree.structure(unsharded)
  for got, want, placed in zip(jax.tree.leaves(state), jax.tree.leaves(unsharded),
                               jax.tree.leaves(shardings)):
    np.testing.assert_array_equal(got, want)
    assert got.sharding == placed

  kernel = state.params["layer4_1"]["conv2"]["kernel"]  # (3, 3, 512, 512)
  assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 512, 128)}
  moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", ()) ==
             (3, 3, 512, 512)]
  # Adam's mu and nu of layer4's three 512x512 kernels, sharded like the kernels.
  assert len(moments) == 6
  for m in moments:
    assert {s.data.shape for s in m.addressable_shards} == {(3, 3, 512, 128)}
  stem = state.params["conv1"]["kernel"]  # (7, 7, 3, 64): 9408 elements, sharded
  assert {s.data.shape for s in stem.addressable_shards} == {(7, 7, 3, 16)}
  bias = state.params["fc"]["bias"]  # small: replicated
  assert {s.data.shape for s in bias.addressable_shards} == {(14,)}
  bn_var = state.batch_stats["bn1"]["var"]
  assert {s.data.shape for s in bn_var.addressable_shards} == {(64,)}


def _losses(workdir):
  return helpers.scalars(workdir / "tb" / "trial_0", "train/loss")


@pytest.mark.e2e
def test_one_device_eight_devices_and_fsdp_give_the_same_losses(tmp_path, phantom_dir):
  """`python -m medbench_jax.main` on 1 device, on 8 replicated devices and on 8 FSDP
  devices: the same 5 training losses."""
  config = f"--config={helpers.TINY}"
  steps = "--config.train.max_steps=5"
  fsdp = ("--config.mesh.fsdp=8", "--config.mesh.fsdp_min_size=256")
  losses = {}
  for name, devices, extra in (("1", 1, ()), ("8", 8, ()), ("fsdp", 8, fsdp)):
    out = helpers.main(tmp_path / name, phantom_dir, config, steps, *extra, devices=devices)
    assert f"Devices: {devices} (cpu)" in out
    losses[name] = _losses(tmp_path / name)
  sharded = re.search(r"FSDP over groups of 8 devices: (\d+) of (\d+) parameter tensors", out)
  assert sharded and int(sharded.group(1)) > 0, out[-3000:]
  assert len(losses["1"]) == 5 and len(set(losses["1"])) == 5  # a real comparison
  np.testing.assert_allclose(losses["8"], losses["1"], rtol=1e-4)
  np.testing.assert_allclose(losses["fsdp"], losses["8"], rtol=1e-4)


@pytest.mark.e2e
def test_checkpoint_from_8_fsdp_devices_resumes_on_1(tmp_path, phantom_dir):
  """Preempted on 8 devices with FSDP, resumed on 1 replicated device: the losses after the
  resume are those of a run that used 1 device throughout."""
  config = f"--config={helpers.TINY}:epochs=4"
  helpers.main(tmp_path / "one", phantom_dir, config, devices=1)
  proc = helpers.main(tmp_path / "moved", phantom_dir, config, "--config.mesh.fsdp=8",
                      "--config.mesh.fsdp_min_size=256", devices=8, wait=False)
  log = []
  for line in proc.stdout:
    log.append(line)
    if re.search(r"step 6/24", line):
      proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  assert proc.returncode == 75, "".join(log)[-3000:]  # runtime.EXIT_PREEMPTED
  saved = re.search(r"preempted: state saved at step (\d+)", "".join(log))
  assert saved, "".join(log)[-3000:]
  out = helpers.main(tmp_path / "moved", phantom_dir, config, devices=1)
  step = int(saved.group(1))
  assert f"Resuming trial 0 from step {step}" in out
  reference = _losses(tmp_path / "one")
  np.testing.assert_allclose(_losses(tmp_path / "moved")[step:], reference[step:], rtol=1e-4)
