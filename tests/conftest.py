"""Test setup: 8 simulated CPU devices, parsed absl flags, a small prepared phantom set,
the time limit of the slow tests."""

import os

# Before JAX is imported anywhere: sharded code runs on 8 simulated devices, as on a
# small accelerator host. Single-device code is unaffected.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402
import pytest  # noqa: E402

# grain reads absl flags; under pytest nobody calls app.run.
flags.FLAGS.mark_as_parsed()

# The limit of a slow test that sets none (the default, 300 s, is the other tests'): full-size
# models on 2 CPU cores.
SLOW_TIMEOUT_S = 1800


def pytest_collection_modifyitems(items):
  for item in items:
    if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
      item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
  """A small generated phantom data set in its on-disk (ChestX-ray14 list) format."""
  from medbench_jax.data.prepare import phantom
  path = tmp_path_factory.mktemp("phantom")
  phantom.generate(path, seed=0, num_train=96, num_val=40, num_test=40, image_size=96)
  return path


@pytest.fixture(scope="session")
def phantom_builder(phantom_dir, tmp_path_factory):
  from medbench_jax.data import prepare
  builder = prepare.get_builder("phantom_cxr", 64, tmp_path_factory.mktemp("tfds"))
  return builder.prepare_once(phantom_dir)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, phantom_dir):
  """A run of the tiny config trained as users train it (`python -m medbench_jax.main`)."""
  from tests import helpers
  workdir = tmp_path_factory.mktemp("run")
  helpers.main(workdir, phantom_dir, f"--config={helpers.TINY}")
  return workdir
