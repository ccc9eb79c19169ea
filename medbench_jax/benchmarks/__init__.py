"""Measurements behind `python -m medbench_jax.bench` that print figures, never pass/fail:
input_speed (the training input pipeline against the reference code's), train_speed
(train and eval steps against PyTorch), soak (a long run watched for leaks)."""
