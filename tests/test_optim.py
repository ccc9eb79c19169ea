"""Optimizers and schedules against the PyTorch semantics the study relies on."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from medbench_jax import config_lib
from medbench_jax.trainer import optim


def _optim_config(**kw):
  c = config_lib.default_config().optim
  c.unlock()
  c.update(kw)
  return c


def test_plateau_matches_torch():
  losses = [1.0, 0.9, 0.95, 0.97, 0.91, 0.92, 0.93, 0.89, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9,
            0.85, 0.86, 0.87, 0.88, 0.89, 0.9]
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.Adam([param], lr=2e-4)
  sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=2)
  ours, lr = optim.ReduceLROnPlateau(factor=0.5, patience=2), 2e-4
  for loss in losses:
    sched.step(loss)
    lr = ours.step(loss, lr)
    assert lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
  assert lr < 2e-4  # the sequence does trigger reductions


def test_plateau_state_round_trips():
  a = optim.ReduceLROnPlateau(patience=1)
  a.step(1.0, 1.0)
  a.step(2.0, 1.0)
  b = optim.ReduceLROnPlateau(**a.state_dict())
  assert b.step(3.0, 1.0) == a.step(3.0, 1.0) == 0.5


@pytest.mark.parametrize("name,torch_cls,kw", [
    ("adam", torch.optim.Adam, dict(weight_decay=1e-2)),
    ("adamw", torch.optim.AdamW, dict(weight_decay=1e-2)),
    ("sgd", torch.optim.SGD, dict(weight_decay=1e-2, momentum=0.9)),
])
def test_optimizer_steps_match_torch(name, torch_cls, kw):
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5,)).astype(np.float32)
  targets = [rng.normal(size=(5,)).astype(np.float32) for _ in range(4)]
  tx = optim.make_optimizer(_optim_config(optimizer=name, lr=0.1, **kw), total_steps=10)
  params = jnp.asarray(w0)
  state = tx.init(params)
  tw = torch.nn.Parameter(torch.tensor(w0))
  topt = torch_cls([tw], lr=0.1, **kw)
  for t in targets:
    grads = jax.grad(lambda p, t=t: jnp.sum((p - t) ** 2 * jnp.arange(1, 6)))(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    topt.zero_grad()
    (((tw - torch.tensor(t)) ** 2) * torch.arange(1, 6)).sum().backward()
    topt.step()
  np.testing.assert_allclose(np.asarray(params), tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_learning_rate_is_in_the_state_and_settable():
  tx = optim.make_optimizer(_optim_config(lr=1e-3, grad_clip_norm=1.0), total_steps=10)
  state = tx.init(jnp.zeros(3))
  hp = optim.find_hyperparams(state)
  assert float(hp["learning_rate"]) == pytest.approx(1e-3)


def test_warmup_cosine_schedule():
  tx = optim.make_optimizer(_optim_config(lr=1.0, schedule="warmup_cosine", warmup_steps=4),
                            total_steps=20)
  params = jnp.zeros(2)
  state = tx.init(params)
  lrs = []
  for _ in range(20):
    _, state = tx.update(jnp.ones(2), state, params)
    lrs.append(float(optim.find_hyperparams(state)["learning_rate"]))
  assert lrs[4] == pytest.approx(1.0)  # the 5th update uses the peak (count 4)
  assert lrs[0] == 0.0 and lrs[1] < lrs[3] < lrs[4] and lrs[-1] < 0.05


def test_unknown_optimizer_is_named():
  with pytest.raises(ValueError, match="config.optimizer='lamb'"):
    optim.make_optimizer(_optim_config(optimizer="lamb"), total_steps=1)


def test_warmup_in_epochs_then_cosine_over_the_budget():
  """The segmentation protocol: 20 warmup epochs, then cosine to 0 over all epochs."""
  config = _optim_config(schedule="warmup_cosine", lr=2e-4, warmup_epochs=20.0,
                         warmup_steps=999)
  schedule = optim.learning_rate_schedule(config, total_steps=500 * 3, steps_per_epoch=3)
  assert float(schedule(0)) == 0.0
  assert float(schedule(30)) == pytest.approx(1e-4, rel=1e-5)  # half way through warmup
  assert float(schedule(60)) == pytest.approx(2e-4, rel=1e-6)  # warmup ends at epoch 20
  progress = (780 - 60) / (1500 - 60)
  assert float(schedule(780)) == pytest.approx(1e-4 * (1 + np.cos(np.pi * progress)),
                                               rel=1e-5)
  assert float(schedule(1500)) == pytest.approx(0.0, abs=1e-12)
