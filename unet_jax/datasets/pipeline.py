"""grain pipelines over an in-memory Dataset: endless training batches and evaluation batches.

Training batches are slices of one global stream: global batch b is the same examples with the
same augmentation whatever the number of processes, and process p reads and augments only its
slice of it. Runs are therefore identical on 1 or N hosts, and the iterator state (the step) can
resume on another topology. `sharding.to_global` assembles the slices into sharded arrays.
Evaluation batches hold whole images, mirror-padded for the model (models/whole_image.py).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from unet_jax.augment import transforms as T
from unet_jax.datasets.dataset import IGNORE_LABEL, Dataset
from unet_jax.models import whole_image

AUGMENT_ON = ('host', 'device')  # where config.data.augment runs


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
  crop_size = whole_image.crop_shape(data_config.crop_size, dataset.labels.ndim - 1)
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
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers),
                                  worker_init_fn=_exit_with_parent)
  return iter(iter_ds)


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """Runs in every grain worker: the worker ends when the process that started it is gone.

  A launcher killed with SIGKILL cannot stop its workers; without this they would live on,
  each holding its share of the dataset in memory.
  """
  del worker_index, worker_count
  parent = os.getppid()

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(0)  # pylint: disable=protected-access  (no clean-up: the run it served is gone)

  threading.Thread(target=watch, name='exit-with-parent', daemon=True).start()


def _parse_absl_flags() -> None:
  # grain's worker processes read absl flags; outside absl.app.run nothing has parsed them.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(['unet_jax'], known_only=True)


BatchSpec = dict[str, tuple[tuple[int, ...], np.dtype]]


def train_batch_spec(data_config: Any, *, batch_size: int, spatial_rank: int, channels: int
                     ) -> BatchSpec:
  """Shape and dtype of every array of the batches `train_iterator` yields, without data: what
  an ahead-of-time compile of the train step is given."""
  crop = whole_image.crop_shape(data_config.crop_size, spatial_rank)
  spec = {'image': ((batch_size, *crop, channels), np.dtype(np.float32)),
          'label': ((batch_size, *crop), np.dtype(np.int32))}
  if data_config.weight_map.enabled:
    spec['weight'] = ((batch_size, *crop), np.dtype(np.float32))
  return spec


def eval_batch_spec(spatial_shape: Sequence[int], *, batch_size: int,
                    pads: Sequence[tuple[int, int]], channels: int) -> BatchSpec:
  """Shape and dtype of the batches `eval_batches` yields for images of `spatial_shape`."""
  padded = tuple(n + a + b for n, (a, b) in zip(spatial_shape, pads))
  return {'image': ((batch_size, *padded, channels), np.dtype(np.float32)),
          'label': ((batch_size, *spatial_shape), np.dtype(np.int32))}


def eval_batches(dataset: Dataset, *, batch_size: int, pads: Sequence[tuple[int, int]], mean: float,
                 std: float, process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """This process's evaluation batches of whole images, mirror-padded for the model.

  Every process yields the same number of batches (collectives need that); padding examples at
  the end carry IGNORE_LABEL so they count nowhere. Labels stay unpadded: the model's output,
  sliced to the label's shape, lines up with the original image (see whole_image.model_padding).
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
    images = whole_image.mirror_pad(images, [(0, 0), *pads, (0, 0)])
    yield normalize.map({'image': images, 'label': labels})
