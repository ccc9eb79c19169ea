"""Procedural "phantom" chest X-ray data set: the embedded default data set.

Real chest X-ray collections need a registration and a multi-GB download, so a new
user could not see the system train end to end. This module draws PA chest
radiograph look-alikes with cv2/numpy, fast enough to make thousands of images in
seconds on one CPU core, and writes them in the same on-disk formats as the real
data sets (ChestX-ray14 split lists, per-class binary segmentation masks), so the
same loaders serve both.

Findings follow rules a radiologist would recognise, and labels are derived from
the rendered geometry rather than coin flips, so they are learnable:

* Cardiomegaly: cardiothoracic ratio (max heart width / max internal thorax width,
  both measured on the masks) above 0.5.
* Nodule: one or two round soft-edged opacities inside a lung field.
* Effusion: fluid-density meniscus filling the costophrenic angle (more likely with
  cardiomegaly, as in heart failure).
* Pneumothorax: a thin pleural line parallel to the chest wall with a lucent,
  marking-free space between it and the wall.

Orientation: images are PA views as displayed clinically, so the patient's left is
on the image's RIGHT. ``left_lung`` is therefore the lung on the image's right
side and the heart bulges towards the image's right.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import pathlib

import cv2
import numpy as np

from medbench_jax import paths
from medbench_jax.data.prepare import staging

FINDINGS = ("Cardiomegaly", "Nodule", "Effusion", "Pneumothorax")
MASK_CLASSES = ("left_lung", "right_lung", "heart", "clavicles")
# Lesion masks are returned by render() for tests and localisation experiments, but
# not written to disk: the real data sets have no such masks.
LESION_CLASSES = ("nodule", "effusion", "pneumothorax")
CTR_THRESHOLD = 0.5
FORMAT_VERSION = 2

_SPLITS = ("train", "val", "test")
_META_NAME = "phantom_meta.json"
_PARAMS = ("version", "seed", "image_size", "num_train", "num_val", "num_test")
# Fixed-point precision for cv2 drawing: sub-pixel geometry keeps shapes smooth
# when the image is small.
_SHIFT = 4
_ONE = 1 << _SHIFT
_P_EFFUSION_CARDIO = 0.4
_P_EFFUSION_NORMAL = 0.1
_P_NODULE = 0.25
_P_PNEUMOTHORAX = 0.2


def cardiothoracic_ratio(heart: np.ndarray, lungs: np.ndarray) -> float:
  """CTR as read on a PA film: widest heart extent over widest inner thorax extent.

  The inner thorax width is the horizontal span from the outer edge of one lung
  to the outer edge of the other, which is what the lung masks delimit.
  """
  heart_cols = np.flatnonzero(heart.any(axis=0))
  lung_cols = np.flatnonzero(lungs.any(axis=0))
  if heart_cols.size == 0 or lung_cols.size == 0:
    return 0.0
  return float(heart_cols[-1] - heart_cols[0] + 1) / float(lung_cols[-1] - lung_cols[0] + 1)


def _fixed(points: np.ndarray) -> np.ndarray:
  return np.round(np.asarray(points, np.float64) * _ONE).astype(np.int32)


def _fill(shape: tuple[int, int], polygons: list[np.ndarray]) -> np.ndarray:
  mask = np.zeros(shape, np.uint8)
  cv2.fillPoly(mask, [_fixed(p) for p in polygons], 1, cv2.LINE_8, _SHIFT)
  return mask.astype(bool)


def _blur(layer: np.ndarray, sigma: float) -> np.ndarray:
  return cv2.GaussianBlur(layer, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)


def _lung_polygon(side: int, cx: float, tw: float, y_apex: float, y_cp: float,
                  dome_h: float, t_widest: float) -> tuple[np.ndarray, np.ndarray]:
  """Outline of one lung (side -1: image left, +1: image right), before the heart
  and mediastinum are cut out of it, and its diaphragm curve (x, y points).

  The lateral wall bulges quickly from a rounded apex to the widest point; the base
  is a diaphragm dome that rises steeply from the lateral, sharp costophrenic angle.
  """
  t = np.linspace(0.0, 1.0, 28)
  y = y_apex + t * (y_cp - y_apex)
  rise = np.sqrt(1.0 - (1.0 - np.minimum(t / t_widest, 1.0)) ** 2)
  lateral = np.stack([cx + side * tw * (0.3 + 0.7 * rise), y], axis=1)
  rise_med = np.sqrt(1.0 - (1.0 - np.minimum(t / 0.2, 1.0)) ** 2)
  medial = np.stack([cx + side * tw * (0.3 - 0.22 * rise_med), y], axis=1)
  u = np.linspace(0.0, 1.0, 24)
  x_lat, x_med = lateral[-1, 0], medial[-1, 0]
  dome = np.sin(0.5 * np.pi * np.minimum(u / 0.45, 1.0)) ** 0.6
  dome = dome * (1.0 - 0.25 * np.maximum(u - 0.45, 0.0) / 0.55)
  base = np.stack([x_lat + u * (x_med - x_lat), y_cp - dome_h * dome], axis=1)
  return np.concatenate([lateral, base[1:], medial[::-1][1:]], axis=0), base


def _draw_vessels(rng: np.random.Generator, layer: np.ndarray, hilum: tuple[float, float],
                  side: int, s: float) -> None:
  """Branching pulmonary vessels ("lung markings") radiating from a hilum.

  Branches get shorter, thinner and fainter at each generation, so markings fade
  towards the periphery as on real films; drawn one cv2 call per generation.
  """
  n = int(rng.integers(8, 12))
  angles = np.linspace(-1.45, 1.35, n) + rng.uniform(-0.12, 0.12, n)
  starts = np.tile(np.asarray(hilum, np.float64), (n, 1))
  starts += rng.uniform(-0.015, 0.015, (n, 2)) * s
  lengths = rng.uniform(0.07, 0.11, n) * s
  for depth, (value, width) in enumerate(((1.0, 2.2), (0.8, 1.6), (0.6, 1.0), (0.45, 1.0))):
    ends = starts + lengths[:, None] * np.stack([side * np.cos(angles), np.sin(angles)], 1)
    segments = _fixed(np.stack([starts, ends], axis=1))
    cv2.polylines(layer, list(segments), False, value,
                  max(1, int(round(width * s / 256))), cv2.LINE_AA, _SHIFT)
    if depth == 3:
      break
    m = len(starts)
    spread = rng.uniform(0.2, 0.6, m)
    angles = np.concatenate([angles - spread, angles + spread * rng.uniform(0.5, 1.0, m)])
    angles += rng.normal(0.0, 0.12, 2 * m)
    starts = np.concatenate([ends, ends])
    lengths = np.concatenate([lengths, lengths]) * rng.uniform(0.55, 0.8, 2 * m)


def _draw_ribs(rng: np.random.Generator, posterior: np.ndarray, anterior: np.ndarray,
               cx: float, tw: float, y_apex: float, y_cp: float, t_widest: float,
               s: float) -> None:
  """Posterior ribs arc from the spine up, then laterally and down along the cage;
  anterior ribs run from the lateral wall obliquely down towards the sternum and
  stop short of it (costal cartilage is radiolucent)."""
  spacing = rng.uniform(0.062, 0.07) * (y_cp - y_apex) / 0.65
  u = np.linspace(0.0, 1.0, 20)
  post, ant = [], []
  for side in (-1, 1):
    for i in range(10):
      y0 = y_apex + (i - 0.3) * spacing
      t = np.clip((y0 - y_apex + 0.02 * s) / (y_cp - y_apex) / t_widest, 0.0, 1.0)
      reach = tw * (0.3 + 0.75 * np.sqrt(1.0 - (1.0 - t) ** 2))
      x = cx + side * (0.03 * s + u * reach)
      arch = (0.045 - 0.0025 * i) * s
      y = y0 - arch * np.sin(np.pi * u * 0.75) + (0.05 + 0.008 * i) * s * u ** 3
      post.append(np.stack([x, y], 1))
      ua = u * 0.6
      xa = cx + side * (reach + 0.02 * s) * (1.0 - ua)
      ya = y0 + 0.045 * s + 0.14 * s * ua - 0.04 * s * (1 - ua) ** 4
      ant.append(np.stack([xa, ya], 1))
  thick = max(1, int(round(0.016 * s)))
  cv2.polylines(posterior, [_fixed(p) for p in post], False, 1.0, thick, cv2.LINE_AA, _SHIFT)
  cv2.polylines(anterior, [_fixed(p) for p in ant], False, 1.0, thick + 1, cv2.LINE_AA, _SHIFT)


@dataclasses.dataclass(frozen=True)
class _Habitus:
  """The patient's build, in pixel units of an `s`-pixel image, upright position."""
  s: float
  cx: float  # midline
  tw: float  # half inner thorax width
  bw: float  # half body width
  y_apex: float
  y_cp_base: float  # the left costophrenic angle
  y_cp: dict[int, float]  # costophrenic angle per side (-1: image left, +1: image right)
  dome_h: dict[int, float]  # diaphragm dome height per side
  t_widest: float  # where the lateral lung wall is widest, as a fraction of its height
  mw: float  # half upper mediastinum width

  @property
  def y_hilum(self) -> float:
    return self.y_apex + 0.42 * (self.y_cp_base - self.y_apex)

  @property
  def y_base(self) -> float:
    """Height of the heart's base, where the diaphragm meets it."""
    return self.y_cp[1] - 0.8 * self.dome_h[1]


