"""Fuzzed data files through the real readers: each either loads correctly or fails by name.

The readers are the ones the sources use: the 'folder' source (loaders.load_folder), the ISBI
TIFF stacks (loaders.load_isbi), the 'volumes' source (loaders.load_volumes) and predict's
image reader (image_files.read_image + predict.as_samples). Hypothesis writes files holding arrays of
random rank (1–4), size (zero-size included), dtype (uint8, uint16, int8, int32, int64, float16,
float32, float64 with NaN/inf, bool, complex64) and values (labels outside the class range
included), or random bytes, a truncated valid file, or nothing at all.

The property, for every reader: an independent reference computed from the arrays the files were
written from says whether the data is valid by the reader's documented rules. Valid data must
load and equal the reference; invalid data must raise dataset_lib.DataError whose message names a
file at fault. A truncated file may still decode (PNG tolerates a cut end): then it must decode to
exactly the array it was written from. Never an opaque exception, never a silent wrong result.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
import warnings

import hypothesis
import numpy as np
import pytest
import tifffile
from hypothesis import strategies as st
from PIL import Image
from skimage import exposure

from unet_jax.inference import predict
from unet_jax.datasets import loaders
from unet_jax.datasets import dataset as dataset_lib
from unet_jax.datasets import images as image_files

FUZZ = hypothesis.settings(max_examples=25, deadline=None, derandomize=True, database=None,
                           suppress_health_check=[hypothesis.HealthCheck.too_slow])
DTYPES = ('uint8', 'uint16', 'int8', 'int32', 'int64', 'float16', 'float32', 'float64', 'bool',
          'complex64')


@dataclasses.dataclass(frozen=True)
class FileSpec:
  """What to write: an array ('array'), or bytes that hold none ('random', 'truncated', 'empty').

  `array` is what an 'array' or 'truncated' file is written from; `png` picks the format where
  Pillow can write the array; `keep` is the fraction of bytes a truncated file keeps.
  """

  kind: str
  array: np.ndarray | None = None
  png: bool = False
  keep: float = 1.0
  noise: bytes = b''


def _png_writable(array: np.ndarray) -> bool:
  if array.size == 0:
    return False
  if array.ndim == 2:
    return array.dtype in (np.uint8, np.uint16, np.bool_)
  return array.ndim == 3 and array.dtype == np.uint8 and array.shape[-1] in (2, 3, 4)


def _tiff_writable(array: np.ndarray) -> bool:
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      tifffile.imwrite(io.BytesIO(), array)
    return True
  except Exception:  # pylint: disable=broad-except  (tifffile's refusals vary by shape and dtype)
    return False


@st.composite
def arrays(draw, ranks=(1, 2, 3, 4), dtypes=DTYPES, max_side=5, values=None, shape=None,
           special=True) -> np.ndarray:
  """A random array of a random (or the given) shape; `values` (low, high) bounds integers;
  `special` may put a NaN or an infinity into a float array."""
  if shape is None:
    rank = draw(st.sampled_from(ranks))
    shape = tuple(draw(st.integers(0 if draw(st.integers(0, 9)) == 0 else 1, max_side))
                  for _ in range(rank))
  dtype = np.dtype(draw(st.sampled_from(dtypes)))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  if dtype == np.bool_:
    return rng.random(shape) < 0.5
  if dtype.kind in 'iu':
    info = np.iinfo(dtype)
    low, high = values if values is not None else draw(st.sampled_from(
        [(0, 3), (0, 255), (-5, 5), (info.min, info.max)]))
    return rng.integers(max(low, info.min), min(high, info.max), shape, dtype=dtype,
                        endpoint=True)
  scale = draw(st.sampled_from([1.0, 255.0, 1e4]))
  array = (rng.random(shape) * scale).astype(dtype)
  if dtype.kind == 'c':
    array = array + 1j * rng.random(shape).astype(dtype)
  if special and array.size and draw(st.integers(0, 2)) == 0:
    array.flat[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from(
        [np.nan, np.inf, -np.inf]))
  return array


CORRUPT = ('random', 'truncated', 'empty')


@st.composite
def files(draw, array_strategy, kinds=('array',) * 6 + CORRUPT) -> FileSpec:
  kind = draw(st.sampled_from(kinds))
  if kind in ('random', 'empty'):
    magic = draw(st.sampled_from([b'', b'\x89PNG\r\n\x1a\n', b'II*\x00', b'MM\x00*']))
    noise = draw(st.binary(max_size=200)) if kind == 'random' else b''
    return FileSpec(kind, png=draw(st.booleans()), noise=magic + noise if noise else b'')
  array = draw(array_strategy)
  png = _png_writable(array) and draw(st.booleans())
  if not png and not _tiff_writable(array):  # e.g. zero-size or 1D bool: stored as uint8 then
    array = (array != 0).astype(np.uint8) if array.size else np.zeros(array.shape, np.uint8)
  if array.size == 0:
    kind = 'array'  # nothing to cut
  return FileSpec(kind, array, png, keep=draw(st.floats(0.0, 0.99)))


def _write(spec: FileSpec, stem: str) -> str:
  """Writes `spec` to `stem` + .png or .tif; returns the path."""
  path = stem + ('.png' if spec.png else '.tif')
  if spec.array is None:
    with open(path, 'wb') as f:
      f.write(spec.noise)
    return path
  if spec.png:
    Image.fromarray(spec.array).save(path)
  else:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # tifffile's notes on how it stores RGB-like shapes
      tifffile.imwrite(path, spec.array)
  if spec.kind == 'truncated':
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
      f.write(data[:int(len(data) * spec.keep)])
  return path


def _holds(spec: FileSpec) -> np.ndarray | None:
  """The array a file holds if it reads at all (None: it must not read)."""
  return spec.array if spec.kind in ('array', 'truncated') else None


def _check(load, *, bad: set[str], maybe: set[str], compare) -> None:
  """`load()` must raise DataError naming a file of `bad` ∪ `maybe`, or (`bad` empty) succeed
  with a result that `compare` accepts."""
  try:
    result = load()
  except dataset_lib.DataError as e:
    hypothesis.event('rejected')
    message = str(e)
    named = [p for p in bad | maybe if p in message]
    assert named, f'{message!r} names none of the files at fault {sorted(bad | maybe)}'
    return
  assert not bad, f'loaded although {sorted(bad)} are invalid'
  hypothesis.event('loaded')
  compare(result)


def _float_ok(a: np.ndarray) -> bool:
  return a.dtype.kind in 'iu' or (a.dtype.kind == 'f' and bool(np.isfinite(a).all()))


def _uint8_reference(stack: np.ndarray) -> np.ndarray:
  """The documented rule of image_files.images_to_uint8, via skimage's linear rescaling."""
  if stack.dtype == np.uint8:
    return stack
  if stack.dtype.kind in 'iu' and stack.min() >= 0 and stack.max() <= 255:
    return stack.astype(np.uint8)
  values = stack.astype(np.float64)
  lo, hi = np.percentile(values, image_files.PERCENTILES)
  if hi <= lo:
    return np.zeros(stack.shape, np.uint8)
  scaled = exposure.rescale_intensity(values, in_range=(lo, hi), out_range=(0.0, 255.0))
  return np.round(scaled).astype(np.uint8)


