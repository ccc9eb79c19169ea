"""The study's analysis of finished runs: tables, statistics, plots, transferability.

  runs.py             finds results.json / sweep.json / status.json below a sweep root;
                      one row per trial, the list of missing, failed and incomplete runs
  stats.py            per-run summaries, t-tests against a baseline, multiple-comparison
                      correction, average ranks, Friedman and post-hoc tests
  predictions.py      saved test predictions: bootstrap confidence intervals, DeLong's test
  transferability.py  LogME and linear-probe scores of frozen features; rank correlations
  tables.py           Markdown tables in the study's layouts
  plots.py            PNG figures (matplotlib, Agg canvas)
  report.py           all of the above for one sweep: `python -m medbench_jax.report`
  probe.py            frozen features of candidate models on a task, scored before
                      fine-tuning: `python -m medbench_jax.probe`

Apart from probe.py, nothing here imports JAX, the models or the trainer: a report runs
on any machine that can read the run folders.
"""