@dataclasses.dataclass(frozen=True)
class _Anatomy:
  """The habitus drawn on the image grid: boolean masks and the diaphragm height per
  column (below it lies the dense abdomen)."""
  habitus: _Habitus
  shape: tuple[int, int]
  # Pixel coordinates as a column and a row: they broadcast to full images.
  yy: np.ndarray
  xx: np.ndarray
  lungs: dict[int, np.ndarray]  # per side, as `_Habitus.y_cp`
  heart: np.ndarray
  mediastinum: np.ndarray
  diaphragm: np.ndarray
  body: np.ndarray

  @property
  def lung_any(self) -> np.ndarray:
    return self.lungs[-1] | self.lungs[1]

  @property
  def central(self) -> np.ndarray:
    """The dense centre of the chest: mediastinum and heart."""
    return self.mediastinum | self.heart


def _draw_habitus(rng: np.random.Generator, s: float) -> _Habitus:
  cx = 0.5 * s
  tw = rng.uniform(0.29, 0.37) * s
  bw = tw + rng.uniform(0.05, 0.09) * s
  y_apex = rng.uniform(0.09, 0.14) * s
  y_cp_base = rng.uniform(0.78, 0.85) * s
  # Patient's right (image left) hemidiaphragm sits higher than the left one.
  y_cp = {-1: y_cp_base - rng.uniform(0.0, 0.02) * s, 1: y_cp_base}
  dome_h = {-1: rng.uniform(0.08, 0.11) * s, 1: rng.uniform(0.06, 0.09) * s}
  t_widest = rng.uniform(0.55, 0.75)
  mw = rng.uniform(0.04, 0.055) * s
  return _Habitus(s, cx, tw, bw, y_apex, y_cp_base, y_cp, dome_h, t_widest, mw)


