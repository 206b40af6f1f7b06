"""PNG overlays of predictions.

Palette (one colour per class id, used everywhere): class 0 is left transparent so the image
shows through; class 1 red, 2 green, 3 blue, 4 yellow, 5 magenta, 6 cyan, then repeats.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

PALETTE = np.array([[0, 0, 0], [230, 25, 45], [60, 180, 75], [0, 130, 200], [255, 225, 25],
                    [240, 50, 230], [70, 240, 240]], np.uint8)
ALPHA = 0.45


def to_gray_uint8(image: np.ndarray) -> np.ndarray:
  """Any 2D float/int image (H, W) or (H, W, 1) → uint8 stretched to its own min..max."""
  image = np.asarray(image, np.float64).squeeze()
  lo, hi = float(image.min()), float(image.max())
  return np.zeros(image.shape, np.uint8) if hi <= lo else \
      np.round(255 * (image - lo) / (hi - lo)).astype(np.uint8)


def overlay(image: np.ndarray, classes: np.ndarray) -> np.ndarray:
  """RGB uint8 (H, W, 3): the gray image with every non-zero class tinted by its colour."""
  gray = to_gray_uint8(image)
  rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
  colours = PALETTE[np.asarray(classes) % len(PALETTE)].astype(np.float32)
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
  os.makedirs(directory, exist_ok=True)
  paths = []
  for i, (image, truth, pred) in enumerate(zip(images, truths, predictions)):
    path = os.path.join(directory, f'{prefix}_{i:03d}.png')
    Image.fromarray(comparison_panel(image, truth, pred)).save(path)
    paths.append(path)
  return paths
