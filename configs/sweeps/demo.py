r"""A small sweep on the embedded phantom data: every part of the runner and the report,
at a size that runs on a 2-core CPU in a few minutes.

  python -m medbench_jax.sweep --sweep=configs/sweeps/demo.py --root=workdirs/sweep_demo
  python -m medbench_jax.report --runs=workdirs/sweep_demo --out=workdirs/sweep_demo_report \
      --baseline=resnet18/random

Grid: two architectures (ResNet-18 and a tiny Swin) x two label fractions (25 % and
100 %), from random init, 2 trials each; and a two-step chain, ResNet-18 fine-tuned on
all labels and then, from that run (init run:...), on 25 %. A 192-image phantom set,
48 px crops for ResNet-18 and 64 px for the Swin, 3 epochs. Rerunning the command skips
what finished; `--dry_run` shows the state of each point; `--parallel=2` runs two points
at once.

Args (comma-separated): trials=N, epochs=N.
"""

from medbench_jax import config_lib
from medbench_jax.study import sweep

CONFIG = "configs/resnet50.py:data=phantom"
# The phantom set and training, shrunk from the CPU demo's (recipes.classification_demo).
SMALL = {
    "dataset.phantom.num_train": 128, "dataset.phantom.num_val": 32,
    "dataset.phantom.num_test": 32, "dataset.phantom.image_size": 96,
    "input.batch_size": 16, "input.eval_batch_size": 32, "input.num_workers": 0,
    "optim.lr": 3e-4, "optim.warmup_epochs": 0.5, "train.log_every_steps": 4,
}


def _pixels(stored: int, crop: int) -> dict[str, object]:
  """Images stored at `stored` px, `crop` px crops (ten at test), as the paper's 256/224."""
  return {"dataset.image_size": stored,
          "input.pp_train": f"resize({stored})|center_crop({crop})|flip_lr",
          "input.pp_eval": f"resize({stored})|center_crop({crop})",
          "input.pp_test": f"resize({stored})|ten_crop({crop})"}


# ResNet-18 at 48 px (most of the demo's compute); the tiny Swin needs a multiple of 32.
RESNET = {"model.name": "resnet18", **_pixels(56, 48)}
SWIN = {"model.name": "swin_demo_patch4_window4_96", **_pixels(72, 64),
        "model.kw": {"img_size": 64, "embed_dim": 24, "depths": (1, 1, 2, 1),
                     "num_heads": (1, 2, 3, 6), "drop_path_rate": 0.0}}


def get_sweep(arg=None):
  args = config_lib.parse_arg(arg, trials=2, epochs=3)
  fixed = {**SMALL, "num_trials": args.trials, "train.num_epochs": args.epochs}
  points = []
  for model in (RESNET, SWIN):
    points += sweep.grid(CONFIG, {"model.init": ["random"],
                                  "dataset.label_fraction": [0.25, 1.0]},
                         fixed={**fixed, **model}, labels={"model": model["model.name"]})
  source = next(p for p in points if p.name == "model=resnet18,init=random,label_fraction=1")
  points += sweep.grid(CONFIG, {"model.init": {"chain": sweep.run_of(source)},
                                "dataset.label_fraction": [0.25]},
                       fixed={**fixed, **RESNET}, labels={"model": "resnet18"})
  return sweep.Sweep("demo", points)
