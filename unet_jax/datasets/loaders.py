"""Loaders of the data sources: ISBI stacks, image/mask folders, TFDS ArrayRecord datasets,
3D TIFF volumes and the procedural set.

Every loader returns an in-memory `dataset.Dataset`: images `(N, *spatial, C) uint8` and
labels `(N, *spatial) uint8` class ids, with `IGNORE_CLASS` (255) marking pixels that a loss
should skip. Loaders check the data and raise `DataError` (a ValueError) naming the offending
file; nothing is cropped, resized or reinterpreted silently. Intensities become uint8 by the
one dataset-wide rule of `images.IntensityScaling`, which the Dataset carries.

  load_isbi          the ISBI 2012 training stacks (30, 512, 512) with ISBI polarity labels.
  load_folder        2D images and masks in two folders, matched by file stem (PNG or TIFF).
  load_tfds          a TFDS dataset stored as ArrayRecord, read without TensorFlow.
  load_volumes       multi-page TIFF stacks, each a (D, H, W) volume: images (N, D, H, W, 1).
  isbi_as_volume     the ISBI 2012 training stack as one labelled volume (1, 30, 512, 512, 1).
  load_procedural    the generated EM-like set (procedural.make_em_like).
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Sequence

import numpy as np

from unet_jax import storage
from unet_jax.datasets import images as image_files
from unet_jax.datasets import procedural
from unet_jax.datasets.dataset import IGNORE_CLASS, DataError, Dataset, as_volume


ISBI_FILES = {'images': 'train-volume.tif', 'labels': 'train-labels.tif'}
ISBI_SHAPE = (30, 512, 512)  # the challenge's training stack: slices, height, width
MASK_MODES = ('classes', 'binary', 'instances')
LABEL_MODES = ('isbi', 'classes')
MASK_SUFFIXES = ('', '_mask', '_masks', '_label', '_labels')


def mask_to_labels(mask: np.ndarray, *, where: str, mode: str, num_classes: int,
                   ignore_label: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
  """One mask → (uint8 labels, int32 instance ids or None); `mode` is one of MASK_MODES.

  'binary': mask > 0 is class 1. 'classes': values are class ids in [0, num_classes).
  'instances': ids > 0 are objects; labels are the binary foreground and the ids are returned
  too. In every mode, pixels equal to `ignore_label` become IGNORE_CLASS (and instance id 0).
  `where` names the mask in errors, e.g. 'mask file masks/a.png'.
  """
  if mode not in MASK_MODES:
    raise ValueError(f'config.data.mask_mode={mode!r} is not one of {MASK_MODES}')
  if mode != 'classes' and num_classes != 2:
    raise ValueError(f"config.data.mask_mode={mode!r} gives 2 classes (background, foreground) "
                     f'but config.data.num_classes={num_classes}')
  if not 2 <= num_classes <= IGNORE_CLASS:
    raise ValueError(f'config.data.num_classes={num_classes} must be in [2, {IGNORE_CLASS}] '
                     f'(uint8 labels; {IGNORE_CLASS} marks ignored pixels)')
  image_files.check_mask_dtype(mask, where)
  ids = mask.astype(np.int64)
  ignored = np.zeros(ids.shape, bool) if ignore_label is None else ids == ignore_label
  instances = None
  if mode == 'classes':
    bad = np.setdiff1d(np.unique(ids[~ignored]), np.arange(num_classes))
    if bad.size:
      allowed = f'[0, {num_classes})' + ('' if ignore_label is None else f' or {ignore_label}')
      raise DataError(f'{where} has values {bad[:10].tolist()} outside the declared '
                      f'classes {allowed} (config.data.num_classes, config.data.ignore_label)')
    labels = ids
  else:
    if (ids[~ignored] < 0).any():
      raise DataError(f'{where} has negative values; {mode} masks hold 0 = background '
                      'and positive ids')
    labels = (ids > 0).astype(np.int64)
    if mode == 'instances':
      largest = int(ids[~ignored].max(initial=0))
      if largest > np.iinfo(np.int32).max:  # int32 would wrap it onto another object's id
        raise DataError(f'{where} has instance id {largest}; instance ids must fit int32 '
                        f'(≤ {np.iinfo(np.int32).max}); relabel the objects 1..N')
      instances = np.where(ignored, 0, ids).astype(np.int32)
  return np.where(ignored, IGNORE_CLASS, labels).astype(np.uint8), instances


def _scaled(raw: np.ndarray, labels: np.ndarray) -> Dataset:
  """A Dataset of `raw` images under the intensity rule fitted on all of them."""
  scaling = image_files.IntensityScaling.fit(raw)
  return Dataset(scaling.to_uint8(raw), labels, scaling=scaling)


def _as_hwc(array: np.ndarray, where: str) -> np.ndarray:
  if array.ndim == 2:
    return array[..., None]
  if array.ndim == 3 and array.shape[-1] <= 4:
    return array
  raise DataError(f'{where} has shape {array.shape}; expected a 2D image (H, W) or '
                  '(H, W, C) with C ≤ 4 (use sources.load_volumes for multi-page stacks)')


def _as_hw(array: np.ndarray, where: str) -> np.ndarray:
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim != 2:
    raise DataError(f'{where} has shape {array.shape}; expected a single-channel 2D '
                    'mask (H, W) of ids (colour-coded masks must be converted to ids first)')
  return array


def _natural_key(name: str) -> list[object]:
  # img_2 sorts before img_10, as a person numbering files expects.
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def _list_by_stem(directory: str, what: str, field: str) -> dict[str, str]:
  """Stem → path of the PNG/TIFF files in `directory`; other files are ignored."""
  if not storage.is_dir(directory):
    raise FileNotFoundError(f'config.data.{field}={directory!r} is not a directory')
  files: dict[str, str] = {}
  for name in storage.list_names(directory):
    stem, ext = os.path.splitext(name)
    if name.startswith('.') or ext.lower() not in image_files.IMAGE_EXTENSIONS:
      continue
    if stem in files:
      raise DataError(f'{what} files {files[stem]} and {storage.join(directory, name)} share the '
                      f'stem {stem!r}; keep one of them')
    files[stem] = storage.join(directory, name)
  if not files:
    raise ValueError(f'config.data.{field}={directory!r} holds no {what} files '
                     f'({", ".join(image_files.IMAGE_EXTENSIONS)})')
  return dict(sorted(files.items(), key=lambda item: _natural_key(item[0])))


def _same_directory(a: str, b: str) -> bool:
  if storage.is_remote(a) or storage.is_remote(b):
    return a.rstrip('/') == b.rstrip('/')
  return os.path.samefile(a, b)


def match_files(images_dir: str, masks_dir: str, *,
                mask_suffixes: Sequence[str] = MASK_SUFFIXES) -> list[tuple[str, str]]:
  """(image path, mask path) pairs: mask stem = image stem + one of `mask_suffixes`.

  Pairs come in natural order of the image stems. Raises, naming the file, on an image without
  a mask, an image with two candidate masks, and a mask that belongs to no image.
  """
  images = _list_by_stem(images_dir, 'image', 'images_dir')
  masks = _list_by_stem(masks_dir, 'mask', 'masks_dir')
  if _same_directory(images_dir, masks_dir):
    raise ValueError(f'config.data.images_dir and config.data.masks_dir are both {images_dir!r}; '
                     'keep images and masks in separate directories')
  pairs, used = [], set()
  for stem, image_path in images.items():
    found = [stem + suffix for suffix in mask_suffixes if stem + suffix in masks]
    if not found:
      tried = ', '.join(f'{stem}{s}.*' for s in mask_suffixes)
      raise DataError(f'image file {image_path} has no mask in {masks_dir} (looked for {tried})')
    if len(found) > 1:
      raise DataError(f'image file {image_path} matches several masks: '
                      f'{[masks[m] for m in found]}')
    used.add(found[0])
    pairs.append((image_path, masks[found[0]]))
  unused = [path for stem, path in masks.items() if stem not in used]
  if unused:
    raise DataError(f'mask file {unused[0]} matches no image in {images_dir} '
                    f'({len(unused)} unmatched masks)')
  return pairs


def load_folder_with_instances(images_dir: str, masks_dir: str, *, num_classes: int,
                               mask_mode: str = 'classes', ignore_label: int | None = None,
                               mask_suffixes: Sequence[str] = MASK_SUFFIXES
                               ) -> tuple[Dataset, np.ndarray | None]:
  """2D images and masks from two folders; see `load_folder`.

  Returns the Dataset and, for mask_mode='instances', the instance ids `(N, H, W) int32`
  (0 = background), from which `weight_maps.border_weight_map` computes the paper's weights for
  touching objects that merge in the binary labels; None for the other modes.
  """
  if mask_mode not in MASK_MODES:
    raise ValueError(f'config.data.mask_mode={mask_mode!r} is not one of {MASK_MODES}')
  images, labels, instances = [], [], []
  first = None
  for image_path, mask_path in match_files(images_dir, masks_dir, mask_suffixes=mask_suffixes):
    image = image_files.read_image(image_path, 'image')
    image_files.check_image_dtype(image, f'image file {image_path}')
    image = image_files.without_alpha(_as_hwc(image, f'image file {image_path}'), image_path)
    mask = _as_hw(image_files.read_image(mask_path, 'mask'), f'mask file {mask_path}')
    if first is None:
      first = (image_path, image.shape)
    elif image.shape != first[1]:
      raise DataError(f'image file {image_path} has shape {image.shape} but {first[0]} has '
                      f'{first[1]}; all images must share one shape (H, W, C) and are not '
                      'cropped or resized silently')
    if mask.shape != image.shape[:2]:
      raise DataError(f'mask file {mask_path} has shape {mask.shape} but image file '
                      f'{image_path} has {image.shape[:2]}; they must match')
    label, instance = mask_to_labels(mask, where=f'mask file {mask_path}', mode=mask_mode,
                                     num_classes=num_classes, ignore_label=ignore_label)
    images.append(image)
    labels.append(label)
    instances.append(instance)
  dataset = _scaled(np.stack(images), np.stack(labels))
  return dataset, (np.stack(instances) if mask_mode == 'instances' else None)


def load_folder(images_dir: str, masks_dir: str, *, num_classes: int, mask_mode: str = 'classes',
                ignore_label: int | None = None,
                mask_suffixes: Sequence[str] = MASK_SUFFIXES) -> Dataset:
  """A folder of 2D images and a folder of masks → Dataset `(N, H, W, C)`, `(N, H, W)`.

  Files are PNG or TIFF (.png, .tif, .tiff; other files are ignored), 8- or 16-bit, grayscale
  (C = 1) or RGB (C = 3); an alpha channel is dropped (a grayscale RGBA image becomes C = 1).
  Image `a.png` pairs with the mask of stem `a`, `a_mask`, `a_masks`, `a_label` or `a_labels`
  (`mask_suffixes`) in either format. All images must share one shape. Intensities follow
  `images.IntensityScaling`. `mask_mode`:
    'classes'    mask values are class ids in [0, num_classes);
    'binary'     mask > 0 is class 1 (num_classes must be 2);
    'instances'  instance ids, 0 = background → binary foreground labels (num_classes = 2);
                 `load_folder_with_instances` also returns the ids.
  Pixels equal to `ignore_label` become IGNORE_CLASS (255) in the labels.
  """
  dataset, _ = load_folder_with_instances(images_dir, masks_dir, num_classes=num_classes,
                                          mask_mode=mask_mode, ignore_label=ignore_label,
                                          mask_suffixes=mask_suffixes)
  return dataset


def load_tfds(name: str, *, data_dir: str, split: str, image_key: str = 'image',
              label_key: str = 'label', num_classes: int | None = None,
              ignore_label: int | None = None) -> Dataset:
  """Reads a TFDS dataset stored as ArrayRecord into memory, without TensorFlow.

  `tfds.data_source` gives random access to the examples; TFRECORD-format datasets cannot be
  read that way (rebuild them with `file_format='array_record'`, see data/tfds_isbi.py). Split
  slicing works, e.g. split='train[:25]'. Images of rank 2 get a channel axis; masks stored as
  `(H, W, 1)` images lose theirs. Labels must be integer class ids; with `num_classes` set they
  are checked against [0, num_classes) like mask_mode='classes' of `load_folder`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = f'TFDS dataset {name!r} split {split!r} in {data_dir}'
  if not storage.is_dir(data_dir):
    raise FileNotFoundError(f'config.data.tfds_data_dir={data_dir!r} is not a directory')
  if storage.is_remote(data_dir):
    # array_record's reader opens local files only: the dataset's folder is downloaded to a
    # temporary folder, read into memory like a local one, and the copy removed.
    folder = name.split(':')[0]
    with tempfile.TemporaryDirectory(prefix='unet_jax_tfds_') as local:
      storage.download_tree(storage.join(data_dir, folder), os.path.join(local, folder))
      return load_tfds(name, data_dir=local, split=split, image_key=image_key,
                       label_key=label_key, num_classes=num_classes, ignore_label=ignore_label)
  try:
    source = tfds.data_source(name, data_dir=data_dir, split=split, download=False)
  except NotImplementedError as e:
    raise ValueError(f'{where} is not stored as array_record, which is the only format read '
                     f"without TensorFlow; rebuild it with file_format='array_record' ({e})") from e
  except tfds.core.DatasetNotFoundError as e:  # its message lists every public dataset; not here
    raise FileNotFoundError(f'{where} cannot be opened: there is no {data_dir}/{name}/<version>/ '
                            'with dataset_info.json; build it first (e.g. data/tfds_isbi.py)'
                            ) from e
  except ValueError as e:  # an unknown split or bad slicing syntax
    raise ValueError(f'{where} cannot be opened (config.data.tfds_split): {e}') from e
  if len(source) == 0:
    raise DataError(f'{where} holds no examples')
  images, labels = [], []
  for i in range(len(source)):
    example = source[i]
    missing = [key for key in (image_key, label_key) if key not in example]
    if missing:
      raise KeyError(f'{where} example {i} has no feature {missing[0]!r} (config.data.'
                     f'tfds_{"image" if missing[0] == image_key else "label"}_key); it has '
                     f'{sorted(example)}')
    path = f'{where} example {i}'
    image = np.asarray(example[image_key])
    image_files.check_image_dtype(image, f'{path} image')
    image = _as_hwc(image, f'{path} image')
    label = _as_hw(np.asarray(example[label_key]), f'{path} label')
    if label.shape != image.shape[:2]:
      raise DataError(f'{path}: label shape {label.shape} differs from image shape '
                      f'{image.shape[:2]}')
    if images and image.shape != images[0].shape:
      raise DataError(f'{path} has image shape {image.shape} but example 0 has '
                      f'{images[0].shape}; all examples must share one shape')
    if num_classes is None:
      image_files.check_mask_dtype(label, f'{path} label')
      if label.min() < 0 or label.max() > 255:
        raise DataError(f'{path}: label values span [{label.min()}, {label.max()}], which does '
                        'not fit uint8 class ids')
      label = label.astype(np.uint8)
    else:
      label, _ = mask_to_labels(label, where=f'{path} label', mode='classes',
                                num_classes=num_classes, ignore_label=ignore_label)
    images.append(image)
    labels.append(label)
  return _scaled(np.stack(images), np.stack(labels))


