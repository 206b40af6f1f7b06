"""Predict mode: a trained checkpoint applied to image files, written as masks and maps.

  run(config, workdir, 'scans/', 'out/', tta='dihedral')

Inputs: a PNG or TIFF file, or a folder of them (not recursive). A 2D model predicts PNGs and
single-page TIFFs as images and multi-page TIFFs `(P, H, W[, C])` slice by slice; a 3D model
predicts a multi-page TIFF as one volume `(D, H, W[, C])`. Intensities follow the rule the run
was trained with (`datasets/images.py`: the IntensityScaling saved in the workdir), then
training's `(x − config.data.mean) / config.data.std`. A truncated multi-page TIFF, or a PNG
that claims more than `max_pixels` pixels, is refused with a line naming it.
Prediction uses the overlap-tile strategy with `config.data.crop_size` as the tile unless
`tile_size` is given (see unet_jax/inference/tiled.py).

Outputs in `output_dir`, per input `<stem>.<ext>`:
  <stem>_mask.png|tif         uint8 class ids (PNG for 2D PNG input, else TIFF, one page a slice)
  <stem>_probabilities.tif    float32 `(*spatial, C)` softmax probabilities
  <stem>_overlay.png          the image with classes tinted (visualize.PALETTE); stacks and
                              volumes get one `<stem>_overlay_<slice>.png` per slice
  <stem>_isbi_submission.tif  models of the ISBI 2012 sources only: the challenge's submission
                              format, a 32-bit float TIFF stack `(slices, H, W)` in [0, 1] of
                              1 − the membrane probability, i.e. the polarity of
                              train-labels.tif (1 = cell interior, membranes dark), which the
                              challenge's Fiji evaluation thresholds as cell where value > t
                              (`predict --input=test-volume.tif` makes the test-set entry)
A file that cannot be read or has the wrong number of channels is skipped with a warning that
names it; the others are still predicted and the count of skipped files is reported at the end.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from unet_jax import checkpointing
from unet_jax import sharding
from unet_jax import storage
from unet_jax import visualize
from unet_jax.datasets import images as image_files
from unet_jax.datasets.dataset import DataError
from unet_jax.evaluation import evaluator
from unet_jax.inference import crf as crf_lib
from unet_jax.inference import postprocess
from unet_jax.inference import tiled
from unet_jax.inference import tiling
from unet_jax.models import whole_image

log = logging.getLogger('unet_jax')



@dataclasses.dataclass
class Summary:
  """What `run` did: output files written, and (path, reason) of every skipped input."""

  step: int
  written: list[str] = dataclasses.field(default_factory=list)
  failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  predicted: int = 0


# Reading inputs.


def list_inputs(input_path: str) -> list[str]:
  """The image files named by `input_path`: the file itself or a folder's PNG/TIFF files."""
  if storage.is_dir(input_path):
    names = [n for n in storage.list_names(input_path)
             if n.lower().endswith(image_files.IMAGE_EXTENSIONS)]
    if not names:
      raise FileNotFoundError(f'{input_path} holds no {"/".join(image_files.IMAGE_EXTENSIONS)} files')
    return [storage.join(input_path, n) for n in names]
  if not storage.is_file(input_path):
    raise FileNotFoundError(f'input {input_path} is neither a file nor a folder')
  return [input_path]


def _match_channels(array: np.ndarray, channels: int, path: str) -> np.ndarray:
  """`(..., K)` → `(..., channels)`: grayscale stored as RGB(A) and RGBA for RGB are accepted."""
  have = array.shape[-1]
  if have == channels:
    return array
  if channels == 1 and have in (3, 4) and np.array_equal(array[..., 0], array[..., 1]) and \
      np.array_equal(array[..., 0], array[..., 2]):
    return array[..., :1]
  if channels == 3 and have == 4:
    return array[..., :3]
  raise DataError(f'{path} has {have} channel(s) but the model takes {channels}')


def as_samples(array: np.ndarray, *, spatial_rank: int, channels: int, path: str) -> np.ndarray:
  """The array as `(S, *spatial, channels)`: S slices for a 2D model, one volume for a 3D one.

  A trailing dim equal to `channels` (≤ 4) is read as channels when `channels` > 1, otherwise
  every dim is spatial (a 3-page grayscale stack is not mistaken for an RGB image).
  """
  # A PNG with a third axis is always colour (LA, RGB, RGBA), never a stack.
  has_channels = (channels > 1 and array.shape[-1] == channels) or \
      (array.ndim == 3 and path.lower().endswith('.png'))
  if not has_channels:
    array = array[..., None]
  array = _match_channels(array, channels, path)
  spatial = array.ndim - 1
  if spatial_rank == 2 and spatial in (2, 3):
    return array.reshape(-1, *array.shape[-3:])
  if spatial_rank == 3 and spatial == 3:
    return array[None]
  wanted = 'images or stacks' if spatial_rank == 2 else 'volumes'
  raise DataError(f'{path} has shape {array.shape[:-1]} (+{channels} channel(s)); a '
                  f'{spatial_rank}D model needs {wanted}')


