"""Optimizers and learning-rate schedules.

The learning rate always lives in the optimizer state (`optax.inject_hyperparams`),
so it is checkpointed with the model, logged from the device state, and the
reduce-on-plateau schedule can change it between steps without recompiling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections
import optax

from medbench_jax import config_lib

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("plateau", "warmup_cosine", "constant")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks config.optim before any work starts."""
  config_lib.check(config.optimizer in OPTIMIZERS, "optim.optimizer", config.optimizer,
                   OPTIMIZERS)
  config_lib.check(config.schedule in SCHEDULES, "optim.schedule", config.schedule, SCHEDULES)
  config_lib.check(config.lr > 0, "optim.lr", config.lr, "> 0")
  config_lib.check(config.warmup_steps >= 0, "optim.warmup_steps", config.warmup_steps, ">= 0")
  config_lib.check(config.warmup_epochs >= 0, "optim.warmup_epochs", config.warmup_epochs,
                   ">= 0")


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int,
                           steps_per_epoch: int = 1):
  """A float (plateau/constant: changed by the host) or an optax schedule.

  Warmup is `warmup_steps`, or `warmup_epochs` of `steps_per_epoch` where that is set.
  """
  if config.schedule in ("plateau", "constant"):
    return config.lr
  if config.schedule == "warmup_cosine":
    warmup = (int(round(config.warmup_epochs * steps_per_epoch)) if config.warmup_epochs
              else int(config.warmup_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=config.lr * config.min_lr_ratio)
  raise ValueError(f"config.schedule={config.schedule!r}; allowed: {SCHEDULES}")


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   steps_per_epoch: int = 1) -> optax.GradientTransformation:
  """Builds `config.optimizer` with its learning rate injected as a hyperparameter."""
  name = config.optimizer
  if name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer={name!r}; allowed: {OPTIMIZERS}")

  def build(learning_rate):
    if name == "adam":
      # torch.optim.Adam's weight_decay is L2 added to the gradient, as in the study.
      return optax.chain(optax.add_decayed_weights(config.weight_decay),
                         optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
                         optax.scale_by_learning_rate(learning_rate))
    if name == "adamw":
      return optax.adamw(learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
                         weight_decay=config.weight_decay)
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(learning_rate, momentum=config.momentum or None,
                                 nesterov=config.nesterov))

  tx = optax.inject_hyperparams(build)(
      learning_rate=learning_rate_schedule(config, total_steps, steps_per_epoch))
  if config.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


def find_hyperparams(opt_state: Any) -> dict:
  """The injected hyperparameters dict inside a (possibly chained) optimizer state."""
  if hasattr(opt_state, "hyperparams"):
    return opt_state.hyperparams
  for sub in opt_state if isinstance(opt_state, tuple) else ():
    found = find_hyperparams(sub)
    if found is not None:
      return found
  return None


@dataclasses.dataclass
class ReduceLROnPlateau:
  """torch.optim.lr_scheduler.ReduceLROnPlateau(mode="min"), as the study steps it.

  Host-side: call `step(val_loss, current_lr)` after each validation; it returns the
  learning rate to use from then on (`current_lr` when unchanged). It lowers the rate when
  more than `patience` validations in a row did not improve. Its fields are plain
  numbers so the state round-trips through the checkpoint's JSON metadata.
  """
  factor: float = 0.5
  patience: int = 5
  threshold: float = 1e-4
  cooldown: int = 0
  min_lr: float = 0.0
  best: float = math.inf
  num_bad_epochs: int = 0
  cooldown_counter: int = 0

  def step(self, metric: float, current_lr: float) -> float:
    """Returns the new learning rate."""
    if metric < self.best * (1.0 - self.threshold):
      self.best = metric
      self.num_bad_epochs = 0
    else:
      self.num_bad_epochs += 1
    if self.cooldown_counter > 0:
      self.cooldown_counter -= 1
      self.num_bad_epochs = 0
    if self.num_bad_epochs > self.patience:
      self.cooldown_counter = self.cooldown
      self.num_bad_epochs = 0
      new_lr = max(current_lr * self.factor, self.min_lr)
      if current_lr - new_lr > 1e-8:
        return new_lr
    return current_lr

  def state_dict(self) -> dict:
    return dataclasses.asdict(self)
