"""Reading image files, and the one intensity rule shared by training and prediction.

`read_image` reads every PNG and TIFF the project takes (training folders, volumes, the ISBI
stacks, predict's inputs): errors are `DataError`s that name the file, a truncated multi-page
TIFF is refused instead of read as fewer pages, and a PNG whose header promises more than
`max_pixels` is refused before it is decoded.

`IntensityScaling` maps raw intensities to the uint8 range the models are trained on. It is
fitted once per dataset (`fit`):
  * uint8 images stay as they are;
  * other integer images whose values all lie in [0, 255] are cast unchanged (8-bit data
    stored as uint16);
  * anything else (16-bit range, float) is mapped linearly so that the 0.5th and 99.5th
    percentiles over all images become 0 and 255, clipping beyond.
A run saves the fitted rule in its workdir (`save` / `load`), and prediction, evaluation and
export apply that same rule to new images (`for_input` chooses it per input), so a model trained
on 16-bit data sees 16-bit inputs scaled exactly as in training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import numpy as np

from unet_jax import storage
from unet_jax.datasets.dataset import DataError

log = logging.getLogger('unet_jax')

IMAGE_EXTENSIONS = ('.png', '.tif', '.tiff')
PERCENTILES = (0.5, 99.5)
# A decompression bound: a PNG header can claim gigapixels in a few hundred bytes.
DEFAULT_MAX_PIXELS = 1 << 28
SCALING_FILE = 'intensity_scaling.json'
_MAX_PERCENTILE_SAMPLES = 1 << 24  # beyond this, percentiles use a fixed stride of the pixels


def _read_tiff(path: str, what: str) -> np.ndarray:
  import tifffile  # pylint: disable=g-import-not-at-top
  problems: list[str] = []

  class _Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
      problems.append(record.getMessage())

  # tifffile reports a truncated page chain as a log line and returns the pages before it.
  handler, tiff_log = _Collect(level=logging.WARNING), logging.getLogger('tifffile')
  tiff_log.addHandler(handler)
  try:
    array = tifffile.imread(storage.readable(path))
  finally:
    tiff_log.removeHandler(handler)
  if problems:
    raise DataError(f'{what} file {path} is not a readable TIFF: it is damaged or truncated '
                    f'({problems[0].strip()}), so only part of its pages could be read')
  return array


def _read_png(path: str, max_pixels: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(storage.readable(path)) as image:
    width, height = image.size
    if width * height > max_pixels:
      raise DataError(f'{path} claims {width}×{height} = {width * height:,} pixels, more than the '
                      f'limit of {max_pixels:,} (--max_pixels)')
    return np.asarray(image)  # palette PNGs give their indices, as class masks need


def read_image(path: str, what: str = 'image', *, max_pixels: int = DEFAULT_MAX_PIXELS
               ) -> np.ndarray:
  """The raw array of a PNG (Pillow) or TIFF (tifffile) file; DataError naming the file."""
  if not storage.is_file(path):
    raise FileNotFoundError(f'{what} file {path} does not exist')
  try:
    if path.lower().endswith('.png'):
      array = _read_png(path, max_pixels)
    else:
      array = _read_tiff(path, what)
  except DataError:
    raise
  except Exception as e:  # the readers raise many types on corrupt input
    kind = 'image' if path.lower().endswith('.png') else 'TIFF'
    raise DataError(f'{what} file {path} is not a readable {kind}: {type(e).__name__}: {e}'
                    ) from None
  if array.size == 0 or array.dtype.kind not in 'biuf':
    raise DataError(f'{what} file {path} holds no image data (shape {array.shape}, dtype '
                    f'{array.dtype})')
  if array.dtype.kind == 'f' and not np.isfinite(array).all():  # would predict NaN silently
    raise DataError(f'{what} file {path} has NaN or infinite values')
  return array


def without_alpha(image: np.ndarray, path: str) -> np.ndarray:
  """`(H, W, C)` without its alpha channel (RGBA, and LA for PNG): transparency is not image
  content. What remains of a grayscale image stored as RGBA is one channel."""
  if image.ndim != 3 or not (image.shape[-1] == 4 or
                             (image.shape[-1] == 2 and path.lower().endswith('.png'))):
    return image
  image = image[..., :-1]
  if image.shape[-1] == 3 and (image == image[..., :1]).all():
    image = image[..., :1]
  return image


def check_image_dtype(array: np.ndarray, where: str) -> None:
  """Integer or finite float pixels; `where` names the data ('image file a.png')."""
  if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer)
                                 or np.issubdtype(array.dtype, np.floating)):
    raise DataError(f'{where} has dtype {array.dtype}; expected an integer or float image')
  if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
    raise DataError(f'{where} has NaN or infinite values')


def check_mask_dtype(array: np.ndarray, where: str) -> None:
  if not (array.dtype == bool or np.issubdtype(array.dtype, np.integer)):
    raise DataError(f'{where} has dtype {array.dtype}; masks must hold integer ids (convert '
                    'float masks explicitly; they are not rounded here)')


@dataclasses.dataclass(frozen=True)
class IntensityScaling:
  """Raw intensity → uint8: `round(clip((x − low) · 255 / (high − low), 0, 255))`.

  Attributes:
    dtype: the dtype of the raw images the rule was fitted on ('uint8', 'uint16', 'float32').
    low, high: the raw values that become 0 and 255.
  """

  dtype: str = 'uint8'
  low: float = 0.0
  high: float = 255.0

  @classmethod
  def fit(cls, images: np.ndarray) -> 'IntensityScaling':
    """The dataset-wide rule of the module docstring for all of `images` at once."""
    dtype = str(images.dtype)
    if images.dtype == np.uint8 or (np.issubdtype(images.dtype, np.integer)
                                    and images.min() >= 0 and images.max() <= 255):
      return cls(dtype)
    flat = images.reshape(-1)
    stride = -(-flat.size // _MAX_PERCENTILE_SAMPLES)
    low, high = np.percentile(flat[::stride].astype(np.float64), PERCENTILES)
    return cls(dtype, float(low), float(high))

  @property
  def is_identity(self) -> bool:
    return (self.low, self.high) == (0.0, 255.0)

  def to_uint8(self, images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8 and self.is_identity:
      return images
    if self.is_identity and np.issubdtype(images.dtype, np.integer):
      return np.clip(images, 0, 255).astype(np.uint8)
    scale = 255.0 / max(self.high - self.low, 1e-12)  # a constant image maps to 0
    return np.round(np.clip((images.astype(np.float64) - self.low) * scale, 0, 255)
                    ).astype(np.uint8)

  def to_unit(self, images: np.ndarray) -> np.ndarray:
    """float32 in [0, 1], exactly what training feeds before its mean/std normalisation."""
    return self.to_uint8(images).astype(np.float32) / np.float32(255.0)

  def for_input(self, array: np.ndarray, where: str) -> 'IntensityScaling':
    """The rule for one input to a model trained with this rule.

    uint8 inputs are taken as they are (training keeps uint8 data unchanged); inputs of the
    training dtype get the training rule; float inputs in [0, 1] are read as training's own
    [0, 1] scale. Anything else (a 12-bit stack given to a model trained on 8-bit data) cannot
    follow the training rule: it is fitted on the input itself, with a warning naming it.
    """
    if array.dtype == np.uint8:
      return IntensityScaling()
    if str(array.dtype) == self.dtype:
      return self
    if array.dtype.kind == 'f' and array.min() >= 0 and array.max() <= 1:
      return IntensityScaling(str(array.dtype), 0.0, 1.0)
    fitted = IntensityScaling.fit(array)
    if not fitted.is_identity:
      log.warning('%s has dtype %s (values %s..%s) but the model was trained on %s images; '
                  'its intensities are stretched by its own %s percentiles', where, array.dtype,
                  array.min(), array.max(), self.dtype, PERCENTILES)
    return fitted

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, record: dict[str, Any]) -> 'IntensityScaling':
    return cls(str(record['dtype']), float(record['low']), float(record['high']))


def images_to_uint8(images: np.ndarray) -> np.ndarray:
  """`images` under the rule fitted on them (IntensityScaling.fit)."""
  return IntensityScaling.fit(images).to_uint8(images)


def save_scaling(scaling: IntensityScaling, workdir: str) -> str:
  path = storage.join(workdir, SCALING_FILE)
  storage.write_atomic(path, json.dumps(scaling.to_dict(), indent=2))
  return path


def load_scaling(workdir: str) -> IntensityScaling:
  """The rule a run in `workdir` was trained with; uint8 as is for runs that saved none."""
  path = storage.join(workdir, SCALING_FILE)
  if not storage.exists(path):
    return IntensityScaling()
  return IntensityScaling.from_dict(json.loads(storage.read_text(path)))