def _assert_uint8_close(got: np.ndarray, want: np.ndarray) -> None:
  assert got.dtype == np.uint8 and got.shape == want.shape
  assert np.abs(got.astype(np.int16) - want).max(initial=0) <= 1  # rounding at .5


# ---------------------------------------------------------------------------- 'folder' source

PLAIN_IMAGE = ('uint8', 'uint16', 'float32')
PLAIN_MASK = ('uint8', 'int32', 'bool')
# What a case may carry, each fuzzed on its own: nothing wrong, an arbitrary array (any rank,
# dtype, size, values) as the image or the mask/labels, random/truncated/empty bytes, a shape
# that does not match the others, label values outside the class range, NaN/inf in a float image.
FAULTS = ('none', 'any_image', 'any_mask', 'bytes', 'shape', 'values', 'nan')


def _clean(array_strategy):
  return files(array_strategy, kinds=('array',))


@st.composite
def folder_cases(draw, fault: str):
  """(mask_mode, num_classes, [(image FileSpec, mask FileSpec)]): a clean set of pairs of one
  shape with `fault` put into one file ('none': left clean)."""
  mode = draw(st.sampled_from(loaders.MASK_MODES))
  num_classes = draw(st.sampled_from([2, 3])) if mode == 'classes' else 2
  top = num_classes - 1 if mode == 'classes' else 3
  shape = draw(st.sampled_from([(4, 5), (4, 5, 3), (3, 3)]))
  mask_shape = draw(st.sampled_from([shape[:2], shape[:2] + (1,)]))

  def image(**kwargs):
    return _clean(arrays(shape=shape, dtypes=PLAIN_IMAGE, special=False, **kwargs))

  def mask(values=(0, top), dtypes=PLAIN_MASK, where=mask_shape):
    return _clean(arrays(shape=where, dtypes=dtypes, values=values))

  pairs = [[draw(image()), draw(mask())] for _ in range(draw(st.integers(1, 3)))]
  at = draw(st.integers(0, len(pairs) - 1))
  if fault == 'any_image':
    pairs[at][0] = draw(files(arrays()))
  elif fault == 'any_mask':
    pairs[at][1] = draw(files(arrays(values=draw(st.sampled_from([(0, top), None])))))
  elif fault == 'bytes':
    pairs[at][draw(st.integers(0, 1))] = draw(files(
        arrays(shape=shape, dtypes=('uint8',)), kinds=CORRUPT))
  elif fault == 'shape':
    if draw(st.booleans()):
      pairs[at][0] = draw(_clean(arrays(shape=(5, 4), dtypes=PLAIN_IMAGE, special=False)))
    else:
      pairs[at][1] = draw(mask(where=(5, 5)))
  elif fault == 'values':  # labels outside the class range, negative, or beyond int32 ids
    low, high, dtype = draw(st.sampled_from([(0, top + 1, 'uint8'), (-2, top, 'int32'),
                                             (2**31 - 2, 2**31 + 1, 'int64')]))
    pairs[at][1] = draw(mask(values=(low, high), dtypes=(dtype,)))
  elif fault == 'nan':
    pairs[at][0] = draw(_clean(arrays(shape=shape, dtypes=('float32', 'float64'))))
  return mode, num_classes, [tuple(pair) for pair in pairs]


