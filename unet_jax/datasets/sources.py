"""The data sources, one table: `config.data.source` names an entry of SOURCES.

| name          | rank | what                                                                 |
| ------------- | ---- | -------------------------------------------------------------------- |
| 'procedural'  | 2    | EM-like images the project generates itself (the default)            |
| 'isbi'        | 2    | the ISBI 2012 stacks (train-volume.tif, train-labels.tif)            |
| 'isbi_volume' | 3    | the same stack as ONE volume; val_indices are z slices               |
| 'folder'      | 2    | image and mask files matched by name (data.images_dir, masks_dir)    |
| 'tfds'        | 2    | a TFDS dataset stored as ArrayRecord, read without TensorFlow        |
| 'volumes'     | 3    | multi-page TIFF volumes (data.image_paths, data.label_paths)         |

A `Source` knows its spatial rank, how to load the whole labelled dataset from `config.data`,
how to split it into train and validation, and which paths must exist (`path_problems`, read by
config validation before anything runs). Adding a source is one entry here plus its loader.

The ISBI polarity on disk (255 = cell interior, 0 = membrane) maps to class ids 0 = interior,
1 = membrane, so the minority structure of interest is the positive class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from unet_jax import storage
from unet_jax.datasets import loaders
from unet_jax.datasets import weight_maps
from unet_jax.datasets.dataset import Dataset, as_volume, split, split_volume_z

# (config field under config.data, its value, what is wrong, what was expected)
PathProblem = tuple[str, Any, str, str]


def _no_paths(data: Any) -> list[PathProblem]:
  del data
  return []


def _split_by_index(dataset: Dataset, data: Any) -> tuple[Dataset, Dataset]:
  return split(dataset, data.val_indices)


def _split_by_z(dataset: Dataset, data: Any) -> tuple[Dataset, Dataset]:
  return split_volume_z(dataset, data.val_indices, gap=data.val_gap)


def _any_shape(data: Any) -> None:
  del data


# (spatial shape of every example, channels)
ExampleShape = tuple[tuple[int, ...], int]


@dataclasses.dataclass(frozen=True)
class Source:
  """One data source: its spatial rank, loader, train/val split and required paths, and the
  shape of its examples where the source fixes it (None: it depends on the files)."""

  spatial_rank: int
  load: Callable[[Any], Dataset]
  path_problems: Callable[[Any], list[PathProblem]] = _no_paths
  split: Callable[[Dataset, Any], tuple[Dataset, Dataset]] = _split_by_index
  example_shape: Callable[[Any], ExampleShape | None] = _any_shape


def _isbi_paths(data: Any) -> list[PathProblem]:
  files = list(loaders.ISBI_FILES.values())
  expected = f'a directory with {" and ".join(files)} (see data/README.md)'
  if not data.directory:
    return [('directory', data.directory, 'is not set', expected)]
  missing = [f for f in files if not storage.is_file(storage.join(data.directory, f))]
  if not storage.is_dir(data.directory) or missing:
    return [('directory', data.directory,
             f'is not a directory holding {" and ".join(missing or ["the stacks"])}', expected)]
  return []


def _folder_paths(data: Any) -> list[PathProblem]:
  return [(field, data[field], 'is not a directory',
           f'the folder of {field.split("s_")[0]} files (PNG or TIFF) for '
           "config.data.source='folder'")
          for field in ('images_dir', 'masks_dir')
          if not storage.is_dir(data[field])]


def _volume_paths(data: Any) -> list[PathProblem]:
  if not data.image_paths or len(data.image_paths) != len(data.label_paths):
    return [('label_paths', data.label_paths,
             f'does not pair with config.data.image_paths ({len(data.image_paths)})',
             'one label TIFF per image TIFF, at least one')]
  return [(field, data[field], f'names {path}, which does not exist',
           'existing multi-page TIFF files')
          for field in ('image_paths', 'label_paths') for path in data[field]
          if not storage.is_file(path)]


def _tfds_paths(data: Any) -> list[PathProblem]:
  if storage.is_dir(data.tfds.data_dir):
    return []
  return [('tfds.data_dir', data.tfds.data_dir, 'is not a directory',
           'the TFDS data_dir holding the ArrayRecord dataset')]


SOURCES: dict[str, Source] = {
    'procedural': Source(2, lambda data: loaders.load_procedural(data.procedural),
                         example_shape=lambda data: ((data.procedural.size,) * 2, 1)),
    'isbi': Source(2, lambda data: loaders.load_isbi(data.directory), _isbi_paths,
                   example_shape=lambda data: (loaders.ISBI_SHAPE[1:], 1)),
    'isbi_volume': Source(3, lambda data: as_volume(loaders.load_isbi(data.directory)),
                          _isbi_paths, _split_by_z,
                          example_shape=lambda data: (loaders.ISBI_SHAPE, 1)),
    'folder': Source(2, lambda data: loaders.load_folder(
        data.images_dir, data.masks_dir, num_classes=len(data.class_names),
        mask_mode=data.mask_mode, ignore_label=data.ignore_label), _folder_paths),
    'tfds': Source(2, lambda data: loaders.load_tfds(
        data.tfds.name, data_dir=data.tfds.data_dir, split=data.tfds.split,
        image_key=data.tfds.image_key, label_key=data.tfds.label_key,
        num_classes=len(data.class_names), ignore_label=data.ignore_label), _tfds_paths),
    'volumes': Source(3, lambda data: loaders.load_volumes(
        data.image_paths, data.label_paths, label_mode=data.label_mode,
        num_classes=len(data.class_names), ignore_label=data.ignore_label), _volume_paths),
}


def source(data_config: Any) -> Source:
  name = data_config.source
  if name not in SOURCES:
    raise ValueError(f'config.data.source={name!r} is not one of {sorted(SOURCES)}')
  return SOURCES[name]


def example_shape(data_config: Any) -> ExampleShape | None:
  """(spatial shape, channels) of every example of the source, when the source fixes them."""
  return source(data_config).example_shape(data_config)


def spatial_rank(data_config: Any) -> int:
  """2 for images, 3 for volumes: what config.data.source yields."""
  return source(data_config).spatial_rank


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


def load_dataset(data_config: Any) -> Dataset:
  """The whole labelled dataset of `config.data`, with weight maps when configured."""
  return with_weight_maps(source(data_config).load(data_config), data_config.weight_map)


def split_dataset(dataset: Dataset, data_config: Any) -> tuple[Dataset, Dataset]:
  """(train, val): by example index, or by z slice for a single volume ('isbi_volume')."""
  return source(data_config).split(dataset, data_config)