def _draw_mediastinum(rng: np.random.Generator, h: _Habitus, shape: tuple[int, int]
                      ) -> np.ndarray:
  """Mediastinum with the aortic knob bulging towards the patient's left."""
  cx, mw, s, y_apex, y_hilum, y_base = h.cx, h.mw, h.s, h.y_apex, h.y_hilum, h.y_base
  y_knob = y_apex + rng.uniform(0.18, 0.26) * (h.y_cp_base - y_apex)
  knob = rng.uniform(1.3, 1.8)
  return _fill(shape, [np.array([
      [cx - mw, 0], [cx - 0.95 * mw, y_apex + 0.05 * s], [cx - 1.2 * mw, y_hilum],
      [cx - 1.3 * mw, y_base], [cx + 1.3 * mw, y_base], [cx + 1.1 * mw, y_knob + 0.05 * s],
      [cx + knob * mw, y_knob], [cx + 1.05 * mw, y_knob - 0.05 * s], [cx + mw, 0]])])


def _draw_heart(rng: np.random.Generator, h: _Habitus, shape: tuple[int, int]) -> np.ndarray:
  """The whole heart, before the diaphragm hides its lower part: a rotated ellipse whose
  horizontal extent is sampled as a CTR so the ratio varies continuously across the 0.5
  threshold."""
  ctr_target = float(np.clip(rng.normal(0.45, 0.06), 0.36, 0.64))
  theta = np.deg2rad(rng.uniform(30.0, 50.0))
  aspect = rng.uniform(0.72, 0.88)
  half_w = ctr_target * h.tw
  a = half_w / np.sqrt(np.cos(theta) ** 2 + (aspect * np.sin(theta)) ** 2)
  b = aspect * a
  half_h = np.sqrt((a * np.sin(theta)) ** 2 + (b * np.cos(theta)) ** 2)
  hx = h.cx + half_w * rng.uniform(0.15, 0.32)
  hy = h.y_base - 0.5 * half_h
  ellipse = cv2.ellipse2Poly((int(hx * _ONE), int(hy * _ONE)),
                             (int(a * _ONE), int(b * _ONE)), int(np.rad2deg(theta)), 0, 360, 5)
  return _fill(shape, [ellipse.astype(np.float64) / _ONE])


