"""Predict mode: a trained checkpoint applied to image files, written as masks and maps.

  run(config, workdir, 'scans/', 'out/', tta='dihedral')

Inputs: a PNG or TIFF file, or a folder of them (not recursive). A 2D model predicts PNGs and
single-page TIFFs as images and multi-page TIFFs `(P, H, W[, C])` slice by slice; a 3D model
predicts a multi-page TIFF as one volume `(D, H, W[, C])`. Intensities are normalised as in
training, `(x / scale − config.data.mean) / config.data.std`, where scale is the dtype's maximum
for integer images (255 for uint8, as in training) and 1 for float images (taken as [0, 1]).
Prediction uses the overlap-tile strategy with `config.data.crop_size` as the tile unless
`tile_size` is given (see unet_jax/inference.py).

Outputs in `output_dir`, per input `<stem>.<ext>`:
  <stem>_mask.png|tif         uint8 class ids (PNG for 2D PNG input, else TIFF, one page a slice)
  <stem>_probabilities.tif    float32 `(*spatial, C)` softmax probabilities
  <stem>_overlay.png          the image with classes tinted (visualize.PALETTE); stacks and
                              volumes get one `<stem>_overlay_<slice>.png` per slice
A file that cannot be read or has the wrong number of channels is skipped with a warning that
names it; the others are still predicted and the count of skipped files is reported at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from unet_jax import crf as crf_lib
from unet_jax import inference
from unet_jax import postprocess
from unet_jax import sharding
from unet_jax import tiling
from unet_jax import visualize
from unet_jax.models import build_model
from unet_jax.sources import DataError

log = logging.getLogger('unet_jax')

IMAGE_SUFFIXES = ('.png', '.tif', '.tiff')
CHECKPOINTS = ('best', 'latest')


@dataclasses.dataclass(frozen=True)
class Restored:
  """A trained model ready for inference: module, variables and the input it was trained on."""

  model: nn.Module
  variables: dict[str, Any]
  step: int
  spatial_rank: int
  input_channels: int


@dataclasses.dataclass
class Summary:
  """What `run` did: output files written, and (path, reason) of every skipped input."""

  step: int
  written: list[str] = dataclasses.field(default_factory=list)
  failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  predicted: int = 0


# Restoring a checkpoint for inference.


def _mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  # The devices of training; tile batches are split over all of them and the variables are
  # replicated (inference keeps no optimizer state, so there is little to gain from fsdp).
  return sharding.make_mesh(config.mesh.data, config.mesh.fsdp)


def _read_only_manager(config: ml_collections.ConfigDict, workdir: str) -> ocp.CheckpointManager:
  # Read-only and without clean-up, so that predicting from the workdir of a run that is still
  # training can never remove the checkpoint it is writing.
  metric = config.checkpoint.best_metric
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                         best_fn=lambda m: m[metric],
                                         best_mode=config.checkpoint.best_mode)
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory} does not exist; train into this workdir first')
  return ocp.CheckpointManager(directory, options=options, item_names=('state', 'data'))


def _select_step(manager: ocp.CheckpointManager, checkpoint: str | int) -> int:
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'no complete checkpoint in {manager.directory}')
  if checkpoint == 'latest':
    return manager.latest_step()
  if checkpoint == 'best':
    best = manager.best_step()
    if best is None:
      log.warning('no checkpoint in %s carries validation metrics; using the latest (step %d)',
                  manager.directory, manager.latest_step())
      return manager.latest_step()
    return best
  if str(checkpoint).isdigit() and int(checkpoint) in steps:
    return int(checkpoint)
  raise ValueError(f'checkpoint={checkpoint!r} is not one of {CHECKPOINTS} or a saved step '
                   f'{sorted(steps)}')


def _input_signature(model: nn.Module, params: Any, tile: int) -> tuple[int, int]:
  """(spatial rank, input channels) of the checkpoint's parameters for `model`.

  The rank is that of the convolution kernels; the channel count is read from the one
  parameter whose shape depends on the number of input channels.
  """
  kernels = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if 'kernel' in jax.tree_util.keystr(path)]
  if not kernels:
    raise ValueError('the checkpoint holds no kernels to infer the input layout from')
  rank = max(len(shape) for shape in kernels) - 2
  if rank not in (2, 3):
    raise ValueError(f'the checkpoint holds {len(max(kernels, key=len))}-dim kernels; expected a '
                     '2D or 3D model')
  shapes = [jax.eval_shape(model.init, jax.random.key(0),
                           jax.ShapeDtypeStruct((1, *(tile,) * rank, c), np.float32))['params']
            for c in (1, 2)]
  saved = {jax.tree_util.keystr(p): leaf.shape for p, leaf in
           jax.tree_util.tree_leaves_with_path(params)}
  for (path, one), two in zip(jax.tree_util.tree_leaves_with_path(shapes[0]),
                              jax.tree.leaves(shapes[1])):
    key = jax.tree_util.keystr(path)
    if one.shape != two.shape and key in saved:
      axis = next(i for i, (a, b) in enumerate(zip(one.shape, two.shape)) if a != b)
      return rank, int(saved[key][axis])
  return rank, 1


def restore(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str | int = 'best',
            mesh: jax.sharding.Mesh | None = None) -> Restored:
  """The model of `config` with the parameters of a checkpoint in `workdir/checkpoints`.

  Only the parameters (the EMA parameters when the run kept them), batch statistics and step
  are read, replicated over `mesh`; the optimizer state stays on disk.
  """
  mesh = mesh if mesh is not None else _mesh(config)
  manager = _read_only_manager(config, workdir)
  step = _select_step(manager, checkpoint)
  path = ocp.step.find_step_path(manager.directory, ocp.step.standard_name_format(), step=step)
  saved = ocp.PyTreeCheckpointHandler().metadata(path / 'state').tree
  keys = [k for k in ('params', 'batch_stats', 'ema_params', 'step') if saved.get(k)]
  replicated = sharding.replicated(mesh)
  target = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
                            saved[k], is_leaf=lambda m: hasattr(m, 'shape')) for k in keys}
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True)))['state']
  manager.close()

  model = build_model(config.model, num_classes=len(config.data.class_names))
  crop = config.data.crop_size  # a size the model takes, to trace its parameter shapes
  crop = int(crop) if isinstance(crop, (int, np.integer)) else int(crop[0])
  rank, channels = _input_signature(model, state['params'], crop)
  expected = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(
      (1, *(crop,) * rank, channels), np.float32))
  found = {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}
  want = {'params': expected['params'], 'batch_stats': expected.get('batch_stats', {})}
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
  if shapes(found) != shapes(want):
    raise ValueError(f'the checkpoint of step {step} in {workdir} does not fit config.model '
                     f'({dict(config.model)}); predict with the config it was trained with')
  variables = {'params': state.get('ema_params') or state['params']}
  if found['batch_stats']:
    variables['batch_stats'] = found['batch_stats']
  log.info('restored step %d (%s) from %s: %dD model, %d input channel(s)', step, checkpoint,
           manager.directory, rank, channels)
  return Restored(model, variables, step, rank, channels)


# Reading inputs.


def list_inputs(input_path: str) -> list[str]:
  """The image files named by `input_path`: the file itself or a folder's PNG/TIFF files."""
  if os.path.isdir(input_path):
    names = sorted(n for n in os.listdir(input_path) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
      raise FileNotFoundError(f'{input_path} holds no {"/".join(IMAGE_SUFFIXES)} files')
    return [os.path.join(input_path, n) for n in names]
  if not os.path.isfile(input_path):
    raise FileNotFoundError(f'input {input_path} is neither a file nor a folder')
  return [input_path]


def read_image(path: str) -> np.ndarray:
  """The raw array of a PNG (via Pillow) or TIFF (via tifffile); ValueError naming the file."""
  try:
    if path.lower().endswith(('.tif', '.tiff')):
      import tifffile  # pylint: disable=g-import-not-at-top
      array = tifffile.imread(path)
    else:
      from PIL import Image  # pylint: disable=g-import-not-at-top
      with Image.open(path) as image:
        array = np.asarray(image)
  except Exception as e:  # corrupt files raise many types
    raise DataError(f'{path} is not a readable image: {type(e).__name__}: {e}') from None
  if array.size == 0 or array.dtype.kind not in 'biuf':
    raise DataError(f'{path} holds no image data (shape {array.shape}, dtype {array.dtype})')
  if array.dtype.kind == 'f' and not np.isfinite(array).all():  # would predict NaN silently
    raise DataError(f'{path} has NaN or infinite values')
  return array


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


def normalize(array: np.ndarray, *, mean: Any, std: Any) -> np.ndarray:
  """Training's normalisation, `(x / scale − mean) / std`, with scale from the dtype."""
  scale = float(np.iinfo(array.dtype).max) if array.dtype.kind in 'iu' else 1.0
  x = array.astype(np.float32) / scale
  return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


# Writing outputs.


def _gray(raw: np.ndarray) -> np.ndarray:
  """A 2D view of one raw slice `(H, W, C)` for overlays and the CRF."""
  return raw.astype(np.float32).mean(-1)


def _write_outputs(stem: str, output_dir: str, raw: np.ndarray, classes: np.ndarray,
                   probabilities: np.ndarray, *, as_png: bool, write_probabilities: bool,
                   write_overlays: bool) -> list[str]:
  import tifffile  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  written = []
  mask_path = os.path.join(output_dir, f'{stem}_mask.{"png" if as_png else "tif"}')
  if as_png:
    Image.fromarray(classes[0]).save(mask_path)
  else:
    tifffile.imwrite(mask_path, classes if classes.shape[0] > 1 else classes[0],
                     photometric='minisblack')
  written.append(mask_path)
  if write_probabilities:
    path = os.path.join(output_dir, f'{stem}_probabilities.tif')
    tifffile.imwrite(path, probabilities if probabilities.shape[0] > 1 else probabilities[0],
                     photometric='minisblack')
    written.append(path)
  if write_overlays:
    # One overlay per 2D slice: images have one, stacks one per page, volumes one per z.
    raw_slices = raw.reshape(-1, *raw.shape[-3:])
    class_slices = classes.reshape(-1, *classes.shape[-2:])
    for i, (image, labels) in enumerate(zip(raw_slices, class_slices)):
      name = f'{stem}_overlay.png' if len(class_slices) == 1 else f'{stem}_overlay_{i:03d}.png'
      path = os.path.join(output_dir, name)
      Image.fromarray(visualize.overlay(_gray(image), labels)).save(path)
      written.append(path)
  return written


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
        progress: bool = True) -> Summary:
  """Predicts every image of `input_path` with the checkpoint of `workdir`; see the module doc.

  Args:
    config: the config the run was trained with (model, data normalisation, checkpoint metric).
    workdir: the training workdir (holds checkpoints/).
    input_path: a PNG/TIFF file or a folder of them.
    output_dir: created if missing.
    tta: test-time augmentation, one of inference.TTA_MODES.
    checkpoint: 'best' (by config.checkpoint.best_metric), 'latest' or a step number.
    tile_size: tile input size, one int or one per spatial dim (default config.data.crop_size).
    batch_size: tiles per device batch (default config.eval_batch_size).
    overlap, blend: tiling of SAME nets (inference.TiledPredictor).
    threshold: binary masks from the probability of class 1 (None: argmax).
    min_size, hole_size: remove components smaller than / fill holes up to this many pixels
      (postprocess.clean_classes; 0 disables).
    crf: refine 2D probabilities with the dense CRF (crf.crf_refine, default parameters).
    write_probabilities, write_overlays: which outputs besides the masks to write.
    progress: show a tqdm bar.

  Returns:
    A Summary; ValueError if every input failed.
  """
  if tta not in inference.TTA_MODES:
    raise ValueError(f'tta={tta!r} is not one of {inference.TTA_MODES}')
  paths = list_inputs(input_path)
  mesh = _mesh(config)
  restored = restore(config, workdir, checkpoint=checkpoint, mesh=mesh)
  tile = tile_size if tile_size is not None else config.data.crop_size
  geometry = tiling.geometry_for(restored.model)
  for size in (tile if isinstance(tile, (tuple, list)) else (tile,)):
    geometry.check_tile_size(size, field='tile_size' if tile_size is not None else
                             'tile_size (default config.data.crop_size)')
  predictor = inference.TiledPredictor.for_model(
      restored.model, restored.variables, geometry=geometry, tile_size=tile,
      batch_size=batch_size or config.eval_batch_size, overlap=overlap, blend=blend, mesh=mesh)
  chief = jax.process_index() == 0
  if chief:
    os.makedirs(output_dir, exist_ok=True)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  summary = Summary(step=restored.step)
  bar = tqdm(paths, unit='file', disable=not (progress and chief), dynamic_ncols=True)
  for path, stem in zip(bar, _stems(paths)):
    bar.set_postfix_str(os.path.basename(path))
    try:
      raw = as_samples(read_image(path), spatial_rank=restored.spatial_rank,
                       channels=restored.input_channels, path=path)
    except ValueError as e:
      log.warning('skipped: %s', e)
      summary.failed.append((path, str(e)))
      continue
    images = normalize(raw, mean=config.data.mean, std=config.data.std)
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
          write_probabilities=write_probabilities, write_overlays=write_overlays)
  bar.close()
  if summary.failed:
    log.warning('predicted %d file(s); skipped %d unreadable or unsuitable: %s',
                summary.predicted, len(summary.failed), ', '.join(p for p, _ in summary.failed))
  else:
    log.info('predicted %d file(s) into %s', summary.predicted, output_dir)
  if not summary.predicted:
    raise ValueError('no input could be predicted: ' + '; '.join(r for _, r in summary.failed))
  return summary


__all__ = ['Restored', 'Summary', 'as_samples', 'list_inputs', 'normalize', 'read_image',
           'restore', 'run']