def _folder_reference(mode, num_classes, pairs, paths):
  """(images, labels, instance ids, files at fault) by load_folder's documented rules."""
  bad, images, labels, instances, first = set(), [], [], [], None
  for (image_spec, mask_spec), (image_path, mask_path) in zip(pairs, paths):
    image, mask = _holds(image_spec), _holds(mask_spec)
    if image is None or image.size == 0 or not _float_ok(image) or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[-1] <= 4)):
      bad.add(image_path)
      image = None
    else:
      image = image[..., None] if image.ndim == 2 else image
      if first is None:
        first = (image_path, image.shape)
      elif image.shape != first[1]:
        bad |= {image_path, first[0]}
    if mask is not None and mask.ndim == 3 and mask.shape[-1] == 1:
      mask = mask[..., 0]
    if mask is None or mask.size == 0 or mask.ndim != 2 or mask.dtype.kind not in 'biu':
      bad.add(mask_path)
      continue
    if image is not None and mask.shape != image.shape[:2]:
      bad |= {mask_path, image_path}
    ids = mask.astype(object)  # exact, whatever the integer width
    if mode == 'classes':
      valid = all(0 <= v < num_classes for v in ids.ravel())
    else:
      valid = all(0 <= v < (2**31 if mode == 'instances' else np.inf) for v in ids.ravel())
    if not valid:
      bad.add(mask_path)
    elif image is not None:
      images.append(image)
      labels.append((mask > 0) if mode != 'classes' else mask)
      instances.append(mask.astype(np.int64))
  return images, labels, instances, bad


