"""Shared checks of converted models against their PyTorch references (timm/torchvision).

Every model family's test file builds a random-init reference, then calls these helpers:
`forward_max_diff` (eval-mode logits through each on-disk format) and
`sgd_steps_max_rel_diff` (train mode, BatchNorm in training mode: identical SGD steps in
both frameworks, then every parameter and running statistic compared).
"""

from __future__ import annotations

from collections.abc import Callable
import pathlib
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.torch
import torch

from medbench_jax import models
from medbench_jax import weights

# Parity is about layouts and semantics, not about XLA's default reduced-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")


def calibrate_batch_norm(model: torch.nn.Module, size: int, residual_gamma: Callable[[str], bool]
                         = lambda name: False) -> torch.nn.Module:
  """Puts BatchNorm layers in a realistic state and returns the model in eval mode.

  Raw random init is a poor parity probe: timm zero-inits each block's last BN (residual
  branches contribute nothing) and unit statistics let activations grow to ~50 by the
  logits, where fp32 noise alone nears the tolerance. So statistics are calibrated on random
  images, and the gammas of layers `residual_gamma(name)` selects are kept small, as in
  trained nets.
  """
  batch_norms = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  for name, bn in batch_norms:
    high = 0.3 if residual_gamma(name) else 1.0
    bn.weight.data.uniform_(high / 2, high)
    bn.bias.data.normal_(0, 0.05)
    bn.reset_running_stats()
    bn.momentum = None  # Cumulative average over the calibration pass.
  if batch_norms:
    model.train()
    with torch.no_grad():
      model(torch.randn(8, 3, size, size))
    for _, bn in batch_norms:
      bn.momentum = 0.1
  return model.eval()


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
  """Replaces degenerate initial values with trained-like ones so a parity test exercises
  every block and every affine conversion: layer scales (ConvNeXt's gamma, 1e-6 at init,
  which silences every block) in [0.1, 0.5], norm weights in [0.5, 1.5], biases N(0, 0.05).
  BatchNorm layers are then best set by calibrate_batch_norm."""
  with torch.no_grad():
    for key, param in model.named_parameters():
      if key.endswith("gamma"):
        param.uniform_(0.1, 0.5)
      elif key.endswith("weight") and param.ndim == 1:
        param.uniform_(0.5, 1.5)
      elif key.endswith("bias"):
        param.normal_(0, 0.05)
  return model


def save_formats(model: torch.nn.Module, directory: pathlib.Path) -> list[str]:
  """The reference's state dict as .pth (torch.save) and .safetensors: the two ways timm
  and torchvision publish weights."""
  state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
  torch.save(state_dict, directory / "model.pth")
  safetensors.torch.save_file(state_dict, directory / "model.safetensors")
  return [str(directory / "model.pth"), str(directory / "model.safetensors")]


def to_nhwc(x: torch.Tensor) -> jnp.ndarray:
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def reference_outputs(reference: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
  """The eval-mode reference's outputs, segmentation logits NCHW -> NHWC as ours are."""
  with torch.no_grad():
    out = reference.eval()(x).numpy()
  return out.transpose(0, 2, 3, 1) if out.ndim == 4 else out


def forward_max_diff(name: str, reference: torch.nn.Module, path: str, x: torch.Tensor,
                     num_classes: int, **model_kw: Any) -> float:
  """Max |logit difference| (pooled features when num_classes == 0) between the eval-mode
  reference and `name` loaded from `path` through weights.load."""
  expected = reference_outputs(reference, x)
  variables = weights.load(name, path, num_classes=num_classes, keep_head=True, **model_kw)
  model = models.create(name, num_classes, **model_kw)
  actual = np.asarray(jax.jit(model.apply)(variables, to_nhwc(x)))
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.abs(actual - expected).max())