def _read_volume(path: str, what: str) -> np.ndarray:
  volume = image_files.read_image(path, what)
  if volume.ndim != 3:
    raise DataError(f'{what} file {path} has shape {volume.shape}; expected a multi-page TIFF '
                    'stack (D, H, W)')
  return volume


def load_volumes(image_paths: Sequence[str], label_paths: Sequence[str], *,
                 label_mode: str = 'isbi', num_classes: int | None = None,
                 ignore_label: int | None = None) -> Dataset:
  """Multi-page TIFF stacks, one volume per example → images (N, D, H, W, 1), labels (N, D, H, W).

  label_mode 'isbi': ISBI polarity (255 = interior → class 0, 0 = membrane → class 1).
  label_mode 'classes': class ids, checked against [0, num_classes) when num_classes is given;
  pixels equal to `ignore_label` become IGNORE_CLASS, as in `mask_to_labels`.
  All volumes must share one shape (D, H, W); intensities follow `image_files.IntensityScaling`.
  """
  if label_mode not in LABEL_MODES:
    raise ValueError(f'config.data.label_mode={label_mode!r} is not one of {LABEL_MODES}')
  if not image_paths or len(image_paths) != len(label_paths):
    raise ValueError(f'{len(image_paths)} image volumes and {len(label_paths)} label volumes: '
                     'need at least one, and one label volume per image volume')
  images, labels = [], []
  for image_path, label_path in zip(image_paths, label_paths):
    image = _read_volume(image_path, 'image')
    image_files.check_image_dtype(image, f'image file {image_path}')
    label = _read_volume(label_path, 'label')
    image_files.check_mask_dtype(label, f'label file {label_path}')
    if images and image.shape != images[0].shape:
      raise DataError(f'image file {image_path} has shape {image.shape} but {image_paths[0]} '
                      f'has {images[0].shape}; all volumes must share one shape (D, H, W)')
    if label.shape != image.shape:
      raise DataError(f'label file {label_path} has shape {label.shape} but image file '
                      f'{image_path} has {image.shape}; they must match')
    if label_mode == 'isbi':
      label = isbi_labels_to_classes(label, path=label_path)
    else:
      label, _ = mask_to_labels(label, where=f'label file {label_path}', mode='classes',
                                num_classes=num_classes or IGNORE_CLASS,
                                ignore_label=ignore_label)
    images.append(image)
    labels.append(label)
  return _scaled(np.stack(images)[..., None], np.stack(labels))


