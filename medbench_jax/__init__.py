"""medbench_jax: large-scale transfer-learning benchmarks for medical imaging in JAX.

Map of the package (arrows run one way: entry points -> trainer -> tasks ->
models / weights / data; data never imports models or the trainer; models never
import data; registries are leaf modules). docs/architecture.md describes it in full.

  main.py          `python -m medbench_jax.main`: flags -> runtime -> prepare -> trainer
  evaluate.py      re-test a finished run's best checkpoints, here or on another data set
  prepare.py       `prepare` CLI: a publisher's files -> validated ArrayRecords, once;
                   --list: every data set's licence, access tier and citation
  convert.py       `convert` CLI: a pretrained checkpoint -> Flax variables on disk
  bench.py         benchmarks that print figures (input pipeline, train/eval speed, soak);
                   `bench lower`: the steps' operations and memory per platform (cpu, cuda, tpu)
  report.py, sweep.py, probe.py   the study's CLIs (see study/)
  runtime.py       process start-up: platform plugin check, jax.distributed, TF off
                   accelerators, the backend in the first log lines, lead/barrier,
                   preemption signals, compilation cache
  paths.py         the cache and default workdirs; local or gs:// paths (etils.epath);
                   atomic JSON writes (a leaf)
  pixel_stats.py   pixel normalizations by name: mean and std (a leaf)
  config_lib.py    the config schema, arg parsing, the wording of config errors (a leaf)
  config_checks.py validate: each component checks its config section (entry level)
  recipes.py       the CPU demo and the study's protocol per task (recipe=bt:
                   BenchmarkTransformers' for classification), for configs/ files
  trainer/         the one fine-tuning loop: state and update step, optimizer, sharding
                   (data x fsdp mesh), checkpoints, the loop (Loop), evaluation
                   (Evaluator), TensorBoard (copied to gs://), trials -> results.json
  tasks/           what differs per task: classification and segmentation (head, loss,
                   eval step, metrics, TensorBoard images, results fields); operating
                   points, calibration and surface distances (not yet in results.json)
  models/          one architecture family per file + the leaf registry; decoders
                   (U-Net, UperNet) over the same encoders; ops.py: CPU rewrites on the
                   CPU only, XLA's native ops on GPU/TPU (chosen at lowering)
  weights/         checkpoint formats -> Flax variables, loaded without executing code
  data/            prepare/ (builders per data-set family, the phantom, DICOM, licences),
                   splits, label policies and fractions, sources (preparation per host),
                   grain pipelines, transforms (one op table, host and device)
  study/           sweeps over many runs (slots: a device per point; the planner's cost),
                   the report (statistics, tables, plots), and transferability
                   estimates (LogME, linear probe)
  benchmarks/      input pipeline, train/eval step, lowering per platform and soak
                   measurements (behind bench); checkpoint save time (its own CLI)

Data flow of a run: config file -> main (flags, runtime.start) -> config_checks.validate ->
data.sources.prepare_for_run (each host, or the lead into a shared data_dir; then a barrier) ->
trainer.run.train_and_evaluate: data.sources.open_splits -> tasks.for_dataset (the
data set's kind picks the task) -> per trial: grain pipelines (data.pipeline) -> model
(models.create) with initial weights (weights.load) -> jitted, sharded update steps
(trainer.loop.Loop.fit) with evaluation, early stopping and checkpoints -> the best checkpoint
on the test split -> trial_K/result.json and test_predictions.npz -> results.json.
"""

__version__ = "0.3.0"
