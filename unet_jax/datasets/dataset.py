"""A labelled dataset in host memory, its errors, and how it is split.

A dataset is `images (N, *spatial, C) uint8` and `labels (N, *spatial) uint8` class ids, with
optional pixel weights `(N, *spatial) float32` (the paper's border weight map). A pixel that a
loss should skip holds IGNORE_CLASS. Every loader (`loaders.py`, through the SOURCES table of
`sources.py`) returns one, and raises `DataError` naming the file for data it cannot use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

IGNORE_CLASS = 255  # uint8 label of ignored pixels; class ids must stay below it
IGNORE_LABEL = -1  # marks the padding examples of the last evaluation batch


class DataError(ValueError):
  """A data file that cannot be used as it is: unreadable, empty, truncated, of the wrong dtype,
  rank or shape, or with values outside what its role allows. The message names the file (or
  the TFDS example). Raised by every loader and by predict's reader."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images `(N, *spatial, C) uint8`, labels `(N, *spatial) uint8` class ids and, optionally,
  pixel weights `(N, *spatial) float32` (the paper's border weight map, cached per image).

  `scaling` is the `images.IntensityScaling` that made the uint8 images from the raw files
  (None: the source produced uint8 itself); a run saves it for prediction.
  """

  images: np.ndarray
  labels: np.ndarray
  weights: np.ndarray | None = None
  scaling: Any = None

  def __len__(self) -> int:
    return len(self.images)

  def subset(self, indices: Sequence[int]) -> 'Dataset':
    indices = np.asarray(indices, dtype=np.int64)
    weights = None if self.weights is None else self.weights[indices]
    return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices],
                               weights=weights)


def split(dataset: Dataset, val_indices: Sequence[int]) -> tuple[Dataset, Dataset]:
  """Train = every example not in `val_indices` (e.g. ISBI slices 25–29 held out)."""
  val = sorted(set(int(i) for i in val_indices))
  if not val or val[0] < 0 or val[-1] >= len(dataset):
    raise ValueError(f'config.data.val_indices={tuple(val_indices)} must be non-empty indices in '
                     f'[0, {len(dataset)})')
  train = [i for i in range(len(dataset)) if i not in set(val)]
  if not train:
    raise ValueError('config.data.val_indices holds out every example; nothing is left to train')
  return dataset.subset(train), dataset.subset(val)


def as_volume(slices: Dataset) -> Dataset:
  """A stack of N 2D examples as one (1, N, H, W, C) volume."""
  weights = None if slices.weights is None else slices.weights[None]
  return dataclasses.replace(slices, images=slices.images[None], labels=slices.labels[None],
                             weights=weights)


def split_volume_z(dataset: Dataset, val_slices: Sequence[int], *, gap: int = 0
                   ) -> tuple[Dataset, Dataset]:
  """Splits every volume along z into a train and a validation sub-volume.

  A single volume cannot be split by example, so validation takes a contiguous range of
  sections at one end (e.g. ISBI slices 25–29, as the 2D setup holds out) and training the
  contiguous rest; both stay proper 3D volumes without jumps in z. Neighbouring sections are
  correlated, so `gap` sections next to the validation range are dropped from training.
  Returns images (N, D_train, H, W, C) and (N, D_val, H, W, C), labels alike.
  """
  if dataset.images.ndim != 5:
    raise ValueError(f'split_volume_z needs volumes (N, D, H, W, C); got images of shape '
                     f'{dataset.images.shape}')
  depth = dataset.images.shape[1]
  val = sorted(set(int(z) for z in val_slices))
  if (not val or val[0] < 0 or val[-1] >= depth or val != list(range(val[0], val[-1] + 1))
      or (val[0] != 0 and val[-1] != depth - 1)):
    raise ValueError(f'config.data.val_indices={tuple(val_slices)} must be a contiguous range of '
                     f'z slices at the start or the end of [0, {depth}), so that training keeps '
                     'one contiguous sub-volume')
  if gap < 0:
    raise ValueError(f'gap={gap} must be ≥ 0')
  train = range(val[-1] + 1 + gap, depth) if val[0] == 0 else range(0, val[0] - gap)
  if len(train) == 0:
    raise ValueError(f'config.data.val_indices={tuple(val_slices)} with gap={gap} leaves no '
                     f'z slices of {depth} for training')

  def take(z: Sequence[int]) -> Dataset:
    window = slice(z[0], z[-1] + 1)
    weights = None if dataset.weights is None else dataset.weights[:, window]
    return dataclasses.replace(dataset, images=dataset.images[:, window],
                               labels=dataset.labels[:, window], weights=weights)

  return take(list(train)), take(val)
