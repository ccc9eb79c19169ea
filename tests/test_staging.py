"""data/prepare/staging.py: decoding in a process pool stores what decoding in-process does."""

import numpy as np

from medbench_jax.data import prepare
from medbench_jax.data import splits
from medbench_jax.data.prepare import staging


def test_process_pool_stores_the_same_bytes(tmp_path, phantom_dir, phantom_builder,
                                            monkeypatch):
  monkeypatch.setattr(staging, "POOL_MIN_RECORDS", 0)
  pooled = prepare.get_builder("phantom_cxr", 64, tmp_path / "pool").prepare_once(
      phantom_dir, workers=2)
  for split in splits.SPLITS:
    a, b = pooled.as_data_source(split), phantom_builder.as_data_source(split)
    assert len(a) == len(b)
    for i in range(0, len(a), 7):
      np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
