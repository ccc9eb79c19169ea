"""trainer/results.py: trial summaries against numpy and scipy; provenance and cost."""

import hashlib
import math

import numpy as np
import scipy.stats

from medbench_jax.trainer import results


def test_summary_matches_numpy_and_scipy():
  values = [0.81, 0.79, 0.84, 0.80, math.nan, None]
  s = results.summarize(values)
  finite = np.array(values[:4])
  assert s["n"] == 4
  assert abs(s["mean"] - finite.mean()) < 1e-12
  assert abs(s["std"] - finite.std(ddof=1)) < 1e-12
  assert abs(s["std"] / math.sqrt(4) - scipy.stats.sem(finite)) < 1e-12
  # The reference study prints np.std: the population standard deviation.
  assert abs(s["std_paper"] - np.std(finite)) < 1e-12
  one = results.summarize([0.8])
  assert math.isnan(one["std"]) and one["std_paper"] == 0.0 and one["n"] == 1


def test_weights_file_and_its_hash(tmp_path):
  ckpt = tmp_path / "r50.pth"
  ckpt.write_bytes(b"weights" * 1000)
  assert results.weights_file("random") is None
  assert results.weights_file(str(ckpt)) == str(ckpt)
  assert results.weights_file(f"moco:{ckpt}") == str(ckpt)
  assert results.weights_file(str(tmp_path / "missing.pth")) is None
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "results.json").write_text("{}")
  assert results.weights_file(f"run:{tmp_path / 'run'}/trial_1") == str(
      tmp_path / "run" / "results.json")
  assert results.sha256_file(ckpt) == hashlib.sha256(b"weights" * 1000).hexdigest()
