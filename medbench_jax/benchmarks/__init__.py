"""Measurements that print figures, never pass/fail: train_speed (train and eval steps
against the PyTorch reference), soak (a long run watched for leaks)."""