def normalize(array: np.ndarray, *, mean: Any, std: Any,
              scaling: image_files.IntensityScaling = image_files.IntensityScaling(),
              where: str = 'input') -> np.ndarray:
  """Training's input: the run's intensity rule (chosen for this input's dtype, see
  IntensityScaling.for_input), then `(x − mean) / std`, float32."""
  x = scaling.for_input(array, where).to_unit(array)
  return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


# Writing outputs.


def _gray(raw: np.ndarray) -> np.ndarray:
  """A 2D view of one raw slice `(H, W, C)` for overlays and the CRF."""
  return raw.astype(np.float32).mean(-1)


def isbi_submission(probabilities: np.ndarray, *, membrane_class: int) -> np.ndarray:
  """The challenge's submission stack `(slices, H, W)` float32 of probabilities `(..., H, W, C)`:
  1 − P(membrane), so cells are bright and membranes dark, as in train-labels.tif."""
  membrane = np.asarray(probabilities, np.float32)[..., membrane_class]
  return np.ascontiguousarray(1.0 - membrane.reshape(-1, *membrane.shape[-2:]), np.float32)


def _write_outputs(stem: str, output_dir: str, raw: np.ndarray, classes: np.ndarray,
                   probabilities: np.ndarray, *, as_png: bool, write_probabilities: bool,
                   write_overlays: bool, submission_class: int | None) -> list[str]:
  written = []
  mask_path = storage.join(output_dir, f'{stem}_mask.{"png" if as_png else "tif"}')
  storage.write_atomic(mask_path, visualize.png_bytes(classes[0]) if as_png else
                       _tiff_bytes(classes if classes.shape[0] > 1 else classes[0]))
  written.append(mask_path)
  if write_probabilities:
    path = storage.join(output_dir, f'{stem}_probabilities.tif')
    storage.write_atomic(path, _tiff_bytes(probabilities if probabilities.shape[0] > 1
                                           else probabilities[0]))
    written.append(path)
  if submission_class is not None:
    path = storage.join(output_dir, f'{stem}_isbi_submission.tif')
    storage.write_atomic(path, _tiff_bytes(isbi_submission(probabilities,
                                                           membrane_class=submission_class)))
    written.append(path)
  if write_overlays:
    # One overlay per 2D slice: images have one, stacks one per page, volumes one per z.
    raw_slices = raw.reshape(-1, *raw.shape[-3:])
    class_slices = classes.reshape(-1, *classes.shape[-2:])
    for i, (image, labels) in enumerate(zip(raw_slices, class_slices)):
      name = f'{stem}_overlay.png' if len(class_slices) == 1 else f'{stem}_overlay_{i:03d}.png'
      path = storage.join(output_dir, name)
      storage.write_atomic(path, visualize.png_bytes(visualize.overlay(_gray(image), labels)))
      written.append(path)
  return written


def _tiff_bytes(array: np.ndarray) -> bytes:
  import tifffile  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  tifffile.imwrite(buffer, array, photometric='minisblack')
  return buffer.getvalue()