def _diaphragm(h: _Habitus, polys: dict[int, tuple[np.ndarray, np.ndarray]],
               heart_full: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """Diaphragm height per column: the lungs' domes, the flat base under the heart."""
  diaphragm = np.full(cols.size, h.y_base, np.float32)
  for side in (-1, 1):
    base = polys[side][1][::-side]  # x increasing for np.interp
    inside = (cols >= base[0, 0]) & (cols <= base[-1, 0])
    diaphragm[inside] = np.interp(cols[inside], base[:, 0], base[:, 1])
    diaphragm[(cols - h.cx) * side > h.tw] = h.y_cp[side]
  under_heart = heart_full.any(axis=0)
  diaphragm[under_heart] = np.minimum(diaphragm[under_heart], h.y_base)
  return diaphragm


def _body_outline(h: _Habitus, shape: tuple[int, int]) -> np.ndarray:
  """Neck, shoulders and flanks."""
  cx, bw, s = h.cx, h.bw, h.s
  return _fill(shape, [np.array([
      [cx - 0.12 * s, -1], [cx - 0.2 * s, 0.06 * s], [cx - bw - 0.05 * s, 0.12 * s],
      [cx - bw - 0.02 * s, 0.3 * s], [cx - bw, 0.55 * s], [cx - 1.02 * bw, s + 1],
      [cx + 1.02 * bw, s + 1], [cx + bw, 0.55 * s], [cx + bw + 0.02 * s, 0.3 * s],
      [cx + bw + 0.05 * s, 0.12 * s], [cx + 0.2 * s, 0.06 * s], [cx + 0.12 * s, -1]])])


def _draw_anatomy(rng: np.random.Generator, image_size: int) -> _Anatomy:
  """A random habitus and the organs' masks it gives (pixel units, upright position)."""
  shape = (image_size, image_size)
  yy = np.arange(image_size, dtype=np.float32)[:, None]
  xx = np.arange(image_size, dtype=np.float32)[None, :]
  h = _draw_habitus(rng, float(image_size))
  polys = {side: _lung_polygon(side, h.cx, h.tw, h.y_apex, h.y_cp[side], h.dome_h[side],
                               h.t_widest)
           for side in (-1, 1)}
  cavity = {side: _fill(shape, [polys[side][0]]) for side in (-1, 1)}
  mediastinum = _draw_mediastinum(rng, h, shape)
  heart_full = _draw_heart(rng, h, shape)
  diaphragm = _diaphragm(h, polys, heart_full, xx[0])
  # The heart sits on the diaphragm: its lower part merges with the abdomen.
  above = yy < diaphragm[None, :]
  heart = heart_full & above
  mediastinum &= above
  lungs = {side: cavity[side] & ~mediastinum & ~heart_full & above for side in (-1, 1)}
  return _Anatomy(h, shape, yy, xx, lungs, heart, mediastinum, diaphragm,
                  _body_outline(h, shape))


def _soft_tissue(rng: np.random.Generator, anatomy: _Anatomy
                 ) -> tuple[np.ndarray, np.ndarray]:
  """The attenuation map of body, organs and air (brighter means more attenuating, as on
  a radiograph), and the aeration: what the air in the lungs takes off it."""
  h, yy, xx = anatomy.habitus, anatomy.yy, anatomy.xx
  cx, bw, s = h.cx, h.bw, h.s
  # Soft tissue thickness follows an elliptic body cross-section.
  rel = np.clip((xx - cx) / (bw + 0.05 * s), -1.0, 1.0)
  atten = (0.3 * np.sqrt(1.0 - rel * rel) ** 0.7 + 0.1
           + 0.16 * ((yy > anatomy.diaphragm[None, :]) & (np.abs(xx - cx) < bw)))
  atten += 0.16 * anatomy.central
  atten += 0.04 * (np.abs(xx - cx) < rng.uniform(0.032, 0.042) * s)
  trachea = (np.abs(xx - cx + 0.008 * s) < 0.015 * s) & (yy < h.y_hilum - 0.05 * s)
  atten -= 0.1 * trachea
  bubble = (((xx - cx - 0.17 * s) / (0.05 * s)) ** 2
            + ((yy - h.y_cp[1] - 0.03 * s) / (0.03 * s)) ** 2 < 1)
  atten -= rng.uniform(0.0, 0.12) * bubble
  atten = _blur(atten * anatomy.body, 0.8 * s / 256)

  lung_f = anatomy.lung_any.astype(np.float32)
  lung_depth = 0.5 * _blur(lung_f, 1.0 * s / 256) + 0.5 * _blur(lung_f, 10.0 * s / 256)
  # Upper zones are overlapped by shoulder girdle soft tissue, so less lucent.
  aeration = lung_depth * (0.2 + 0.06 * np.clip((yy - h.y_apex) / (h.y_cp_base - h.y_apex),
                                                0, 1))
  atten -= aeration
  return atten, aeration


def _add_pneumothorax(rng: np.random.Generator, anatomy: _Anatomy, atten: np.ndarray,
                      visible: np.ndarray, lesions: dict[str, np.ndarray]) -> None:
  """Maybe a pneumothorax (in place): the lung collapsed towards its hilum leaves a
  lucent rim."""
  h, s, shape = anatomy.habitus, anatomy.habitus.s, anatomy.shape
  if rng.random() < _P_PNEUMOTHORAX:
    side = int(rng.choice((-1, 1)))
    anchor = (h.cx + side * h.tw * 0.25, h.y_apex + 0.6 * (h.y_cp[side] - h.y_apex))
    warp = cv2.getRotationMatrix2D(anchor, 0.0, rng.uniform(0.6, 0.85))
    lung_u8 = anatomy.lungs[side].astype(np.uint8)
    collapsed = cv2.warpAffine(lung_u8, warp, shape[::-1], flags=cv2.INTER_NEAREST) & lung_u8
    space = anatomy.lungs[side] & ~collapsed.astype(bool)
    kernel = np.ones((3, 3), np.uint8)
    edge = (collapsed - cv2.erode(collapsed, kernel)).astype(bool)
    # Two pixels wide at 256 px so the pleural line survives downscaling to ~100 px.
    line = cv2.dilate((edge & cv2.dilate(space.astype(np.uint8), kernel).astype(bool)
                       ).astype(np.uint8), kernel).astype(bool) & ~space
    if space.any():
      lesions["pneumothorax"] = space
      visible &= ~space
      atten -= 0.12 * _blur(space.astype(np.float32), 0.8 * s / 256)
      atten += rng.uniform(0.12, 0.18) * _blur(line.astype(np.float32), 0.5 * s / 256)


def _add_effusion(rng: np.random.Generator, anatomy: _Anatomy, atten: np.ndarray,
                  aeration: np.ndarray, visible: np.ndarray,
                  lesions: dict[str, np.ndarray]) -> None:
  """Maybe an effusion (in place): meniscus-shaped fluid in the lateral costophrenic
  recess, more likely with cardiomegaly (as in heart failure)."""
  h, s, yy, xx = anatomy.habitus, anatomy.habitus.s, anatomy.yy, anatomy.xx
  p_eff = (_P_EFFUSION_CARDIO
           if cardiothoracic_ratio(anatomy.heart, anatomy.lung_any) > CTR_THRESHOLD
           else _P_EFFUSION_NORMAL)
  if rng.random() < p_eff:
    sides = (-1, 1) if rng.random() < 0.4 else (int(rng.choice((-1, 1))),)
    for side in sides:
      # Small effusions only blunt the costophrenic angle; larger ones also
      # cover the dome with a meniscus rising towards the chest wall.
      height = (0.05 + 0.25 * rng.beta(1.2, 2.0)) * s
      x_lat, x_med = h.cx + side * h.tw, h.cx + side * h.tw * 0.08
      u = np.clip((xx[0] - x_med) / (x_lat - x_med), 0.0, 1.0)
      floor = rng.uniform(0.3, 0.7)
      level = h.y_cp[side] - height * (floor + (1 - floor) * u ** rng.uniform(1.5, 3.0))
      lesions["effusion"] |= anatomy.lungs[side] & (yy > level[None, :])
    if lesions["effusion"].any():
      # Fluid replaces the air, so it takes back the aeration and adds density.
      fluid = _blur(lesions["effusion"].astype(np.float32), 2.0 * s / 256)
      atten += fluid * (aeration + 0.06)
      visible &= ~lesions["effusion"]


def _add_vessels(rng: np.random.Generator, anatomy: _Anatomy, atten: np.ndarray,
                 visible: np.ndarray) -> None:
  """Hila and lung markings (in place), seen where the lung is aerated."""
  h, s = anatomy.habitus, anatomy.habitus.s
  vessels = np.zeros(anatomy.shape, np.float32)
  for side in (-1, 1):
    hilum = (h.cx + side * (h.mw + 0.05 * s), h.y_hilum + rng.uniform(-0.02, 0.03) * s)
    cv2.ellipse(vessels, (int(hilum[0] * _ONE), int(hilum[1] * _ONE)),
                (int(0.03 * s * _ONE), int(0.05 * s * _ONE)), 0, 0, 360, 1.2, -1,
                cv2.LINE_AA, _SHIFT)
    _draw_vessels(rng, vessels, hilum, side, s)
  atten += rng.uniform(0.07, 0.1) * _blur(vessels, 1.0 * s / 256) * _blur(
      visible.astype(np.float32), 1.5 * s / 256)


def _add_nodules(rng: np.random.Generator, anatomy: _Anatomy, atten: np.ndarray,
                 visible: np.ndarray, lesions: dict[str, np.ndarray]) -> None:
  """Maybe nodules (in place): round soft-edged opacities fully inside aerated lung."""
  s, shape, yy, xx = anatomy.habitus.s, anatomy.shape, anatomy.yy, anatomy.xx
  if rng.random() < _P_NODULE:
    count = 2 if rng.random() < 0.25 else 1
    layer = np.zeros(shape, np.float32)
    for _ in range(count):
      radius = rng.uniform(0.03, 0.05) * s
      room = cv2.distanceTransform(visible.astype(np.uint8), cv2.DIST_L2, 5)
      candidates = np.flatnonzero(room > radius + 2)
      if candidates.size == 0:
        continue
      y, x = divmod(int(rng.choice(candidates)), shape[1])
      disk = (xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2
      layer += rng.uniform(0.18, 0.3) * disk
      lesions["nodule"] |= disk
      visible &= ~disk
    if lesions["nodule"].any():
      atten += _blur(layer, max(0.8, 0.3 * radius))


def _add_bones(rng: np.random.Generator, anatomy: _Anatomy, atten: np.ndarray
               ) -> np.ndarray:
  """Ribs and clavicles (in place), largely hidden by the dense mediastinum; returns the
  clavicles' mask."""
  h, s, shape = anatomy.habitus, anatomy.habitus.s, anatomy.shape
  posterior = np.zeros(shape, np.float32)
  anterior = np.zeros(shape, np.float32)
  _draw_ribs(rng, posterior, anterior, h.cx, h.tw, h.y_apex, h.y_cp_base, h.t_widest, s)
  clav = np.zeros(shape, np.uint8)
  u = np.linspace(0.0, 1.0, 12)[:, None]
  thick = max(2, int(round(rng.uniform(0.022, 0.03) * s)))
  for side in (-1, 1):
    start = np.array([h.cx + side * 0.045 * s, h.y_apex + 0.06 * s])
    end = np.array([h.cx + side * (h.tw + 0.02 * s), h.y_apex - rng.uniform(0.0, 0.03) * s])
    pts = start + u * (end - start)
    pts[:, 1] += 0.012 * s * np.sin(2 * np.pi * u[:, 0])
    cv2.polylines(clav, [_fixed(pts)], False, 1, thick, cv2.LINE_8, _SHIFT)
  bones = 0.075 * posterior + 0.035 * anterior + 0.12 * clav
  atten += _blur(bones, 0.9 * s / 256) * anatomy.body * (1.0 - 0.6 * anatomy.central)
  return clav.astype(bool)


def _position(rng: np.random.Generator, h: _Habitus, atten: np.ndarray,
              masks: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The patient's pose on the detector: one affine for image and masks, so labels
  stay consistent."""
  s = h.s
  shape = atten.shape
  pose = cv2.getRotationMatrix2D((h.cx, 0.5 * s), rng.uniform(-4.0, 4.0),
                                 rng.uniform(0.92, 1.05))
  pose[:, 2] += rng.uniform(-0.04, 0.04, 2) * s
  atten = cv2.warpAffine(atten, pose, shape[::-1], flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
  names = list(masks)
  packed = np.zeros(shape, np.uint8)
  for bit, name in enumerate(names):
    packed |= masks[name].astype(np.uint8) << bit
  packed = cv2.warpAffine(packed, pose, shape[::-1], flags=cv2.INTER_NEAREST)
  return atten, {name: ((packed >> bit) & 1).astype(bool) for bit, name in enumerate(names)}


def _labels(masks: dict[str, np.ndarray]) -> np.ndarray:
  """The FINDINGS, read off the masks."""
  ctr = cardiothoracic_ratio(masks["heart"], masks["left_lung"] | masks["right_lung"])
  return np.array([ctr > CTR_THRESHOLD, masks["nodule"].any(), masks["effusion"].any(),
                   masks["pneumothorax"].any()], np.float32)


def _expose(rng: np.random.Generator, atten: np.ndarray) -> np.ndarray:
  """The uint8 image: exposure, detector response and quantum noise."""
  img = np.clip(atten * rng.uniform(1.05, 1.35) + rng.uniform(-0.04, 0.04), 0.0, 1.0)
  img = img ** rng.uniform(0.8, 1.25)
  sigma = rng.uniform(0.008, 0.025)
  # Quantum noise grows where fewer photons arrive (bright, dense regions); the
  # slight blur gives it the grain of a real detector, the 1.6 restores its std.
  noise = rng.standard_normal(atten.shape, dtype=np.float32)
  img = img + sigma * (0.4 + np.sqrt(img)) * _blur(noise, 0.5) * 1.6
  return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def render(rng: np.random.Generator, image_size: int = 256
           ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """Draw one phantom PA chest radiograph.

  Returns the uint8 image, the float32 0/1 label vector in FINDINGS order and a
  dict of boolean masks with one entry per MASK_CLASSES and LESION_CLASSES name.
  Everything is drawn from ``rng`` alone, so a per-sample generator makes the
  sample reproducible independently of how work is split across processes. The
  steps draw from it in this order: changing the order changes every image.
  """
  anatomy = _draw_anatomy(rng, image_size)
  atten, aeration = _soft_tissue(rng, anatomy)
  # Lesions and markings show where the lung is still aerated and nothing else sits.
  visible = anatomy.lung_any.copy()
  lesions = {name: np.zeros(anatomy.shape, bool) for name in LESION_CLASSES}
  _add_pneumothorax(rng, anatomy, atten, visible, lesions)
  _add_effusion(rng, anatomy, atten, aeration, visible, lesions)
  _add_vessels(rng, anatomy, atten, visible)
  _add_nodules(rng, anatomy, atten, visible, lesions)
  # Bones are drawn last: they stay visible through fluid and soft tissue.
  clavicles = _add_bones(rng, anatomy, atten)
  masks = {"left_lung": anatomy.lungs[1], "right_lung": anatomy.lungs[-1],
           "heart": anatomy.heart, "clavicles": clavicles, **lesions}
  atten, masks = _position(rng, anatomy.habitus, atten, masks)
  # Labels are read off the final geometry, after positioning.
  return _expose(rng, atten), _labels(masks), masks


def _sample_name(index: int, total: int) -> str:
  return f"phantom_{index:0{max(5, len(str(max(total - 1, 0))))}d}.png"


def _write_sample(out_dir: str, seed: int, index: int, total: int, image_size: int) -> np.ndarray:
  image, labels, masks = render(np.random.default_rng([seed, index]), image_size)
  root = pathlib.Path(out_dir)
  name = _sample_name(index, total)
  if not cv2.imwrite(str(root / "images" / name), image):
    raise OSError(f"could not write {root / 'images' / name}")
  for cls in MASK_CLASSES:
    path = root / "masks" / cls / name
    if not cv2.imwrite(str(path), masks[cls].astype(np.uint8) * 255):
      raise OSError(f"could not write {path}")
  return labels


def generated_params(out_dir: str | os.PathLike) -> dict[str, int] | None:
  """The parameters (and format version) a finished phantom folder was generated
  with; None where ``out_dir`` holds no finished phantom data set."""
  meta_path = pathlib.Path(out_dir) / _META_NAME
  if not meta_path.exists():
    return None
  meta = json.loads(meta_path.read_text())
  return {key: meta.get(key) for key in _PARAMS}


def generate(out_dir: str | os.PathLike, *, seed: int = 0, num_train: int = 3000,
             num_val: int = 500, num_test: int = 1000, image_size: int = 256,
             workers: int = 1) -> pathlib.Path:
  """Write the phantom data set to ``out_dir`` (once) and return the folder.

  The meta file is written last and marks a finished data set: a call with the
  same parameters returns at once, a call with other parameters raises instead of
  silently mixing two data sets, and an interrupted run (no meta) is redone from
  scratch. Sample ``i`` is drawn from ``default_rng([seed, i])``, so the output
  is byte-identical whatever ``workers`` is.
  """
  out = pathlib.Path(out_dir)
  params = {"version": FORMAT_VERSION, "seed": int(seed), "image_size": int(image_size),
            "num_train": int(num_train), "num_val": int(num_val), "num_test": int(num_test)}
  meta_path = out / _META_NAME
  found = generated_params(out)
  if found is not None:
    if found == params:
      return out
    raise ValueError(
        f"{out} already holds a phantom data set generated with {found}, not {params}; "
        "delete that folder or choose another out_dir.")
  if min(num_train, num_val, num_test) < 0:
    raise ValueError("split sizes must be non-negative")
  if image_size < 32:
    raise ValueError("image_size must be at least 32 pixels")
  if workers < 1:
    raise ValueError("workers must be at least 1")

  (out / "images").mkdir(parents=True, exist_ok=True)
  for cls in MASK_CLASSES:
    (out / "masks" / cls).mkdir(parents=True, exist_ok=True)
  sizes = {"train": num_train, "val": num_val, "test": num_test}
  total = sum(sizes.values())
  jobs = [(str(out), int(seed), i, total, int(image_size)) for i in range(total)]
  if workers == 1 or total < 2:
    labels = [_write_sample(*job) for job in jobs]
  else:
    # spawn, not fork: the parent may already run JAX/TF threads, which fork breaks.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, total), initializer=staging.worker_init) as pool:
      chunk = max(1, min(64, total // (4 * workers)))
      labels = pool.starmap(_write_sample, jobs, chunksize=chunk)

  prevalence = {}
  start = 0
  for split in _SPLITS:
    rows = range(start, start + sizes[split])
    start += sizes[split]
    lines = [" ".join([_sample_name(i, total)] + [str(int(v)) for v in labels[i]])
             for i in rows]
    paths.write_atomic(out / f"phantom_{split}.txt", "".join(line + "\n" for line in lines))
    split_labels = np.array([labels[i] for i in rows], np.float64).reshape(-1, len(FINDINGS))
    means = split_labels.mean(axis=0) if len(rows) else np.zeros(len(FINDINGS))
    prevalence[split] = {f: round(float(m), 4) for f, m in zip(FINDINGS, means)}
  meta = {**params, "findings": list(FINDINGS), "mask_classes": list(MASK_CLASSES),
          "prevalence": prevalence}
  paths.write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
  return out
