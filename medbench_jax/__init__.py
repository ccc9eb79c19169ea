"""medbench_jax: large-scale transfer-learning benchmarks for medical imaging in JAX."""

__version__ = "0.3.0"
