"""Joint image + mask augmentation for segmentation training, run in grain workers.

The reference study's recipe (BenchmarkTransferLearning, dataloader.py,
build_transform_segmentation), in albumentations 2.0.8, for stored size S:
  OneOf([RandomBrightnessContrast(), RandomGamma()], p=0.3)
  OneOf([ElasticTransform(alpha=120, sigma=6), GridDistortion(),
         OpticalDistortion(distort_limit=2)], p=0.3)
  RandomSizedCrop(min_max_height=(S * 156 / 224, S), size=(S, S), p=0.25)
albumentations 2 removed two arguments the study passed: ElasticTransform's
alpha_affine (a random affine of up to 3.6 px added to the elastic field) and
OpticalDistortion's shift_limit (which was always 0 in 1.3.0: a rounded uniform draw
from +-0.5). Three defaults changed in 2.x and are set back to 1.3.0's here, which
doubles the distortions' median displacement against 2.x's defaults (docs/protocol.md
gives the measurement): reflected borders instead of black fill, uniform instead of
Gaussian elastic noise, and GridDistortion without step normalisation.

Geometric transforms move the image, the mask and the FOV (where present) with the
same sampled parameters; masks are resampled by nearest neighbour, so they stay 0/1.
A spec uses it as the op `seg_augment(S)` (data/transforms.py), deterministic given
grain's per-example generator.
"""

from __future__ import annotations

import threading
from typing import Any

import albumentations as A
import cv2
import numpy as np

# The study's crop heights are 156..224 for 224-pixel inputs.
CROP_MIN_FRACTION = 156 / 224
# albumentations 1.3.0's border for the distortions (2.x fills with black by default).
_STUDY_BORDER = cv2.BORDER_REFLECT_101


def build(size: int) -> A.Compose:
  """The study's training augmentation for (size, size) images, masks and FOVs."""
  return A.Compose([
      A.OneOf([A.RandomBrightnessContrast(), A.RandomGamma()], p=0.3),
      A.OneOf([
          A.ElasticTransform(alpha=120, sigma=120 * 0.05, noise_distribution="uniform",
                             border_mode=_STUDY_BORDER),
          A.GridDistortion(normalized=False, border_mode=_STUDY_BORDER),
          A.OpticalDistortion(distort_limit=2, border_mode=_STUDY_BORDER),
      ], p=0.3),
      A.RandomSizedCrop(min_max_height=(int(round(size * CROP_MIN_FRACTION)), size),
                        size=(size, size), p=0.25),
  ], additional_targets={"fov": "mask"})


def _reseed(transform: A.BasicTransform | A.BaseCompose, rng: np.random.Generator) -> None:
  """Gives every transform in the tree its own seed drawn from `rng`.

  albumentations' set_random_seed hands a compose's one seed to all its children,
  so their "apply with probability p" draws would be the same number: the crop
  would only ever come with a distortion. Parents first, then each child overrides.
  """
  transform.set_random_seed(int(rng.integers(2**32)))
  for child in getattr(transform, "transforms", ()):
    _reseed(child, rng)


class SegAugment:
  """The augmentation as an op: an example -> the same example, image/mask/fov augmented."""

  def __init__(self, size: int):
    self.size = size
    # A Compose is costly to build (~4 ms) and holds its random state, and grain
    # calls one transform from several threads: one Compose per thread, reseeded
    # from grain's generator for every example.
    self._local = threading.local()

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    compose = getattr(self._local, "compose", None)
    if compose is None:
      compose = self._local.compose = build(self.size)
    _reseed(compose, rng)
    targets = {key: np.asarray(example[key]) for key in ("image", "mask", "fov")
               if key in example}
    out = compose(**targets)
    return {**example, **{key: np.ascontiguousarray(out[key]) for key in targets}}
