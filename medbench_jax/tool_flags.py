"""Command-line flags that several tools over a finished run take (predict, explain, export).

absl keeps one flag of a name per process and a process may import several of these tools
(the tests import them all), so a flag two of them take is defined here, once; each tool
declares the ones it uses as its key flags (its --help lists them) and its module
docstring says what they mean there. --workdir is evaluate's.
"""

from absl import flags

INPUTS = flags.DEFINE_string(
    "inputs", None, "The images (local files): a folder, a CSV with a path column, a glob "
    "or one file.")
OUT = flags.DEFINE_string(
    "out", None, "Where the results go: predict a .csv or .jsonl file (local or gs://), "
    "explain a local folder, export a folder (local or gs://); created.")
TRIAL = flags.DEFINE_integer(
    "trial", None, "The trial whose best checkpoint is used (explain: default 0; export: "
    "default the median trial).")
BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Images per step (predict: a multiple of the device count, default "
    "the run's input.eval_batch_size; explain: default 8).")
