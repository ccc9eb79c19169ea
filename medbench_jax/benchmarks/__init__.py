"""Measurements that print figures, never pass/fail: train_speed (train step against the
PyTorch reference)."""
