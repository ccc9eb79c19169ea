r"""Scores candidate models for a task before fine-tuning them: LogME and a linear probe
on their frozen features of the task's training split.

  python -m medbench_jax.probe --config=configs/resnet50.py:data=chestxray14 \
      --config.dataset.manual_dir=/data/ChestX-ray14 \
      --candidates=resnet50/random,resnet50//ckpt/moco_v2_800ep.pth,resnet50/timm:resnet50.a1_in1k \
      --out=probe.jsonl [--max_examples=2000] [--config.KEY=VALUE ...]

A candidate is MODEL/INIT, INIT being anything --config.model.init takes (random, a
checkpoint file, FORMAT:PATH, a convert folder, run:WORKDIR, timm:NAME.TAG); the first
"/" ends the model name. --candidates_file lists one per line instead. Each candidate
gives one JSON line (printed, and appended to --out as soon as it is scored; candidates
--out holds already are skipped), the format `python -m medbench_jax.report --probe=FILE`
reads, with the seconds it took. medbench_jax/study/probe.py says how features are taken
(pooled for classification, at sampled pixels for segmentation) and scored.
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from medbench_jax import config_checks
from medbench_jax import runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/swin.py", "Config file, optionally with an arg: FILE:ARG.",
    lock_config=True)
_CANDIDATES = flags.DEFINE_string(
    "candidates", None, "Comma-separated MODEL/INIT, e.g. resnet50/random,resnet50//ckpt/a.pth")
_CANDIDATES_FILE = flags.DEFINE_string(
    "candidates_file", None, "A file with one MODEL/INIT per line (# starts a comment).")
_OUT = flags.DEFINE_string("out", None, "Probe file (JSON lines) the records are appended to.")
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples", 0, "Take features of at most this many training examples (a seeded "
    "random choice); 0: the whole (label-fraction) training split.")
_PIXELS = flags.DEFINE_integer("pixels_per_image", 64,
                               "Segmentation: pixels sampled per image.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if (_CANDIDATES.value is None) == (_CANDIDATES_FILE.value is None):
    raise app.UsageError("Give exactly one of --candidates and --candidates_file.")
  runtime.start()

  from medbench_jax.data import sources
  from medbench_jax.study import probe
  config = _CONFIG.value
  try:
    config_checks.validate(config, model_fits_task=False)  # candidates name the models
    candidates = (probe.parse_candidates(_CANDIDATES.value) if _CANDIDATES.value is not None
                  else probe.read_candidates_file(_CANDIDATES_FILE.value))
    sources.prepare_for_run(config.dataset, shared=False, barrier="dataset_prepared")
    records = probe.run(config, candidates, out=_OUT.value, max_examples=_MAX_EXAMPLES.value,
                        pixels_per_image=_PIXELS.value)
  except (ValueError, FileNotFoundError) as e:
    # Bad candidates, checkpoints that do not fit, unreadable files: the message names them.
    sys.exit(f"probe: {e}")
  for record in records:
    print(json.dumps(record))
  print(probe.format_summary(records), file=sys.stderr)
  runtime.stop()


if __name__ == "__main__":
  app.run(main)
