"""The one fine-tuning loop, for every task.

  state.py        TrainState, model creation, initial variables, the update step
  optim.py        optimizers and learning-rate schedules (reduce-on-plateau on the host)
  sharding.py     the device mesh and the shardings of batches and state
  checkpoints.py  `latest` (resume, incl. the data iterator) and `best` (for test) checkpoints
  loop.py         fit: steps, evaluation cadence, early stopping, plateau, speed, TensorBoard
  evaluation.py   a split's predictions gathered over devices and hosts
  results.py      trial records, results.json, provenance and cost
  trials.py       train_and_evaluate: trials -> results.json

The package imports none of them, so a light module (optim) loads without the rest.
"""
