r"""Converts a pretrained checkpoint once into Flax variables that runs load directly.

  python -m medbench_jax.convert --model=resnet50 \
    --src=/ckpt/moco_v2_800ep_pretrain.pth.tar --dst=/ckpt/resnet50_mocov2

--src takes every source weights.load does (a file of any supported format, FORMAT:PATH,
run:WORKDIR, timm:NAME.TAG). DST gets `variables.safetensors` (the flattened Flax
variables, 'params/layer1_0/conv1/kernel', ...) and `model.json` (model name, classes,
source, format); `--config.model.init=DST` then skips reading and converting the original.
Without --keep_head the classifier is left out (num_classes 0) and every fine-tuning run
draws its own; with --keep_head, --num_classes must match the checkpoint's head.
Prints the parameter count, the dropped keys and the re-initialised keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app
from absl import flags
import jax

from medbench_jax import weights
from medbench_jax.weights import sources

_MODEL = flags.DEFINE_string("model", None, "Registered model name (timm's), e.g. resnet50.")
_SRC = flags.DEFINE_string("src", None, "Checkpoint to convert (any weights.load source).")
_DST = flags.DEFINE_string("dst", None, "Output directory.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 0, "Classes of the head to keep (with "
                                    "--keep_head); 0 converts the backbone only.")
_KEEP_HEAD = flags.DEFINE_bool("keep_head", False, "Keep the checkpoint's classifier.")
_IN_CHANS = flags.DEFINE_integer("in_chans", 3, "1: sum the first conv's RGB kernels for "
                                 "grayscale input.")


def convert(model: str, src: str, dst: str, num_classes: int = 0, keep_head: bool = False,
            in_chans: int = 3) -> weights.LoadReport:
  """Writes the converted checkpoint to `dst` and returns what was loaded and dropped."""
  if keep_head and not num_classes:
    raise ValueError("--keep_head needs --num_classes, the size of the checkpoint's head.")
  variables, report = weights.load_with_report(model, src, num_classes, keep_head=keep_head,
                                               in_chans=in_chans)
  sources.write_converted(dst, variables, {
      "model": model, "num_classes": num_classes, "in_chans": in_chans, "source": src,
      "format": report.format, "keep_head": keep_head})
  return report


def summary(report: weights.LoadReport, variables_count: int) -> str:
  lines = [f"Converted {report.source} (format {report.format}): {variables_count:,} "
           f"parameters and statistics, {report.num_loaded:,} of them from the checkpoint."]
  lines.append(f"Dropped from the checkpoint ({len(report.dropped)}):")
  lines += [f"  {k} {tuple(shape)}  [{report.dropped_reason[k]}]"
            for k, shape in report.dropped.items()]
  lines.append(f"Re-initialised ({len(report.reinitialised)}):")
  lines += [f"  {k} {shape}" for k, shape in report.reinitialised.items()]
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  # Conversion is host work; keep accelerators free for training jobs on the same machine.
  jax.config.update("jax_platforms", "cpu")
  report = convert(_MODEL.value, _SRC.value, _DST.value, _NUM_CLASSES.value, _KEEP_HEAD.value,
                   _IN_CHANS.value)
  flat, _ = sources.read_converted(_DST.value)
  print(summary(report, sum(v.size for v in flat.values())))
  print(f"Wrote {_DST.value}; use it with --config.model.init={_DST.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["model", "src", "dst"])
  app.run(main)
