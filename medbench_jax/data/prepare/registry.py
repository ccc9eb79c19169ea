def names():
  from medbench_jax.data import builders
  return sorted(builders.BUILDERS)