@pytest.mark.parametrize('fault', FAULTS)
@FUZZ
@hypothesis.given(data=st.data())
def test_folder_source_loads_correctly_or_names_the_bad_file(fault, data):
  case = data.draw(folder_cases(fault))
  mode, num_classes, pairs = case
  with tempfile.TemporaryDirectory() as tmp:
    os.mkdir(os.path.join(tmp, 'images'))
    os.mkdir(os.path.join(tmp, 'masks'))
    paths = [(_write(image, os.path.join(tmp, 'images', f'a{i}')),
              _write(mask, os.path.join(tmp, 'masks', f'a{i}')))
             for i, (image, mask) in enumerate(pairs)]
    images, labels, instances, bad = _folder_reference(mode, num_classes, pairs, paths)
    maybe = {p for (image, mask), pair in zip(pairs, paths)
             for spec, p in zip((image, mask), pair) if spec.kind == 'truncated'}

    def compare(loaded):
      dataset, ids = loaded
      _assert_uint8_close(dataset.images, _uint8_reference(np.stack(images)))
      np.testing.assert_array_equal(dataset.labels, np.stack(labels).astype(np.uint8))
      if mode == 'instances':
        np.testing.assert_array_equal(ids, np.stack(instances))
      else:
        assert ids is None

    _check(lambda: loaders.load_folder_with_instances(
        os.path.join(tmp, 'images'), os.path.join(tmp, 'masks'), num_classes=num_classes,
        mask_mode=mode), bad=bad, maybe=maybe, compare=compare)


# ----------------------------------------------------------------------------- ISBI stacks


@st.composite
def isbi_cases(draw, fault: str):
  """(volume FileSpec, labels FileSpec): clean uint8 stacks with ISBI labels {0, 255}, and
  `fault` in one of them ('nan' stands for any array: the stacks must be uint8)."""
  shape = draw(st.sampled_from([(2, 4, 5), (4, 5), (1, 3, 3)]))
  stacks = [draw(_clean(arrays(shape=shape, dtypes=('uint8',)))),
            draw(_clean(arrays(shape=shape, dtypes=('uint8',), values=(0, 1)).map(
                lambda a: a * np.uint8(255))))]
  if fault in ('any_image', 'any_mask', 'nan'):
    stacks[fault == 'any_mask'] = draw(files(arrays()))
  elif fault == 'bytes':
    stacks[draw(st.integers(0, 1))] = draw(files(arrays(shape=shape, dtypes=('uint8',)),
                                                 kinds=CORRUPT))
  elif fault == 'shape':
    stacks[draw(st.integers(0, 1))] = draw(_clean(arrays(shape=(3, 4, 5), dtypes=('uint8',),
                                                         values=(0, 0))))
  elif fault == 'values':
    stacks[1] = draw(_clean(arrays(shape=shape, dtypes=('uint8', 'uint16', 'bool'))))
  return tuple(dataclasses.replace(spec, png=False) for spec in stacks)


@pytest.mark.parametrize('fault', FAULTS)
@FUZZ
@hypothesis.given(data=st.data())
def test_isbi_stacks_load_correctly_or_name_the_bad_file(fault, data):
  case = data.draw(isbi_cases(fault))
  volume_spec, labels_spec = case
  with tempfile.TemporaryDirectory() as tmp:
    volume_path = _write(volume_spec, os.path.join(tmp, 'train-volume'))
    labels_path = _write(labels_spec, os.path.join(tmp, 'train-labels'))
    bad = set()
    arrays_read = []
    for path, spec in ((volume_path, volume_spec), (labels_path, labels_spec)):
      array = _holds(spec)
      if array is None or array.size == 0 or array.dtype != np.uint8 or array.ndim not in (2, 3):
        bad.add(path)
        array = None
      arrays_read.append(None if array is None else array.reshape((-1,) + array.shape[-2:]))
    volume, labels = arrays_read
    if volume is not None and labels is not None and volume.shape != labels.shape:
      bad |= {volume_path, labels_path}
    if labels is not None and not np.isin(labels, (0, 255)).all():
      bad.add(labels_path)
    maybe = {p for p, s in ((volume_path, volume_spec), (labels_path, labels_spec))
             if s.kind == 'truncated'}

    def compare(dataset):
      np.testing.assert_array_equal(dataset.images, volume[..., None])
      np.testing.assert_array_equal(dataset.labels, (labels == 0).astype(np.uint8))

    _check(lambda: loaders.load_isbi(tmp), bad=bad, maybe=maybe, compare=compare)


