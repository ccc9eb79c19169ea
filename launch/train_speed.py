r"""Train-step speed of our models against timm + PyTorch, interleaved and repeated.

  python launch/train_speed.py --models=convnext_tiny,resnet50 --batch_size=16 \
      --image_size=224 --repeats=3 [--frameworks=jax,torch,torch_compile] [--dtype=bfloat16]

Every measurement runs in a fresh process (medbench_jax.benchmarks.train_speed) and prints
one JSON line; the frameworks alternate within each repeat so that load from other users of
the machine hits them alike. The last lines give, per model and framework, the medians over
the repeats and our speed relative to each PyTorch variant.
"""

import collections
import json
import os
import statistics
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from medbench_jax.benchmarks import train_speed  # noqa: E402  pylint: disable=g-import-not-at-top

_MODELS = flags.DEFINE_list("models", ["convnext_tiny"], "Model names (timm's).")
_FRAMEWORKS = flags.DEFINE_list("frameworks", ["jax", "torch"],
                                f"Any of {train_speed.FRAMEWORKS}.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per step.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Square input size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", train_speed.DTYPES, "Compute dtype.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per measurement (after the first).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Fresh-process measurements per framework.")

_SUMMARY_KEYS = ("first_step_s", "compile_s", "step_s", "step_cpu_s", "images_per_s",
                 "peak_rss_mb")


def main(argv):
  del argv
  runs = collections.defaultdict(list)
  for model in _MODELS.value:
    for _ in range(_REPEATS.value):
      for framework in _FRAMEWORKS.value:
        result = train_speed.measure(model, batch_size=_BATCH.value, image_size=_SIZE.value,
                                     dtype=_DTYPE.value, steps=_STEPS.value,
                                     framework=framework)
        print(json.dumps(result), flush=True)
        runs[model, framework].append(result)
  for (model, framework), results in runs.items():
    summary = {key: round(statistics.median(r[key] for r in results), 3)
               for key in _SUMMARY_KEYS if key in results[0]}
    line = {"summary": "median", "model": model, "framework": framework,
            "repeats": len(results), **summary}
    if framework == "jax":
      for other in train_speed.FRAMEWORKS[1:]:
        if (model, other) in runs:
          theirs = statistics.median(r["step_s"] for r in runs[model, other])
          line[f"speed_vs_{other}"] = round(theirs / summary["step_s"], 3)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
  app.run(main)
