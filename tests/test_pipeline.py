"""grain pipelines: determinism, resumption, per-process sharding, eval padding, keys."""

import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from medbench_jax.data import pipeline

PP = "random_resized_crop(24, scale=(0.25, 1.0))|flip_lr|rotate(7)"
KEYS = ("image", "labels")


def _source(n=50, size=32):
  # Each image encodes its index, so batches can be traced back to examples.
  return [{"image": np.full((size, size, 1), i, np.uint8),
           "labels": np.array([i % 2, i % 3 == 0], np.float32)} for i in range(n)]


def _take(ds, k):
  it = iter(ds)
  batches = [next(it) for _ in range(k)]
  state = it.get_state()
  if hasattr(it, "close"):
    it.close()
  return batches, state


def _ids(batch):
  return batch["image"].reshape(len(batch["image"]), -1).max(axis=1).tolist()


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_batches_and_resume_is_exact(workers):
  ds = pipeline.train_dataset(_source(), pp_spec=PP, keys=KEYS, local_batch_size=8, seed=3,
                              num_workers=workers)
  full, _ = _take(ds, 8)
  again, _ = _take(ds, 8)
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  _, state = _take(ds, 3)
  it = iter(ds)
  it.set_state(state)
  resumed = [next(it) for _ in range(5)]
  if hasattr(it, "close"):
    it.close()
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["labels"], b["labels"])


def test_epochs_cover_the_data_and_reshuffle():
  source = _source(n=48)
  ds = pipeline.train_dataset(source, pp_spec="", keys=KEYS, local_batch_size=8, seed=0,
                              num_workers=0)
  batches, _ = _take(ds, 12)
  epoch1 = sum((_ids(b) for b in batches[:6]), [])
  epoch2 = sum((_ids(b) for b in batches[6:]), [])
  assert sorted(epoch1) == sorted(epoch2) == list(range(48))
  assert epoch1 != epoch2 and epoch1 != list(range(48))
  other_seed, _ = _take(pipeline.train_dataset(source, pp_spec="", keys=KEYS,
                                               local_batch_size=8, seed=1, num_workers=0), 6)
  assert sum((_ids(b) for b in other_seed), []) != epoch1


def test_processes_get_disjoint_slices_of_one_global_shuffle():
  source = _source(n=48)
  per_process = []
  for p in range(3):
    ds = pipeline.train_dataset(source, pp_spec="", keys=KEYS, local_batch_size=4, seed=0,
                                num_workers=0, process_index=p, process_count=3)
    batches, _ = _take(ds, 4)
    per_process.append(set(sum((_ids(b) for b in batches), [])))
  assert set.union(*per_process) == set(range(48))
  assert sum(len(s) for s in per_process) == 48


@pytest.mark.parametrize("n,batch,processes", [(50, 8, 1), (50, 8, 3), (7, 4, 2)])
def test_eval_sees_every_example_once_with_padding_masked(n, batch, processes):
  source = _source(n=n)
  seen, counts = [], []
  for p in range(processes):
    ds = pipeline.eval_dataset(source, pp_spec="center_crop(24)", keys=KEYS,
                               local_batch_size=batch, num_workers=0, process_index=p,
                               process_count=processes)
    batches = list(pipeline.iterate(ds))
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (batch, 24, 24, 1)
      seen += [i for i, v in zip(_ids(b), b["valid"]) if v]
  assert len(set(counts)) == 1  # every process runs the same number of eval steps
  assert sorted(seen) == list(range(n))


def _segmentation_source(n=16, size=32):
  """Image channel 0 is 255 x the mask: they must move together through every op."""
  rng = np.random.default_rng(0)
  source = []
  for i in range(n):
    mask = np.kron(rng.random((size // 8, size // 8, 2)) < 0.5,
                   np.ones((8, 8, 1))).astype(np.uint8)
    source.append({"image": (mask[..., :1] * 255).astype(np.uint8), "mask": mask,
                   "name": f"case{i}".encode()})
  return source


def test_batches_hold_exactly_the_keys_asked_for():
  source = _segmentation_source()
  # Ops whose image resampling is exact too (rotate's default is nearest neighbour).
  ds = pipeline.train_dataset(source, pp_spec="flip_lr|rotate(10)|center_crop(16)",
                              keys=("image", "mask"), local_batch_size=4, seed=0,
                              num_workers=0)
  batches, _ = _take(ds, 4)
  for batch in batches:
    assert set(batch) == {"image", "mask"}
    assert batch["image"].shape == (4, 16, 16, 1) and batch["mask"].shape == (4, 16, 16, 2)
    assert set(np.unique(batch["mask"])) <= {0, 1}
    np.testing.assert_array_equal(batch["image"][..., 0] == 255, batch["mask"][..., 0] == 1)
  ds = pipeline.eval_dataset(source, pp_spec="resize(8, keys=('image',))",
                             keys=("image", "mask"), local_batch_size=4, num_workers=0)
  batch = next(iter(ds))
  assert set(batch) == {"image", "mask", "valid"}
  assert batch["image"].shape == (4, 8, 8, 1) and batch["mask"].shape == (4, 32, 32, 2)
  with pytest.raises(KeyError, match=r"no \['labels'\]; they have \['image', 'mask', 'name'\]"):
    next(iter(pipeline.train_dataset(source, pp_spec="", keys=("image", "labels"),
                                     local_batch_size=4, seed=0, num_workers=0)))


def test_normalize_broadcasts_gray_to_rgb():
  images = np.array([[[[0]], [[255]]]], np.uint8)  # (1, 2, 1, 1)
  out = np.asarray(pipeline.normalize(images, (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)))
  assert out.shape == (1, 2, 1, 3)
  np.testing.assert_allclose(out[0, 0, 0], [-2.0, -2.0, -3.0], rtol=1e-6)
  np.testing.assert_allclose(out[0, 1, 0], [2.0, 3.0, 7.0], rtol=1e-6)


_TRAINER = """
import time
import numpy as np
from absl import flags
from medbench_jax.data import pipeline
flags.FLAGS.mark_as_parsed()  # grain reads absl flags
source = [{"image": np.full((32, 32, 1), i, np.uint8), "labels": np.zeros(2, np.float32)}
          for i in range(50)]
it = iter(pipeline.train_dataset(source, pp_spec="", keys=("image", "labels"), local_batch_size=8,
                                 seed=0, num_workers=2))
next(it)
print("running", flush=True)
time.sleep(600)
"""


def _children(pid: int) -> list[int]:
  children = []
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      children.append(int(stat.parent.name))
  return children


def _alive(pid: int) -> bool:
  """Running or sleeping; an exited process its new parent has not reaped yet (a zombie)
  counts as gone."""
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  return state not in ("Z", "X")


@pytest.mark.skipif(not pathlib.Path("/proc").is_dir(), reason="reads /proc (Linux)")
def test_workers_exit_when_the_trainer_is_killed():
  """A preempted (SIGKILLed) run must not leave its input worker processes behind."""
  trainer = subprocess.Popen([sys.executable, "-c", _TRAINER], stdout=subprocess.PIPE,
                             text=True, cwd=pathlib.Path(__file__).resolve().parents[1])
  try:
    assert trainer.stdout.readline().strip() == "running"
    workers = _children(trainer.pid)
    assert len(workers) >= 2
  finally:
    trainer.kill()
    trainer.wait()
  deadline = time.time() + 10
  while time.time() < deadline and any(_alive(w) for w in workers):
    time.sleep(0.2)
  assert not [w for w in workers if _alive(w)]
