"""Config files, args and validation: bad input is named before any work starts."""

from ml_collections import config_flags  # noqa: F401  (registers the config loader)
import pytest

from configs import convnext as convnext_config
from configs import densenet121 as densenet_config
from configs import resnet50 as resnet_config
from configs import swin as swin_config
from medbench_jax import config_checks

PIL = "interpolation='pil_bilinear'"


def test_default_swin_config_is_the_cpu_demo_and_valid():
  config = swin_config.get_config()
  config_checks.validate(config)
  assert config.model.name == "swin_demo_patch4_window4_64"
  assert config.dataset.name == "phantom_cxr"


def test_the_demo_keeps_its_data_path():
  d = swin_config.get_config().dataset
  assert (d.image_size, d.keep_aspect, d.phantom.image_size) == (72, False, 256)
  assert (d.label_fraction_method, d.label_fraction_seed, d.uncertain_policy) == (
      "stratified", 0, "u_ones")
  config = swin_config.get_config()
  assert (config.input.pp_train, config.input.pp_eval, config.input.pp_test) == (
      "resize(72)|center_crop(64)|flip_lr", "resize(72)|center_crop(64)",
      "resize(72)|ten_crop(64)")


def test_paper_variant():
  config = swin_config.get_config("model=swin_base_patch4_window7_224,data=chestxray14")
  config_checks.validate(config)
  assert config.model.name == "swin_base_patch4_window7_224"
  assert config.dataset.name == "chestxray14"
  assert (config.dataset.image_size, config.dataset.keep_aspect) == (1024, True)
  assert config.input.pp_train == f"random_resized_crop(224, {PIL})|flip_lr|rotate(7)"
  assert config.input.pp_eval == f"resize((256, 256), {PIL})|center_crop(224)"
  assert config.input.pp_test == f"resize((256, 256), {PIL})|ten_crop(224)"
  assert (config.input.batch_size, config.train.patience, config.train.num_epochs) == (
      32, 10, 1000)
  assert (config.optim.optimizer, config.optim.lr, config.optim.schedule) == (
      "adam", 2e-4, "plateau")
  assert (config.dataset.label_fraction_method, config.dataset.label_fraction_seed,
          config.dataset.label_fraction_splits) == ("study", 99, "train")
  assert resnet_config.get_config("paper").model.name == "resnet50"
  assert densenet_config.get_config("data=shenzhen_cxr").model.name == "densenet121"
  assert convnext_config.get_config("paper").model.name == "convnext_base"


@pytest.mark.parametrize("arg,dataset,values", [
    ("data=chexpert", "chexpert", dict(uncertain_policy="lsr_ones", lsr_draw="per_read",
                                       validation_labels="policy", blank_label=0.0,
                                       label_fraction_splits="train,validation,test")),
    ("data=shenzhen_cxr,anno_percent=10", "shenzhen_cxr",
     dict(label_fraction=0.1, label_fraction_splits="train,validation,test")),
    ("data=vindr_cxr", "vindr_cxr_study", dict(label_fraction_splits="train")),
    ("data=rsna_pneumonia", "rsna_pneumonia_study", dict(validation_labels="hard")),
    ("paper", "phantom_cxr", dict(image_size=1024, keep_aspect=True)),
])
def test_paper_setting_per_data_set(arg, dataset, values):
  config = swin_config.get_config(arg)
  config_checks.validate(config)
  assert config.dataset.name == dataset
  assert {k: config.dataset[k] for k in values} == values
  if dataset == "phantom_cxr":
    assert config.dataset.phantom.image_size == 1024


@pytest.mark.parametrize("data", ["rsna_pneumonia", "vindr_cxr"])
def test_benchmark_transformers_recipe(data):
  """recipe=bt: BenchmarkTransformers' optimizer and schedule over the paper setting."""
  paper = swin_config.get_config(f"data={data}")
  config = swin_config.get_config(f"data={data},recipe=bt")
  config_checks.validate(config)
  assert (config.optim.optimizer, config.optim.momentum, config.optim.nesterov,
          config.optim.weight_decay, config.optim.lr) == ("sgd", 0.9, False, 0.0, 1e-2)
  assert (config.optim.schedule, config.optim.warmup_epochs) == ("warmup_cosine", 20.0)
  assert config.optim.lr * config.optim.min_lr_ratio == pytest.approx(1e-5)
  assert (config.input.batch_size, config.train.num_epochs, config.train.patience) == (
      64, 200, 10)
  assert config.dataset == paper.dataset and config.input.pp_train == paper.input.pp_train
  assert swin_config.get_config("recipe=bt").dataset.image_size == 1024  # implies paper
  with pytest.raises(ValueError, match="recipe='timm'.*allowed"):
    swin_config.get_config("recipe=timm")


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
    config_checks.validate(config)