def assert_every_format_matches(name: str, reference: torch.nn.Module,
                                directory: pathlib.Path, x: torch.Tensor, num_classes: int,
                                tolerance: float = 1e-4, **model_kw: Any) -> None:
  """forward_max_diff through each of save_formats' files, each within `tolerance`."""
  for path in save_formats(reference, directory):
    diff = forward_max_diff(name, reference, path, x, num_classes, **model_kw)
    print(f"{name} {model_kw or ''} {path} at {tuple(x.shape[2:])}: max |diff| {diff:.2e}")
    assert diff <= tolerance, f"{name} {model_kw or ''} {path}: max |diff| {diff}"


def sgd_steps_max_rel_diff(name: str, reference: torch.nn.Module, directory: pathlib.Path,
                           x: torch.Tensor, num_classes: int, steps: int = 2, lr: float = 0.1,
                           float64: bool = False, **model_kw: Any) -> tuple[float, float]:
  """Fine-tunes both models for `steps` identical SGD-with-momentum steps on one batch
  (train mode: BatchNorm uses and updates batch statistics) with the study's multi-label
  BCE loss (per pixel for segmentation models), then compares every converted torch tensor
  with its Flax counterpart.

  Returns (max relative difference of the tensors, relative difference of the updates
  ||delta_flax - delta_torch|| / ||delta_torch|| over all tensors): the first is what the
  check is stated in; the second shows the steps themselves agree, not only the starting
  point. The reference must have dropout and stochastic depth off.

  `float64` runs both sides in double precision: train-mode gradients of a deep random-init
  CNN are ill-conditioned (torch's own float32 gradients of ResNet-50's stem differ from its
  float64 ones by ~1e-2), so in float32 neither framework is a 1e-4 reference for the other.
  """
  if float64:
    with jax.enable_x64(True):
      return sgd_steps_max_rel_diff(name, reference.double(), directory, x.double(),
                                    num_classes, steps, lr, False, dtype=jnp.float64, **model_kw)
  reference.eval()
  path = directory / "before.pth"
  torch.save(reference.state_dict(), path)
  before = {k: v.numpy().copy() for k, v in reference.state_dict().items()}
  with torch.no_grad():
    output_shape = tuple(reference(x).shape)
  targets = torch.from_numpy(
      np.random.default_rng(0).integers(0, 2, output_shape).astype(np.float32))
  flax_targets = to_nhwc(targets) if targets.ndim == 4 else jnp.asarray(targets.numpy())

  reference.train()
  optimizer = torch.optim.SGD(reference.parameters(), lr=lr, momentum=0.9)
  for _ in range(steps):
    optimizer.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(reference(x), targets).backward()
    optimizer.step()
  after_torch = {k: v.detach().numpy() for k, v in reference.state_dict().items()}

  model = models.create(name, num_classes, **model_kw)
  variables = weights.load(name, str(path), num_classes=num_classes, keep_head=True, **model_kw)
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  tx = optax.sgd(lr, momentum=0.9)

  @jax.jit
  def step(params, state, opt_state):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, **state}, to_nhwc(x), train=True,
                                    mutable=list(state))
      loss = optax.sigmoid_binary_cross_entropy(logits, flax_targets).mean()
      return loss, updates
    grads, updates = jax.grad(loss_fn, has_aux=True)(params)
    param_updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, param_updates), {**state, **updates}, opt_state

  opt_state = tx.init(params)
  for _ in range(steps):
    params, state, opt_state = step(params, state, opt_state)

  convert = models.converter(name)
  flat = lambda tree: traverse_util.flatten_dict(tree, sep="/")
  after_flax = flat({"params": params, **state})
  expected_after = flat(convert(after_torch, model_kw))
  expected_before = flat(convert(before, model_kw))
  assert set(expected_after) == set(after_flax), set(expected_after) ^ set(after_flax)
  rel = max(float(np.abs(np.asarray(after_flax[k]) - v).max() / max(np.abs(v).max(), 1e-12))
            for k, v in expected_after.items())
  delta_err = sum(float(np.sum((np.asarray(after_flax[k]) - v) ** 2))
                  for k, v in expected_after.items())
  delta_norm = sum(float(np.sum((v - expected_before[k]) ** 2))
                   for k, v in expected_after.items())
  return rel, (delta_err / max(delta_norm, 1e-30)) ** 0.5
