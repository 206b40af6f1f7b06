"""Datasets and grain pipelines for training and evaluation.

A dataset is held in host memory as `images (N, *spatial, C) uint8` and `labels (N, *spatial)
uint8` class ids. Sources (config.data.source):
  'procedural'   EM-like images the project generates itself (the default; needs no download).
  'isbi'         the ISBI 2012 EM stacks (train-volume.tif, train-labels.tif) in `data.directory`.
  'isbi_volume'  the same stack as ONE 3D volume; val_indices are z slices (split_volume_z).
  'folder'       image and mask files matched by name (data.images_dir, data.masks_dir).
  'tfds'         a TFDS dataset stored as ArrayRecord, read with tfds.data_source (no TensorFlow).
  'volumes'      multi-page TIFF volumes (data.image_paths, data.label_paths).
The ISBI polarity on disk (255 = cell interior, 0 = membrane) maps to class ids 0 = interior,
1 = membrane, so the minority structure of interest is the positive class. Other sources carry
class ids (see unet_jax/sources.py); an ignored pixel is stored as sources.IGNORE_CLASS.

Training batches are slices of one global stream: global batch b is the same examples with the
same augmentation whatever the number of processes, and process p reads and augments only its
slice of it. Runs are therefore identical on 1 or N hosts, and the iterator state (the step) can
resume on another topology. `sharding.to_global` assembles the slices into sharded arrays.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from unet_jax import procedural
from unet_jax import transforms as T
from unet_jax import weight_maps

ISBI_FILES = {'images': 'train-volume.tif', 'labels': 'train-labels.tif'}
SOURCES = ('procedural', 'isbi', 'isbi_volume', 'folder', 'tfds', 'volumes')
IGNORE_LABEL = -1  # marks the padding examples of the last evaluation batch


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images `(N, *spatial, C) uint8`, labels `(N, *spatial) uint8` class ids and, optionally,
  pixel weights `(N, *spatial) float32` (the paper's border weight map, cached per image)."""

  images: np.ndarray
  labels: np.ndarray
  weights: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.images)

  def subset(self, indices: Sequence[int]) -> 'Dataset':
    indices = np.asarray(indices, dtype=np.int64)
    weights = None if self.weights is None else self.weights[indices]
    return Dataset(self.images[indices], self.labels[indices], weights)


def with_weight_maps(dataset: Dataset, config: Any) -> Dataset:
  """Adds the paper's weight map (config.data.weight_map) computed once per image.

  Objects are the connected components of `object_class` (for ISBI the cell interior, class 0),
  so the large weights fall on the thin membranes that separate touching cells.
  """
  if not config.enabled:
    return dataset
  weights = np.stack([
      weight_maps.border_weight_map(
          weight_maps.instances_from_binary(label == config.object_class), w0=config.w0,
          sigma=config.sigma, class_weights=config.class_weights,
          background=0) for label in dataset.labels])
  return dataclasses.replace(dataset, weights=weights.astype(np.float32))


def _read_tiff_stack(path: str, what: str) -> np.ndarray:
  import tifffile  # pylint: disable=g-import-not-at-top
  from unet_jax.sources import DataError  # pylint: disable=g-import-not-at-top  (it imports us)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} file {path} does not exist; see data/README.md for how to '
                            'obtain the ISBI 2012 stacks')
  try:
    array = tifffile.imread(path)
  except Exception as e:  # tifffile raises many types on corrupt input
    raise DataError(f'{what} file {path} is not a readable TIFF stack: {e}') from e
  if array.size == 0:
    raise DataError(f'{what} file {path} is empty or not a readable TIFF stack')
  if array.ndim == 2:
    array = array[None]
  if array.ndim != 3:
    raise DataError(f'{what} file {path} has shape {array.shape}; expected (slices, H, W)')
  if array.dtype != np.uint8:
    raise DataError(f'{what} file {path} has dtype {array.dtype}; expected uint8')
  return array


def isbi_labels_to_classes(labels: np.ndarray, *, path: str) -> np.ndarray:
  """ISBI polarity (255 interior, 0 membrane) → class ids (0 interior, 1 membrane)."""
  from unet_jax.sources import DataError  # pylint: disable=g-import-not-at-top  (it imports us)
  bad = np.setdiff1d(np.unique(labels), [0, 255])
  if bad.size:
    raise DataError(f'label file {path} has values {bad[:10].tolist()} outside {{0, 255}} '
                    '(ISBI polarity: 255 = cell interior, 0 = membrane)')
  return (labels == 0).astype(np.uint8)


def load_isbi(directory: str) -> Dataset:
  """Reads the ISBI 2012 training stacks from `directory` with checks that name the file."""
  if not directory or not os.path.isdir(directory):
    raise FileNotFoundError(f'config.data.directory={directory!r} is not a directory; it must hold '
                            f'{ISBI_FILES["images"]} and {ISBI_FILES["labels"]}')
  image_path = os.path.join(directory, ISBI_FILES['images'])
  label_path = os.path.join(directory, ISBI_FILES['labels'])
  images = _read_tiff_stack(image_path, 'image')
  labels = _read_tiff_stack(label_path, 'label')
  if images.shape != labels.shape:
    from unet_jax.sources import DataError  # pylint: disable=g-import-not-at-top  (it imports us)
    raise DataError(f'image file {image_path} has shape {images.shape} but label file '
                    f'{label_path} has shape {labels.shape}; they must match')
  return Dataset(images[..., None], isbi_labels_to_classes(labels, path=label_path))


def load_procedural(config: Any) -> Dataset:
  images, labels = procedural.make_em_like(**dict(config))
  return Dataset(images[..., None], isbi_labels_to_classes(labels, path='<procedural>'))


