"""More data sources: image/mask folders, TFDS ArrayRecord datasets and 3D TIFF volumes.

Every loader returns an in-memory `input_pipeline.Dataset`: images `(N, *spatial, C) uint8` and
labels `(N, *spatial) uint8` class ids, with `IGNORE_CLASS` (255) marking pixels that a loss
should skip (pass `ignore_label=255` to it). Loaders check the data and raise `DataError` (a
ValueError) naming the offending file; nothing is cropped, resized or reinterpreted silently.

  load_folder        2D images and masks in two folders, matched by file stem (PNG or TIFF).
  load_tfds          a TFDS dataset stored as ArrayRecord, read without TensorFlow.
  load_volumes       multi-page TIFF stacks, each a (D, H, W) volume: images (N, D, H, W, 1).
  isbi_as_volume     the ISBI 2012 training stack as one labelled volume (1, 30, 512, 512, 1).
  split_volume_z     train / validation sub-volumes of a volume, split along z.

Intensities become uint8 by one rule for a whole dataset (`images_to_uint8`): uint8 stays as it
is; other integer images whose values all lie in [0, 255] are cast unchanged (e.g. 8-bit data
stored as uint16); anything else (16-bit range, float) is mapped linearly so that the 0.5th and
99.5th percentiles over all images become 0 and 255, clipping beyond. One global mapping keeps
brightness comparable between images and makes the result deterministic.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from unet_jax.input_pipeline import Dataset, isbi_labels_to_classes, load_isbi


class DataError(ValueError):
  """A data file that cannot be used as it is: unreadable, empty, of the wrong dtype, rank or
  shape, or with values outside what its role allows. The message names the file (or the TFDS
  example). Raised by every loader here, input_pipeline.load_isbi and predict's reader."""


IGNORE_CLASS = 255  # uint8 label of ignored pixels; class ids must stay below it
MASK_MODES = ('classes', 'binary', 'instances')
LABEL_MODES = ('isbi', 'classes')
IMAGE_EXTENSIONS = ('.png', '.tif', '.tiff')
MASK_SUFFIXES = ('', '_mask', '_masks', '_label', '_labels')
PERCENTILES = (0.5, 99.5)
_MAX_PERCENTILE_SAMPLES = 1 << 24  # beyond this, percentiles use a fixed stride of the pixels


