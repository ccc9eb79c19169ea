"""A seconds-long segmentation run for the end-to-end tests: tiny phantom lungs, a
U-Net on ResNet-18 with a narrow decoder, 32 px."""

from medbench_jax import config_lib
from medbench_jax import recipes


def get_config(arg=None):
  args = config_lib.parse_arg(arg, epochs=2, workers=0)
  config = recipes.segmentation_config(
      None, paper_model="", demo_model="unet_resnet18",
      demo_kw=dict(decoder_channels=(32, 16, 16, 8, 8)))
  config.dataset.phantom.update(num_train=96, num_val=40, num_test=40, image_size=96)
  config.dataset.image_size = 32
  config.input.batch_size = 16
  config.input.eval_batch_size = 16
  config.input.num_workers = args.workers
  config.optim.warmup_epochs = 0.5
  config.train.num_epochs = args.epochs
  config.train.eval_every_steps = 4
  config.train.log_every_steps = 1
  # Seconds-long runs: fewer bootstrap resamples for the operating points' intervals.
  config.eval.bootstrap_resamples = 100
  return config
