"""Test setup: 8 simulated CPU devices, parsed absl flags, a small prepared phantom set."""

import os

# Before JAX is imported anywhere: sharded code runs on 8 simulated devices, as on a
# small accelerator host. Single-device code is unaffected.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402
import pytest  # noqa: E402

# grain reads absl flags; under pytest nobody calls app.run.
flags.FLAGS.mark_as_parsed()


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
