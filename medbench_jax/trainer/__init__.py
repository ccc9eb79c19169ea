"""The one fine-tuning loop, for every task.

  state.py        TrainState, model creation, initial variables, the update step
  optim.py        optimizers and learning-rate schedules (reduce-on-plateau on the host)
  sharding.py     the device mesh and the shardings of batches and state
  checkpoints.py  `latest` (resume, incl. the data iterator) and `best` (for test) checkpoints
  loop.py         fit: steps, evaluation cadence, early stopping, plateau, speed, TensorBoard
  evaluation.py   a split's predictions gathered over devices and hosts
  results.py      trial records, results.json, provenance and cost
  trials.py       one trial: train -> best checkpoint -> test -> trial_K/
  packed.py       train.pack_trials: N trials of a config as one vmapped program
  run.py          train_and_evaluate: all trials (one by one or packed) -> results.json

The package imports none of them, so a light module (optim) loads without the rest.
"""
