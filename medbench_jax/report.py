r"""Reports a sweep: tables with statistics, plots, problem runs, transferability.

  python -m medbench_jax.report --runs=SWEEP_ROOT --out=REPORT_DIR \
      [--baseline=resnet50/imagenet] [--test=student|welch|paired] [--probe=probe.jsonl] \
      [--bootstrap_resamples=1000] [--seed=0] [--alpha=0.05] [--noplots]

Reads every results.json below --runs (and sweep.json / status.json where the sweep
runner wrote them) and writes OUT/report.md with plots/*.png, OUT/summary.csv
(task,dataset,model,init,label_fraction,metric,mean,std,n,p_value,std_paper),
OUT/trials.csv, OUT/problems.csv and the CSVs of each test; medbench_jax/study/report.py
lists them. --baseline is MODEL/INIT with INIT as in results.json or as the report
shows it (a checkpoint by its file name); p-values compare each run's trials with the
baseline's of the same task, data set and label fraction. --probe takes the JSON lines
of transferability estimates ({"task", "dataset", "model", "init", "label_fraction",
"logme", "linear_probe"}). --bootstrap_resamples=0 skips the confidence intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
import sys

from absl import app
from absl import flags
import matplotlib

_RUNS = flags.DEFINE_string("runs", None, "Sweep root: folder holding the run workdirs.")
_OUT = flags.DEFINE_string("out", None, "Folder for the report (created).")
_BASELINE = flags.DEFINE_string("baseline", None, "MODEL/INIT every run is tested against.")
_TEST = flags.DEFINE_enum("test", "student", ["student", "welch", "paired"],
                          "Test against the baseline: two-sample Student t-test, Welch's "
                          "t-test, or paired t-test over the seeds both have.")
_PROBE = flags.DEFINE_string("probe", None, "JSON lines of LogME / linear-probe scores.")
_RESAMPLES = flags.DEFINE_integer("bootstrap_resamples", 1000,
                                  "Bootstrap resamples per trial; 0 skips the intervals.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap resampling.")
_ALPHA = flags.DEFINE_float("alpha", 0.05, "Significance level of markers and diagrams.")
_PLOTS = flags.DEFINE_bool("plots", True, "Draw the PNG plots (--noplots: tables only).")


def main(argv: Sequence[str]) -> None:
  del argv
  matplotlib.use("Agg")  # files only; no display needed or wanted
  from medbench_jax.study import report
  try:
    result = report.build(_RUNS.value, _OUT.value, baseline=_BASELINE.value,
                          test=_TEST.value, probe=_PROBE.value,
                          num_resamples=_RESAMPLES.value, seed=_SEED.value,
                          alpha=_ALPHA.value, with_plots=_PLOTS.value)
  except (ValueError, FileNotFoundError) as e:
    # Bad flags or unreadable sweep files: the message names them; no traceback.
    sys.exit(f"report: {e}")
  print(f"{result.num_runs} runs, {result.num_trials} trials; {len(result.problems)} "
        f"run(s) not used as asked (problems.csv); {len(result.plots)} plots.")
  print(f"Wrote {result.out / 'report.md'}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["runs", "out"])
  app.run(main)
