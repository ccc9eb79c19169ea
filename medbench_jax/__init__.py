"""medbench_jax: large-scale transfer-learning benchmarks for medical imaging in JAX."""