def isbi_as_volume(directory: str) -> Dataset:
  """The ISBI 2012 training stack as one volume: images (1, 30, 512, 512, 1), labels (1, 30, …).

  The voxels are strongly anisotropic (about 50 nm between sections, 4 nm in-plane), so a 3D
  U-Net on it should pool in-plane more than along z. Hold out slices with `split_volume_z`.
  """
  return as_volume(load_isbi(directory))


def _read_tiff_stack(path: str, what: str) -> np.ndarray:
  if not storage.is_file(path):
    raise FileNotFoundError(f'{what} file {path} does not exist; see data/README.md for how to '
                            'obtain the ISBI 2012 stacks')
  array = image_files.read_image(path, what)
  if array.ndim == 2:
    array = array[None]
  if array.ndim != 3:
    raise DataError(f'{what} file {path} has shape {array.shape}; expected (slices, H, W)')
  if array.dtype != np.uint8:
    raise DataError(f'{what} file {path} has dtype {array.dtype}; expected uint8')
  return array


def isbi_labels_to_classes(labels: np.ndarray, *, path: str) -> np.ndarray:
  """ISBI polarity (255 interior, 0 membrane) → class ids (0 interior, 1 membrane)."""
  bad = np.setdiff1d(np.unique(labels), [0, 255])
  if bad.size:
    raise DataError(f'label file {path} has values {bad[:10].tolist()} outside {{0, 255}} '
                    '(ISBI polarity: 255 = cell interior, 0 = membrane)')
  return (labels == 0).astype(np.uint8)


def load_isbi(directory: str) -> Dataset:
  """Reads the ISBI 2012 training stacks from `directory` with checks that name the file."""
  if not storage.is_dir(directory):
    raise FileNotFoundError(f'config.data.directory={directory!r} is not a directory; it must hold '
                            f'{ISBI_FILES["images"]} and {ISBI_FILES["labels"]}')
  image_path = storage.join(directory, ISBI_FILES['images'])
  label_path = storage.join(directory, ISBI_FILES['labels'])
  stack = _read_tiff_stack(image_path, 'image')
  labels = _read_tiff_stack(label_path, 'label')
  if stack.shape != labels.shape:
      raise DataError(f'image file {image_path} has shape {stack.shape} but label file '
                    f'{label_path} has shape {labels.shape}; they must match')
  return Dataset(stack[..., None], isbi_labels_to_classes(labels, path=label_path))


def load_procedural(config: Any) -> Dataset:
  images, labels = procedural.make_em_like(**dict(config))
  return Dataset(images[..., None], isbi_labels_to_classes(labels, path='<procedural>'))
