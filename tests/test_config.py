"""Config files, args and validation: bad input is named before any work starts."""

import pytest
from ml_collections import config_flags  # noqa: F401  (registers the config loader)

from medbench_jax import config_lib

from configs import resnet50 as resnet_config  # pylint: disable=g-bad-import-order
from configs import swin as swin_config


def test_default_swin_config_is_the_cpu_demo_and_valid():
  config = swin_config.get_config()
  config_lib.validate(config)
  assert config.model.name == "swin_demo_patch4_window4_96"
  assert config.dataset.name == "phantom_cxr"


def test_paper_variant():
  config = swin_config.get_config("model=swin_base_patch4_window7_224,data=chestxray14")
  config_lib.validate(config)
  assert config.model.name == "swin_base_patch4_window7_224"
  assert config.dataset.name == "chestxray14"
  assert config.input.pp_train == "random_resized_crop(224)|flip_lr|rotate(7)"
  assert (config.optim.optimizer, config.optim.lr, config.optim.schedule) == (
      "adam", 2e-4, "plateau")
  assert resnet_config.get_config("paper").model.name == "resnet50"


def test_anno_percent_alias():
  assert swin_config.get_config("anno_percent=25").dataset.label_fraction == 0.25
  assert swin_config.get_config("label_fraction=0.5").dataset.label_fraction == 0.5


def test_unknown_arg_is_named():
  with pytest.raises(ValueError, match="Unknown config arg 'modle'.*allowed"):
    swin_config.get_config("modle=resnet50")
  with pytest.raises(ValueError, match="data='mnist'"):
    swin_config.get_config("data=mnist")


def test_unknown_key_is_an_error():
  config = swin_config.get_config()
  with pytest.raises(AttributeError, match="btach_size"):
    config.input.btach_size = 3


@pytest.mark.parametrize("key,value,message", [
    ("optim.optimizer", "lamb", "config.optim.optimizer='lamb' is not allowed; allowed"),
    ("input.normalization", "cifar", "config.input.normalization='cifar'"),
    ("dataset.label_fraction", 1.5, "config.dataset.label_fraction=1.5"),
    ("input.batch_size", 0, "config.input.batch_size=0"),
    ("input.pp_train", "random_crop(3)", "config.input.pp_train: Unknown preprocessing op"),
    ("model.name", "resnet51", "config.model.name='resnet51'.*resnet50"),
])
def test_bad_values_are_named(key, value, message):
  config = swin_config.get_config()
  section, field = key.split(".")
  config[section][field] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)