# ---------------------------------------------------------------------------- 'volumes' source


@st.composite
def volume_cases(draw, fault: str):
  """(label_mode, [(image FileSpec, labels FileSpec)]): clean (D, H, W) volumes with `fault`
  put into one file."""
  label_mode = draw(st.sampled_from(loaders.LABEL_MODES))
  shape = draw(st.sampled_from([(2, 3, 4), (3, 3, 3)]))

  def labels(values=None, where=shape, dtypes=PLAIN_MASK):
    if label_mode == 'isbi' and values is None:
      return _clean(arrays(shape=where, dtypes=('uint8',), values=(0, 1)).map(
          lambda a: a * np.uint8(255)))
    return _clean(arrays(shape=where, dtypes=dtypes, values=values or (0, 2)))

  image = _clean(arrays(shape=shape, dtypes=PLAIN_IMAGE + ('float64', 'int8'), special=False))
  pairs = [[draw(image), draw(labels())] for _ in range(draw(st.integers(1, 2)))]
  at = draw(st.integers(0, len(pairs) - 1))
  if fault == 'any_image':
    pairs[at][0] = draw(files(arrays()))
  elif fault == 'any_mask':
    pairs[at][1] = draw(files(arrays()))
  elif fault == 'bytes':
    pairs[at][draw(st.integers(0, 1))] = draw(files(arrays(shape=shape), kinds=CORRUPT))
  elif fault == 'shape':
    pairs[at][draw(st.integers(0, 1))] = draw(_clean(arrays(shape=(2, 4, 3), dtypes=('uint8',),
                                                            values=(0, 0))))
  elif fault == 'values':
    pairs[at][1] = draw(labels(values=draw(st.sampled_from([(0, 7), (-1, 2), (250, 256)])),
                               dtypes=('int32',)))
  elif fault == 'nan':
    pairs[at][0] = draw(_clean(arrays(shape=shape, dtypes=('float32', 'float64'))))
  return label_mode, [tuple(dataclasses.replace(spec, png=False) for spec in pair)
                      for pair in pairs]


@pytest.mark.parametrize('fault', FAULTS)
@FUZZ
@hypothesis.given(data=st.data())
def test_volumes_source_loads_correctly_or_names_the_bad_file(fault, data):
  case = data.draw(volume_cases(fault))
  label_mode, pairs = case
  with tempfile.TemporaryDirectory() as tmp:
    paths = [(_write(image, os.path.join(tmp, f'image{i}')),
              _write(labels, os.path.join(tmp, f'labels{i}')))
             for i, (image, labels) in enumerate(pairs)]
    bad, images, labels_out, first = set(), [], [], None
    for (image_spec, labels_spec), (image_path, labels_path) in zip(pairs, paths):
      image, labels = _holds(image_spec), _holds(labels_spec)
      if image is None or image.size == 0 or image.ndim != 3 or not _float_ok(image):
        bad.add(image_path)
        image = None
      elif first is None:
        first = (image_path, image.shape)
      elif image.shape != first[1]:
        bad |= {image_path, first[0]}
      if labels is None or labels.size == 0 or labels.ndim != 3 or \
          labels.dtype.kind not in 'biu':
        bad.add(labels_path)
        continue
      if image is not None and labels.shape != image.shape:
        bad |= {labels_path, image_path}
      ids = labels.astype(object)
      allowed = (0, 255) if label_mode == 'isbi' else range(dataset_lib.IGNORE_CLASS)
      if not all(v in allowed for v in ids.ravel()):
        bad.add(labels_path)
      elif image is not None:
        images.append(image)
        labels_out.append((labels == 0) if label_mode == 'isbi' else labels)
    maybe = {p for (image, labels), pair in zip(pairs, paths)
             for spec, p in zip((image, labels), pair) if spec.kind == 'truncated'}

    def compare(dataset):
      _assert_uint8_close(dataset.images, _uint8_reference(np.stack(images))[..., None])
      np.testing.assert_array_equal(dataset.labels, np.stack(labels_out).astype(np.uint8))

    _check(lambda: loaders.load_volumes([p for p, _ in paths], [p for _, p in paths],
                                        label_mode=label_mode),
           bad=bad, maybe=maybe, compare=compare)


