"""A seconds-long run for the end-to-end tests: tiny phantom set, tiny Swin, 64 px."""

import ml_collections

from medbench_jax import config_lib
from medbench_jax import recipes


def get_config(arg=None):
  args = config_lib.parse_arg(arg, model="swin_demo_patch4_window4_128", epochs=2, workers=0)
  config = recipes.classification_config(None, paper_model="", demo_model=args.model)
  config.dataset.phantom.update(num_train=96, num_val=40, num_test=40, image_size=96)
  config.dataset.image_size = 72
  config.input.batch_size = 16
  config.input.eval_batch_size = 16
  config.input.num_workers = args.workers
  config.input.pp_train = "random_resized_crop(64, scale=(0.25, 1.0))|flip_lr|rotate(7)"
  config.input.pp_eval = "resize(72)|center_crop(64)"
  config.input.pp_test = "resize(72)|ten_crop(64)"
  config.optim.warmup_steps = 4
  config.train.num_epochs = args.epochs
  config.train.eval_every_steps = 4
  config.train.log_every_steps = 1
  # Seconds-long runs: fewer bootstrap resamples for the operating points' intervals.
  config.eval.bootstrap_resamples = 100
  config.train.gradcam_images = 0  # test_trainer turns the overlays on
  if args.model.startswith("swin"):
    config.model.kw = ml_collections.ConfigDict(dict(
        img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
        drop_path_rate=0.0))
  return config