def images_to_uint8(images: np.ndarray) -> np.ndarray:
  """The dataset-wide uint8 rule of the module docstring, applied to all images at once."""
  if images.dtype == np.uint8:
    return images
  if np.issubdtype(images.dtype, np.integer) and images.min() >= 0 and images.max() <= 255:
    return images.astype(np.uint8)
  flat = images.reshape(-1)
  stride = -(-flat.size // _MAX_PERCENTILE_SAMPLES)
  lo, hi = np.percentile(flat[::stride].astype(np.float64), PERCENTILES)
  scale = 255.0 / max(hi - lo, 1e-12)  # a constant image maps to 0 rather than dividing by 0
  return np.round(np.clip((images.astype(np.float64) - lo) * scale, 0, 255)).astype(np.uint8)


def read_array(path: str, what: str) -> np.ndarray:
  """Reads a PNG (Pillow) or TIFF (tifffile) file; errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} file {path} does not exist')
  try:
    if path.lower().endswith('.png'):
      from PIL import Image  # pylint: disable=g-import-not-at-top
      with Image.open(path) as image:
        array = np.asarray(image)  # palette PNGs give their indices, as class masks need
    else:
      import tifffile  # pylint: disable=g-import-not-at-top
      array = tifffile.imread(path)
  except Exception as e:  # the readers raise many types on corrupt input
    raise DataError(f'{what} file {path} is not a readable image: {e}') from e
  if array.size == 0:
    raise DataError(f'{what} file {path} holds no pixels')
  return array


# `where` names the data in errors: 'image file a.png', 'TFDS dataset … example 3 label'.
def _check_image_dtype(array: np.ndarray, where: str) -> None:
  if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer)
                                 or np.issubdtype(array.dtype, np.floating)):
    raise DataError(f'{where} has dtype {array.dtype}; expected an integer or float image')
  if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
    raise DataError(f'{where} has NaN or infinite values')


def _check_mask_dtype(array: np.ndarray, where: str) -> None:
  if not (array.dtype == bool or np.issubdtype(array.dtype, np.integer)):
    raise DataError(f'{where} has dtype {array.dtype}; masks must hold integer ids (convert '
                    'float masks explicitly; they are not rounded here)')


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
  _check_mask_dtype(mask, where)
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
  if not directory or not os.path.isdir(directory):
    raise FileNotFoundError(f'config.data.{field}={directory!r} is not a directory')
  files: dict[str, str] = {}
  for name in sorted(os.listdir(directory)):
    stem, ext = os.path.splitext(name)
    if name.startswith('.') or ext.lower() not in IMAGE_EXTENSIONS:
      continue
    if stem in files:
      raise DataError(f'{what} files {files[stem]} and {os.path.join(directory, name)} share the '
                      f'stem {stem!r}; keep one of them')
    files[stem] = os.path.join(directory, name)
  if not files:
    raise ValueError(f'config.data.{field}={directory!r} holds no {what} files '
                     f'({", ".join(IMAGE_EXTENSIONS)})')
  return dict(sorted(files.items(), key=lambda item: _natural_key(item[0])))


def match_files(images_dir: str, masks_dir: str, *,
                mask_suffixes: Sequence[str] = MASK_SUFFIXES) -> list[tuple[str, str]]:
  """(image path, mask path) pairs: mask stem = image stem + one of `mask_suffixes`.

  Pairs come in natural order of the image stems. Raises, naming the file, on an image without
  a mask, an image with two candidate masks, and a mask that belongs to no image.
  """
  images = _list_by_stem(images_dir, 'image', 'images_dir')
  masks = _list_by_stem(masks_dir, 'mask', 'masks_dir')
  if os.path.samefile(images_dir, masks_dir):
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
    image = read_array(image_path, 'image')
    _check_image_dtype(image, f'image file {image_path}')
    image = _as_hwc(image, f'image file {image_path}')
    mask = _as_hw(read_array(mask_path, 'mask'), f'mask file {mask_path}')
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
  dataset = Dataset(images_to_uint8(np.stack(images)), np.stack(labels))
  return dataset, (np.stack(instances) if mask_mode == 'instances' else None)


def load_folder(images_dir: str, masks_dir: str, *, num_classes: int, mask_mode: str = 'classes',
                ignore_label: int | None = None,
                mask_suffixes: Sequence[str] = MASK_SUFFIXES) -> Dataset:
  """A folder of 2D images and a folder of masks → Dataset `(N, H, W, C)`, `(N, H, W)`.

  Files are PNG or TIFF (.png, .tif, .tiff; other files are ignored), 8- or 16-bit, grayscale
  (C = 1) or RGB(A) (C = 3 or 4). Image `a.png` pairs with the mask of stem `a`, `a_mask`,
  `a_masks`, `a_label` or `a_labels` (`mask_suffixes`) in either format. All images must share
  one shape. Intensities follow `images_to_uint8`. `mask_mode`:
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
  if not data_dir or not os.path.isdir(data_dir):
    raise FileNotFoundError(f'config.data.tfds_data_dir={data_dir!r} is not a directory')
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
    _check_image_dtype(image, f'{path} image')
    image = _as_hwc(image, f'{path} image')
    label = _as_hw(np.asarray(example[label_key]), f'{path} label')
    if label.shape != image.shape[:2]:
      raise DataError(f'{path}: label shape {label.shape} differs from image shape '
                      f'{image.shape[:2]}')
    if images and image.shape != images[0].shape:
      raise DataError(f'{path} has image shape {image.shape} but example 0 has '
                      f'{images[0].shape}; all examples must share one shape')
    if num_classes is None:
      _check_mask_dtype(label, f'{path} label')
      if label.min() < 0 or label.max() > 255:
        raise DataError(f'{path}: label values span [{label.min()}, {label.max()}], which does '
                        'not fit uint8 class ids')
      label = label.astype(np.uint8)
    else:
      label, _ = mask_to_labels(label, where=f'{path} label', mode='classes',
                                num_classes=num_classes, ignore_label=ignore_label)
    images.append(image)
    labels.append(label)
  return Dataset(images_to_uint8(np.stack(images)), np.stack(labels))


def _read_volume(path: str, what: str) -> np.ndarray:
  volume = read_array(path, what)
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
  All volumes must share one shape (D, H, W); intensities follow `images_to_uint8`.
  """
  if label_mode not in LABEL_MODES:
    raise ValueError(f'config.data.label_mode={label_mode!r} is not one of {LABEL_MODES}')
  if not image_paths or len(image_paths) != len(label_paths):
    raise ValueError(f'{len(image_paths)} image volumes and {len(label_paths)} label volumes: '
                     'need at least one, and one label volume per image volume')
  images, labels = [], []
  for image_path, label_path in zip(image_paths, label_paths):
    image = _read_volume(image_path, 'image')
    _check_image_dtype(image, f'image file {image_path}')
    label = _read_volume(label_path, 'label')
    _check_mask_dtype(label, f'label file {label_path}')
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
  return Dataset(images_to_uint8(np.stack(images))[..., None], np.stack(labels))


def isbi_as_volume(directory: str) -> Dataset:
  """The ISBI 2012 training stack as one volume: images (1, 30, 512, 512, 1), labels (1, 30, …).

  The voxels are strongly anisotropic (about 50 nm between sections, 4 nm in-plane), so a 3D
  U-Net on it should pool in-plane more than along z. Hold out slices with `split_volume_z`.
  """
  return as_volume(load_isbi(directory))


def as_volume(slices: Dataset) -> Dataset:
  """A stack of N 2D examples as one (1, N, H, W, C) volume."""
  weights = None if slices.weights is None else slices.weights[None]
  return Dataset(slices.images[None], slices.labels[None], weights)


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
    return Dataset(dataset.images[:, window], dataset.labels[:, window], weights)
  return take(list(train)), take(val)
