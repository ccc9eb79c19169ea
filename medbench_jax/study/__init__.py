"""The study's analysis of finished runs: tables, statistics, plots, transferability.

  runs.py             finds results.json / sweep.json / status.json below a sweep root;
                      one row per trial, the list of missing, failed and incomplete runs
  stats.py            per-run summaries, t-tests against a baseline, multiple-comparison
                      correction, average ranks, Friedman and post-hoc tests
  predictions.py      saved test predictions: bootstrap confidence intervals, DeLong's test
  post_hoc.py         the trials' operating points, calibration and surface distances
                      (Task.post_hoc's records) as frames, reliability bins pooled
  transferability.py  LogME and linear-probe scores of frozen features; rank correlations
  tables.py           Markdown tables in the study's layouts
  plots.py            PNG figures (matplotlib, Agg canvas)
  report.py           all of the above for one sweep: `python -m medbench_jax.report`
  probe.py            frozen features of candidate models on a task, scored before
                      fine-tuning: `python -m medbench_jax.probe`
  sweep.py            sweep files' grids and chains; a sweep's plan, states, sweep.json
  slots.py            where points run: a device (GPU, TPU chip) each by default, per
                      backend, and the environment of each point's process
  planner.py          a sweep's expected device-hours and wall time (its dry run), from
                      `bench train|eval` step times cached per device kind
  sweep_local.py      runs a sweep's points here, on this machine's slots
  sweep_slurm.py      job arrays per dependency wave through submitit, a point per GPU
  sweep_tpu.py        a point per chip of a TPU VM or pod slice (launch/tpu.sh)
  sweep_catalog.py    the study's checkpoints (files, URLs) and target data sets

Apart from probe.py, nothing here imports JAX, the models or the trainer at import time:
a report runs on any machine that can read the run folders (planning a sweep loads its
config files).
"""
