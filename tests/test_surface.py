"""tasks/surface.py: HD95 and ASSD against medpy and a brute-force reference; empty masks;
pooling."""

import math

from medpy.metric import binary
import numpy as np
import pytest

from medbench_jax.tasks import surface


def _blobs(seed, shape=(48, 40)):
  """Two overlapping random ellipses with ragged edges."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:shape[0], :shape[1]]

  def ellipse():
    cy, cx = rng.uniform(12, shape[0] - 12), rng.uniform(12, shape[1] - 12)
    ry, rx = rng.uniform(4, 11, size=2)
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return inside ^ (rng.uniform(size=shape) < 0.03) & inside

  return ellipse(), ellipse()


def _brute_force(a, b, spacing):
  """Every border pixel against every border pixel of the other mask."""
  def edge(m):
    padded = np.pad(m, 1)
    core = padded[1:-1, 1:-1]
    neighbours = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return np.argwhere(core & ~neighbours) * np.asarray(spacing)

  pa, pb = edge(a), edge(b)
  d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
  return np.concatenate([d.min(axis=1), d.min(axis=0)])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", [1.0, (0.7, 1.3)])
def test_hd95_and_assd_equal_medpy_and_brute_force(seed, spacing):
  a, b = _blobs(seed)
  distances = surface.surface_distances(a, b, spacing)
  sampling = (spacing, spacing) if np.isscalar(spacing) else spacing
  assert surface.hd95(distances) == pytest.approx(binary.hd95(a, b, voxelspacing=sampling),
                                                  abs=1e-9)
  assert surface.assd(distances) == pytest.approx(binary.assd(a, b, voxelspacing=sampling),
                                                  abs=1e-9)
  np.testing.assert_allclose(np.sort(distances), np.sort(_brute_force(a, b, sampling)),
                             atol=1e-9)


def test_identical_masks_are_at_distance_zero():
  a, _ = _blobs(0)
  assert surface.hd95(surface.surface_distances(a, a)) == 0.0


def test_empty_masks_convention():
  empty = np.zeros((10, 20), bool)
  mask = empty.copy()
  mask[2:5, 3:9] = True
  assert surface.surface_distances(empty, empty).size == 0
  assert surface.hd95(np.zeros(0)) == surface.assd(np.zeros(0)) == 0.0
  distances = surface.surface_distances(mask, empty, spacing=(2.0, 0.5))
  diagonal = math.hypot(9 * 2.0, 19 * 0.5)
  assert len(distances) == surface.border(mask).sum() == 14
  assert surface.hd95(distances) == pytest.approx(diagonal)
  assert surface.assd(distances) == pytest.approx(diagonal)
  np.testing.assert_array_equal(distances, surface.surface_distances(empty, mask, (2.0, 0.5)))


def test_pooling_over_images_and_classes():
  pairs = [_blobs(s) for s in range(4)]
  predicted = np.stack([np.stack([p, t], -1) for p, t in pairs])  # (4, H, W, 2)
  target = np.stack([np.stack([t, p], -1) for p, t in pairs])
  empty_target = target.copy()
  empty_target[3, ..., 1] = False  # a structure predicted but not there
  empty_target[2] = False
  predicted[2] = False  # an image with nothing in it at all
  accumulator = surface.SurfaceMetrics(("x", "y"), spacing=1.0)
  accumulator.add(predicted[:3], empty_target[:3])
  accumulator.add(predicted[3:], empty_target[3:])  # batches accumulate
  result = accumulator.result()
  assert result == surface.surface_metrics(predicted, empty_target, ("x", "y"))
  per = [[surface.surface_distances(predicted[i, ..., c], empty_target[i, ..., c])
          for c in range(2)] for i in range(4)]
  everything = np.concatenate([d for image in per for d in image])
  assert result["hd95"] == pytest.approx(np.percentile(everything, 95))
  assert result["assd"] == pytest.approx(everything.mean())
  image_hd95 = [surface.hd95(np.concatenate(image)) for image in per]
  assert image_hd95[2] == 0.0  # both empty: perfect
  assert result["mean_hd95"] == pytest.approx(np.mean(image_hd95))
  y = np.concatenate([image[1] for image in per])
  assert result["assd/y"] == pytest.approx(y.mean())
  assert result["mean_assd/x"] == pytest.approx(np.mean([surface.assd(im[0]) for im in per]))
  assert result["surface_one_empty"] == 1
  assert result["hd95/y"] == pytest.approx(math.hypot(47, 39))  # the empty one dominates


def test_field_of_view_removes_outside_pixels():
  a, b = _blobs(1)
  fov = np.zeros(a.shape, bool)
  fov[:, :20] = True
  inside = surface.surface_metrics(a[None, ..., None], b[None, ..., None], ("v",),
                                   fov=fov[None])
  cropped = surface.surface_distances(a & fov, b & fov)
  assert inside["assd"] == pytest.approx(surface.assd(cropped))


def test_no_images_and_bad_shapes():
  assert math.isnan(surface.SurfaceMetrics(("v",)).result()["hd95"])
  with pytest.raises(ValueError, match="equal"):
    surface.surface_distances(np.zeros((3, 3)), np.zeros((3, 4)))
  with pytest.raises(ValueError, match="positive"):
    surface.surface_distances(np.zeros((3, 3)), np.zeros((3, 3)), spacing=0)
  with pytest.raises(ValueError, match="channels"):
    surface.SurfaceMetrics(("v",)).add(np.zeros((1, 3, 3, 2)), np.zeros((1, 3, 3, 2)))
