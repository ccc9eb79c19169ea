"""The per-platform installs resolve against the pins, checked offline and without an
accelerator: requirements-cuda12.txt and requirements-tpu.txt (the pyproject extras
`cuda12` and `tpu`) ask for jax's own extras at the jax pin of requirements.txt, and jax's
metadata pins jaxlib and the plugins of those extras to the same version."""

import importlib.metadata
import re
import tomllib

from packaging.requirements import Requirement
import pytest

from tests.helpers import REPO

# extra -> what jax's extra must bring beside jaxlib (a plugin or libtpu).
EXTRAS = {"cuda12": ("requirements-cuda12.txt", "jax-cuda12-plugin"),
          "tpu": ("requirements-tpu.txt", "libtpu")}


def _requirements(path) -> list[Requirement]:
  lines = (line.split("#")[0].strip() for line in (REPO / path).read_text().splitlines())
  return [Requirement(line) for line in lines if line]


def _pin(requirements: list[Requirement], name: str) -> str:
  (req,) = [r for r in requirements if r.name == name]
  (spec,) = req.specifier
  assert spec.operator == "==", req
  return spec.version


@pytest.fixture(scope="module")
def jax_pin() -> str:
  requirements = _requirements("requirements.txt")
  version = _pin(requirements, "jax")
  assert _pin(requirements, "jaxlib") == version
  # The metadata read below is the pinned jax's.
  assert importlib.metadata.version("jax") == version
  return version


def _jax_extra(extra: str) -> list[Requirement]:
  """What `jax[extra]` installs, from the installed jax's metadata."""
  requirements = [Requirement(r) for r in importlib.metadata.requires("jax")]
  return [r for r in requirements
          if r.marker is not None and r.marker.evaluate({"extra": extra})]


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_platform_requirements_ask_for_jax_extra_at_the_pin(extra, jax_pin):
  path, _ = EXTRAS[extra]
  (req,) = _requirements(path)
  assert (req.name, req.extras, str(req.specifier)) == ("jax", {extra}, f"=={jax_pin}")


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_jax_extra_pins_jaxlib_and_its_plugin_to_the_same_version(extra, jax_pin):
  _, plugin = EXTRAS[extra]
  brought = {r.name: r for r in _jax_extra(extra)}
  assert "jaxlib" in brought and plugin in brought, sorted(brought)
  # jaxlib exactly at the pin (jax writes `<=V,>=V`).
  assert list(brought["jaxlib"].specifier.filter(["0.0.1", jax_pin, "99.0"])) == [jax_pin]
  if plugin == "libtpu":
    # libtpu has its own numbering; jax names the release series it was built with.
    assert re.fullmatch(r"==\d+\.\d+\.\d+\.\*", str(brought[plugin].specifier))
  else:
    assert list(brought[plugin].specifier.filter(["0.0.1", jax_pin, "99.0"])) == [jax_pin]


def test_pyproject_extras_read_the_platform_files():
  with open(REPO / "pyproject.toml", "rb") as f:
    dynamic = tomllib.load(f)["tool"]["setuptools"]["dynamic"]
  extras = dynamic["optional-dependencies"]
  for extra, (path, _) in EXTRAS.items():
    assert extras[extra] == {"file": [path]}
  assert dynamic["dependencies"] == {"file": ["requirements.txt"]}