def load_dataset(data_config: Any) -> Dataset:
  """The whole labelled dataset of `config.data`, with weight maps when configured."""
  from unet_jax import sources  # pylint: disable=g-import-not-at-top  (sources imports Dataset)
  source = data_config.source
  if source in ('isbi', 'isbi_volume'):
    dataset = load_isbi(data_config.directory)
    if source == 'isbi_volume':
      dataset = sources.as_volume(dataset)
  elif source == 'procedural':
    dataset = load_procedural(data_config.procedural)
  elif source == 'folder':
    dataset = sources.load_folder(
        data_config.images_dir, data_config.masks_dir, num_classes=len(data_config.class_names),
        mask_mode=data_config.mask_mode, ignore_label=data_config.ignore_label)
  elif source == 'tfds':
    dataset = sources.load_tfds(
        data_config.tfds.name, data_dir=data_config.tfds.data_dir, split=data_config.tfds.split,
        image_key=data_config.tfds.image_key, label_key=data_config.tfds.label_key,
        num_classes=len(data_config.class_names), ignore_label=data_config.ignore_label)
  elif source == 'volumes':
    dataset = sources.load_volumes(
        data_config.image_paths, data_config.label_paths, label_mode=data_config.label_mode,
        num_classes=len(data_config.class_names), ignore_label=data_config.ignore_label)
  else:
    raise ValueError(f'config.data.source={source!r} is not one of {SOURCES}')
  return with_weight_maps(dataset, data_config.weight_map)


def split_dataset(dataset: Dataset, data_config: Any) -> tuple[Dataset, Dataset]:
  """(train, val): by example index, or by z slice for a single volume ('isbi_volume')."""
  if data_config.source == 'isbi_volume':
    from unet_jax import sources  # pylint: disable=g-import-not-at-top
    return sources.split_volume_z(dataset, data_config.val_indices, gap=data_config.val_gap)
  return split(dataset, data_config.val_indices)


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


class _ExampleSource:
  """Random-access grain source over an in-memory Dataset."""

  def __init__(self, dataset: Dataset):
    self._dataset = dataset

  def __len__(self) -> int:
    return len(self._dataset)

  def __getitem__(self, index: int) -> T.Example:
    example = {'image': self._dataset.images[index], 'label': self._dataset.labels[index]}
    if self._dataset.weights is not None:
      example['weight'] = self._dataset.weights[index]
    return example


def train_iterator(dataset: Dataset, data_config: Any, *, batch_size: int,
                   border: int | Sequence[int],
                   seed: int, process_index: int = 0, process_count: int = 1
                   ) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of this process's slices of the global batches.

  Args:
    dataset: the training split.
    data_config: `config.data` (crop size, augmentation spec, normalisation, workers).
    batch_size: examples per batch on this process (the global batch / process_count).
    border: mirror padding per side, one int or one per spatial dim (what a VALID net trims).
    seed: shuffle and augmentation seed; the same seed gives the same batches.
    process_index, process_count: which slice of every global batch this process produces.
  """
  crop = data_config.crop_size
  crop_size = tuple(crop) if isinstance(crop, (tuple, list)) else (crop,) * (dataset.labels.ndim - 1)
  ds = grain.MapDataset.source(_ExampleSource(dataset))
  ds = ds.shuffle(seed=seed).repeat(None)  # reshuffled every epoch
  # With augment_on='device' the host only crops and normalises; the step does the rest.
  ops = T.build_train_transforms(
      data_config.augment if data_config.augment_on == 'host' else '', crop_size=crop_size,
      border=border, mean=data_config.mean,
      std=data_config.std, crop=data_config.crop, foreground_class=data_config.foreground_class,
      foreground_p=data_config.foreground_p, order=data_config.interpolation_order)
  for i, op in enumerate(ops):
    ds = ds.random_map(op, seed=seed + 1 + i) if isinstance(op, grain.transforms.RandomMap) \
        else ds.map(op)
  # Chunk k of `batch_size` consecutive examples is slice k % P of global batch k // P; random
  # access means only this process's chunks are ever read or augmented.
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.slice(slice(process_index, None, process_count))
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_config.num_threads,
                                                 prefetch_buffer_size=data_config.prefetch))
  if data_config.num_workers > 0:
    _parse_absl_flags()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers))
  return iter(iter_ds)


def _parse_absl_flags() -> None:
  # grain's worker processes read absl flags; outside absl.app.run nothing has parsed them.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(['unet_jax'], known_only=True)


def eval_batches(dataset: Dataset, *, batch_size: int, pads: Sequence[tuple[int, int]], mean: float,
                 std: float, process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """This process's evaluation batches of whole images, mirror-padded for the model.

  Every process yields the same number of batches (collectives need that); padding examples at
  the end carry IGNORE_LABEL so they count nowhere. Labels stay unpadded: the model's output,
  sliced to the label's shape, lines up with the original image (see inference.model_padding).
  """
  indices = np.arange(process_index, len(dataset), process_count)
  per_process = -(-len(dataset) // process_count)
  num_batches = -(-per_process // batch_size)
  normalize = T.Normalize(mean, std)
  for b in range(num_batches):
    chunk = indices[b * batch_size:(b + 1) * batch_size]
    images = dataset.images[chunk]
    labels = dataset.labels[chunk].astype(np.int32)
    missing = batch_size - len(chunk)
    if missing:
      shape = dataset.images.shape[1:]
      images = np.concatenate([images, np.zeros((missing, *shape), images.dtype)])
      labels = np.concatenate([labels, np.full((missing, *shape[:-1]), IGNORE_LABEL, np.int32)])
    images = T.mirror_pad(images, [(0, 0), *pads, (0, 0)])
    yield normalize.map({'image': images, 'label': labels})
