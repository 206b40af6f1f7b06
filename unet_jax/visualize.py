"""PNG overlays of predictions, and the one class palette every figure of the project uses.

Palette (`PALETTE[k % len(PALETTE)]` is the colour of class id k, RGB uint8):

| class id | colour  | RGB            | in overlays                           |
| -------- | ------- | -------------- | ------------------------------------- |
| 0        | black   | (0, 0, 0)      | not tinted: the image shows through   |
| 1        | red     | (230, 25, 45)  | tinted with ALPHA = 0.45              |
| 2        | green   | (60, 180, 75)  | tinted                                |
| 3        | blue    | (0, 130, 200)  | tinted                                |
| 4        | yellow  | (255, 225, 25) | tinted                                |
| 5        | magenta | (240, 50, 230) | tinted                                |
| 6        | cyan    | (70, 240, 240) | tinted                                |

Ids from 7 on repeat the cycle. Class 0 is the background of every data set here (ISBI and the
procedural set: cell interior; membrane is class 1, so membranes are red), which is why it is
left untinted in overlays; in label maps (`label_map`, the ground-truth and prediction columns
of the launcher's predictions.png) it is drawn black. Per-class curves (dice_<class>, …) in
unet_jax/plots.py use the same colours, so class k looks the same in every figure.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from unet_jax import storage

PALETTE = np.array([[0, 0, 0], [230, 25, 45], [60, 180, 75], [0, 130, 200], [255, 225, 25],
                    [240, 50, 230], [70, 240, 240]], np.uint8)
PALETTE_NAMES = ('black', 'red', 'green', 'blue', 'yellow', 'magenta', 'cyan')
ALPHA = 0.45


def class_colour(class_id: int) -> np.ndarray:
  """RGB uint8 (3,) of class `class_id` (the palette repeats after len(PALETTE) classes)."""
  return PALETTE[int(class_id) % len(PALETTE)]


def to_gray_uint8(image: np.ndarray) -> np.ndarray:
  """A 2D image (H, W), (H, W, 1) or RGB(A) (H, W, 3|4) → uint8 (H, W) stretched to its own
  min..max; colour images are first averaged over their colour channels (alpha ignored)."""
  image = np.asarray(image, np.float64)
  if image.ndim == 3 and image.shape[-1] in (3, 4):
    image = image[..., :3].mean(-1)
  image = image.squeeze()
  lo, hi = float(image.min()), float(image.max())
  return np.zeros(image.shape, np.uint8) if hi <= lo else \
      np.round(255 * (image - lo) / (hi - lo)).astype(np.uint8)


def label_map(classes: np.ndarray) -> np.ndarray:
  """RGB uint8 (H, W, 3) of a class-id map (H, W): every pixel in its class's palette colour."""
  return PALETTE[np.asarray(classes).astype(np.int64) % len(PALETTE)]


def overlay(image: np.ndarray, classes: np.ndarray) -> np.ndarray:
  """RGB uint8 (H, W, 3): the gray image with every non-zero class tinted by its colour."""
  gray = to_gray_uint8(image)
  rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
  colours = label_map(classes).astype(np.float32)
  tint = (np.asarray(classes) > 0)[..., None]
  return np.where(tint, (1 - ALPHA) * rgb + ALPHA * colours, rgb).round().astype(np.uint8)


def comparison_panel(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
  """image | ground-truth overlay | prediction overlay, side by side with a 4 px gap."""
  gray = to_gray_uint8(image)
  panels = [np.repeat(gray[..., None], 3, -1), overlay(image, truth), overlay(image, prediction)]
  gap = np.full((gray.shape[0], 4, 3), 255, np.uint8)
  return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)


def write_panels(directory: str, images: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                 predictions: Sequence[np.ndarray], *, prefix: str = 'val') -> list[str]:
  """One `comparison_panel` PNG per example, `<directory>/<prefix>_000.png`, …; returns paths."""
  paths = []
  for i, (image, truth, pred) in enumerate(zip(images, truths, predictions)):
    path = storage.join(directory, f'{prefix}_{i:03d}.png')
    storage.write_atomic(path, png_bytes(comparison_panel(image, truth, pred)))
    paths.append(path)
  return paths


def png_bytes(array: np.ndarray) -> bytes:
  """`array` (H, W) or (H, W, 3) uint8 encoded as a PNG file."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()
