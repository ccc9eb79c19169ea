"""runtime.py: the accelerator a run is asked for must be there (its plugin installed), and
a run's first log lines name the backend and its devices."""

import logging
import subprocess
import sys

import jax
import pytest

from medbench_jax import runtime
from tests import helpers


@pytest.mark.parametrize("platforms,install", [
    ("cuda", "requirements-cuda12.txt"), ("tpu", "requirements-tpu.txt"),
    ("cpu,gpu", "requirements-cuda12.txt")])
def test_an_accelerator_without_its_plugin_is_an_error(platforms, install):
  with pytest.raises(RuntimeError, match=f"JAX_PLATFORMS={platforms} asks for .*{install}"):
    runtime.check_platforms(platforms)


def test_the_cpu_needs_no_plugin():
  for platforms in ("", "cpu", " CPU "):
    runtime.check_platforms(platforms)


def test_main_with_jax_platforms_cuda_fails_naming_the_install_command(tmp_path):
  """Not a silent CPU run: main stops before any work, saying what to install."""
  out = subprocess.run(
      [sys.executable, "-m", "medbench_jax.main", f"--config={helpers.TINY}",
       f"--workdir={tmp_path / 'run'}"], cwd=helpers.REPO, capture_output=True, text=True,
      env=helpers.subprocess_env(JAX_PLATFORMS="cuda"), timeout=120)
  assert out.returncode != 0
  assert ("JAX_PLATFORMS=cuda asks for cuda, but JAX's cuda plugin is not installed"
          in out.stderr)
  assert "pip install -r requirements-cuda12.txt" in out.stderr
  assert not (tmp_path / "run").exists()


def test_the_backend_and_device_counts_are_logged(caplog):
  with caplog.at_level(logging.INFO):
    runtime.log_backend()
  (line,) = [r.getMessage() for r in caplog.records if "JAX backend" in r.getMessage()]
  assert line == (f"JAX backend: cpu (cpu), {jax.local_device_count()} local device(s), "
                  f"{jax.device_count()} global device(s), process 0 of 1.")