# ---------------------------------------------------------------------------- predict's reader


@st.composite
def predict_cases(draw, fault: str):
  """A FileSpec: a clean grayscale image, stack or RGB(A) PNG (grey or colour), or `fault`."""
  shape = draw(st.sampled_from([(4, 5), (2, 4, 5), (4, 5, 3), (4, 5, 4)]))
  gray = arrays(shape=shape, dtypes=('uint8',)).map(
      lambda a: np.repeat(a[..., :1], a.shape[-1], -1) if a.ndim == 3 and a.shape[-1] in (3, 4)
      and draw(st.booleans()) else a)
  if fault in ('any_image', 'any_mask', 'values'):
    return draw(files(arrays()))
  if fault == 'bytes':
    return draw(files(gray, kinds=CORRUPT))
  if fault == 'shape':  # a PNG with two channels (grey + alpha) is no stack of 2-pixel images
    return dataclasses.replace(draw(_clean(arrays(shape=(4, 5, 2), dtypes=('uint8',)))),
                               png=True)
  if fault == 'nan':
    return draw(_clean(arrays(shape=shape, dtypes=('float32', 'float64'))))
  return draw(_clean(gray))


@pytest.mark.parametrize('fault', FAULTS)
@FUZZ
@hypothesis.given(data=st.data())
def test_predict_reader_reads_correctly_or_names_the_bad_file(fault, data):
  spec = data.draw(predict_cases(fault))
  with tempfile.TemporaryDirectory() as tmp:
    path = _write(spec, os.path.join(tmp, 'scan'))
    array = _holds(spec)
    expected = None
    if array is not None and array.size and array.dtype.kind in 'biuf' and _float_ok(
        array.astype(np.float32) if array.dtype == np.bool_ else array):
      if spec.png and array.ndim == 3:  # a PNG's third axis is always colour
        if array.shape[-1] in (3, 4) and (array == array[..., :1]).all():
          expected = array[None, ..., :1]
      elif array.ndim in (2, 3):
        expected = array.reshape(-1, *array.shape[-2:], 1)

    def read():
      return predict.as_samples(image_files.read_image(path), spatial_rank=2, channels=1, path=path)

    def compare(samples):
      assert samples.dtype == expected.dtype
      np.testing.assert_array_equal(samples, expected)
      normalized = predict.normalize(samples, mean=0.5, std=0.2)
      assert normalized.dtype == np.float32 and np.isfinite(normalized).all()

    _check(read, bad=set() if expected is not None else {path},
           maybe={path} if spec.kind == 'truncated' else set(), compare=compare)


def test_a_corrupt_image_in_a_folder_is_named_not_a_pil_error(tmp_path):
  """The unfuzzed baseline of the property: one known-corrupt file of each kind."""
  images, masks = tmp_path / 'images', tmp_path / 'masks'
  images.mkdir()
  masks.mkdir()
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(images / 'a.png')
  (masks / 'a.png').write_bytes(b'\x89PNG\r\n\x1a\n' + os.urandom(40))
  with pytest.raises(dataset_lib.DataError, match=r'mask file .*masks/a\.png is not a readable'):
    loaders.load_folder(str(images), str(masks), num_classes=2, mask_mode='binary')
