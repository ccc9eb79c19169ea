"""The segmentation config files: each variant parses, validates and builds its model for
the configured input size."""

import jax
import jax.numpy as jnp
import pytest

from configs import unet_resnet50
from configs import upernet_convnext
from configs import upernet_swin
from configs import upernet_vit
from medbench_jax import config_checks
from medbench_jax.trainer import state

CONFIGS = [  # (config module, paper model, demo model)
    (unet_resnet50, "unet_resnet50", "unet_resnet18"),
    (upernet_swin, "upernet_swin_base_patch4_window7_224",
     "upernet_swin_demo_patch4_window4_96"),
    (upernet_convnext, "upernet_convnext_base", "upernet_convnext_tiny"),
    (upernet_vit, "upernet_vit_base_patch16_224", "upernet_vit_small_patch16_224"),
]


def _assert_builds(config, num_classes: int = 1) -> None:
  """The model of `config` maps a batch at the configured image size to logits there."""
  model = state.create_model(config, num_classes)
  size = config.dataset.image_size
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  logits = jax.eval_shape(model.apply, variables, x)
  assert (logits.shape, logits.dtype) == ((1, size, size, num_classes), jnp.float32)


@pytest.mark.parametrize("module,paper_model,demo_model", CONFIGS,
                         ids=[c[0].__name__.split(".")[-1] for c in CONFIGS])
def test_demo_is_a_valid_phantom_run_of_a_small_model(module, paper_model, demo_model):
  config = module.get_config()
  config_checks.validate(config)
  assert (config.model.name, config.dataset.name) == (demo_model, "phantom_cxr_lungs")
  assert config.dataset.image_size == 64 and config.model.init == "random"
  _assert_builds(config)


@pytest.mark.parametrize("module,paper_model,demo_model", CONFIGS,
                         ids=[c[0].__name__.split(".")[-1] for c in CONFIGS])
def test_paper_setting_builds_the_papers_model(module, paper_model, demo_model):
  config = module.get_config("data=montgomery,init=/ckpt/encoder.pth,trials=10")
  config_checks.validate(config)
  assert (config.model.name, config.dataset.name) == (paper_model, "montgomery")
  assert (config.dataset.image_size, config.num_trials) == (224, 10)
  assert config.model.init == "/ckpt/encoder.pth" and not config.model.kw.to_dict()
  assert config.segmentation.val_loss == "pooled"  # the study's validation loss
  _assert_builds(config)
  # `paper` on the phantom data and another encoder of the family.
  config = module.get_config(f"paper,model={demo_model}")
  assert config.dataset.name == "phantom_cxr_lungs" and config.dataset.image_size == 224
  assert config.model.name == demo_model


def test_unknown_segmentation_data_is_named():
  with pytest.raises(ValueError, match="data='chestxray14' for segmentation"):
    unet_resnet50.get_config("data=chestxray14")
  with pytest.raises(ValueError, match="recipe='bt' for segmentation"):
    unet_resnet50.get_config("data=montgomery,recipe=bt")