def _stems(paths: Sequence[str]) -> list[str]:
  """Output name stems; inputs that share a stem (a.png, a.tif) keep their suffix in it."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  return [s if stems.count(s) == 1 else f'{s}_{os.path.splitext(p)[1][1:].lower()}'
          for s, p in zip(stems, paths)]


def run(config: ml_collections.ConfigDict, workdir: str, input_path: str, output_dir: str, *,
        tta: str = 'none', checkpoint: str | int = 'best',
        tile_size: int | Sequence[int] | None = None, batch_size: int | None = None,
        overlap: float = 0.25, blend: str = 'gaussian', threshold: float | None = None,
        min_size: int = 0, hole_size: int = 0, crf: bool = False,
        write_probabilities: bool = True, write_overlays: bool = True,
        progress: bool = True, max_pixels: int = image_files.DEFAULT_MAX_PIXELS) -> Summary:
  """Predicts every image of `input_path` with the checkpoint of `workdir`; see the module doc.

  Args:
    config: the config the run was trained with (model, data normalisation, checkpoint metric).
    workdir: the training workdir (holds checkpoints/).
    input_path: a PNG/TIFF file or a folder of them.
    output_dir: created if missing.
    tta: test-time augmentation, one of whole_image.TTA_MODES.
    checkpoint: 'best' (by config.checkpoint.best_metric), 'latest' or a step number.
    tile_size: tile input size, one int or one per spatial dim (default config.data.crop_size).
    batch_size: tiles per device batch (default config.eval_batch_size).
    overlap, blend: tiling of SAME nets (tiled.TiledPredictor).
    threshold: binary masks from the probability of class 1 (None: argmax).
    min_size, hole_size: remove components smaller than / fill holes up to this many pixels
      (postprocess.clean_classes; 0 disables).
    crf: refine 2D probabilities with the dense CRF (crf.crf_refine, default parameters).
    write_probabilities, write_overlays: which outputs besides the masks to write.
    progress: show a tqdm bar.
    max_pixels: refuse image files that claim more pixels than this before decoding them.

  Returns:
    A Summary; ValueError if every input failed.
  """
  if tta not in whole_image.TTA_MODES:
    raise ValueError(f'tta={tta!r} is not one of {whole_image.TTA_MODES}')
  paths = list_inputs(input_path)
  if jax.process_index() == 0:  # before the checkpoint is read and anything compiles
    storage.check_writable(output_dir, flag='--output')
  # Tile batches are split over the devices of training; the variables are replicated.
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  restored = checkpointing.restore_for_inference(config, workdir, checkpoint=checkpoint,
                                                 mesh=mesh)
  scaling = image_files.load_scaling(workdir)
  tile = tile_size if tile_size is not None else config.data.crop_size
  geometry = tiling.geometry_for(restored.model)
  for size in np.ravel(tile):
    geometry.check_tile_size(size, field='tile_size' if tile_size is not None else
                             'tile_size (default config.data.crop_size)')
  predictor = tiled.TiledPredictor.for_model(
      restored.model, restored.variables, geometry=geometry, tile_size=tile,
      batch_size=batch_size or config.eval_batch_size, overlap=overlap, blend=blend, mesh=mesh,
      progress=progress and jax.process_index() == 0)
  chief = jax.process_index() == 0
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  summary = Summary(step=restored.step)
  submission_class = (config.eval.membrane_class
                      if config.data.source in evaluator.ISBI_SOURCES else None)
  bar = tqdm(paths, unit='file', disable=not (progress and chief), dynamic_ncols=True)
  for path, stem in zip(bar, _stems(paths)):
    bar.set_postfix_str(os.path.basename(path))
    try:
      raw = as_samples(image_files.read_image(path, 'input', max_pixels=max_pixels),
                       spatial_rank=restored.spatial_rank,
                       channels=restored.input_channels, path=path)
    except ValueError as e:
      log.warning('skipped: %s', e)
      summary.failed.append((path, str(e)))
      continue
    images = normalize(raw, mean=config.data.mean, std=config.data.std, scaling=scaling,
                       where=path)
    probabilities = np.stack([predictor(image, tta=tta) for image in images])
    if crf:
      if restored.spatial_rank != 2:
        raise ValueError('crf=True refines 2D predictions; this is a 3D model')
      # The CRF's colour sigma is in 0..255 units: the slice is stretched to that range.
      probabilities = np.stack([np.asarray(crf_lib.crf_refine(
          p, visualize.to_gray_uint8(_gray(r)).astype(np.float32)))
                                for p, r in zip(probabilities, raw)])
    classes = np.stack([postprocess.postprocess(p, threshold=threshold, min_size=min_size,
                                                hole_size=hole_size) for p in probabilities])
    summary.predicted += 1
    if chief:
      summary.written += _write_outputs(
          stem, output_dir, raw, classes, probabilities,
          as_png=path.lower().endswith('.png') and restored.spatial_rank == 2 and len(raw) == 1,
          write_probabilities=write_probabilities, write_overlays=write_overlays,
          submission_class=submission_class)
  bar.close()
  if summary.failed:
    log.warning('predicted %d file(s); skipped %d unreadable or unsuitable: %s',
                summary.predicted, len(summary.failed), ', '.join(p for p, _ in summary.failed))
  else:
    log.info('predicted %d file(s) into %s', summary.predicted, output_dir)
  if not summary.predicted:
    raise ValueError('no input could be predicted: ' + '; '.join(r for _, r in summary.failed))
  return summary


__all__ = ['Summary', 'as_samples', 'isbi_submission', 'list_inputs', 'normalize', 'run']
