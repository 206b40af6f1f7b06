"""Export of a trained predictor as StableHLO, runnable without this project's model code.

The exported function maps a batch of normalised tiles `(N, *tile, C_in)` float32 to softmax
probabilities `(N, *out, C)` float32 (`out` = tile for SAME nets, smaller for VALID nets); the
parameters are baked in as constants and N is symbolic, so any batch size runs.

Files, for `save(exported, 'model.stablehlo')`:
  model.stablehlo        the StableHLO portable artifact (`Exported.mlir_module_serialized`),
                         readable by any StableHLO consumer
  model.stablehlo.json   signature and provenance: input/output shapes (the batch dim is named
                         'b'), dtypes, platforms, calling convention, and whatever metadata the
                         caller adds (tile geometry, normalisation, class names)

`load(path)` rebuilds a `jax.export.Exported` from the two with JAX alone; `.call(x)` runs it,
also inside `jax.jit`. The files do not depend on jax's own `Exported.serialize()` format (which
needs `flatbuffers`); with flatbuffers installed, `load(path).serialize()` gives that format.
"""

from __future__ import annotations

import dataclasses
import json

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import export as jax_export

from unet_jax import checkpointing
from unet_jax import storage
from unet_jax.datasets import images as image_files
from unet_jax.inference import tiled
from unet_jax.inference import tiling
from unet_jax.models import fast_conv
from unet_jax.models import whole_image

FORMAT = 'unet-jax-stablehlo/1'
BATCH = 'b'


def export_predictor(apply_fn: Callable[[Any, jax.Array], jax.Array], variables: Any, *,
                     tile_shape: Sequence[int], input_channels: int,
                     batch_size: int | None = None,
                     platforms: Sequence[str] | None = None) -> jax_export.Exported:
  """Exports `images → softmax(apply_fn(variables, images))` for tiles of `tile_shape`.

  Args:
    apply_fn: `(variables, images) → logits` (e.g. `model.apply` in inference mode).
    variables: baked into the exported module as constants.
    tile_shape: spatial shape of the input tiles.
    input_channels: channels of the input tiles.
    batch_size: a fixed batch size, or None for a symbolic one.
    platforms: e.g. ('cpu', 'cuda', 'tpu'); default: the platform of the default backend.
  """
  batch = jax_export.symbolic_shape(BATCH)[0] if batch_size is None else int(batch_size)
  spec = jax.ShapeDtypeStruct((batch, *tile_shape, input_channels), jnp.float32)
  variables = jax.device_get(variables)  # host constants: no device placement is exported

  def predict(images):
    return jax.nn.softmax(apply_fn(variables, images).astype(jnp.float32), axis=-1)

  return jax_export.export(jax.jit(predict),
                           platforms=tuple(platforms) if platforms else None)(spec)


def _shape_spec(aval: Any) -> list[int | str]:
  return [d if isinstance(d, int) else str(d) for d in aval.shape]


def save(exported: jax_export.Exported, path: str, *,
         metadata: dict[str, Any] | None = None) -> list[str]:
  """Writes the StableHLO artifact to `path` and its signature to `path + '.json'`."""
  if len(exported.in_avals) != 1 or len(exported.out_avals) != 1:
    raise ValueError('save() handles functions of one array to one array; got '
                     f'{len(exported.in_avals)} inputs and {len(exported.out_avals)} outputs')
  (inp,), (out,) = exported.in_avals, exported.out_avals
  record = {
      'format': FORMAT,
      'fun_name': exported.fun_name,
      'input': {'shape': _shape_spec(inp), 'dtype': str(inp.dtype)},
      'output': {'shape': _shape_spec(out), 'dtype': str(out.dtype)},
      'platforms': list(exported.platforms),
      'calling_convention_version': exported.calling_convention_version,
      'module_kept_var_idx': list(exported.module_kept_var_idx),
      'uses_global_constants': exported.uses_global_constants,
      'jax_version': jax.__version__,
      'metadata': metadata or {},
  }
  # The module first: a signature file never describes a module that is not there.
  storage.write_atomic(path, exported.mlir_module_serialized)
  storage.write_atomic(path + '.json', json.dumps(record, indent=2))
  return [path, path + '.json']


def read_signature(path: str) -> dict[str, Any]:
  record = json.loads(storage.read_text(path + '.json'))
  if record.get('format') != FORMAT:
    raise ValueError(f'{path}.json is not a {FORMAT} signature (format={record.get("format")!r})')
  return record


def load(path: str) -> jax_export.Exported:
  """The `jax.export.Exported` saved at `path`; call it with `.call(images)`.

  jax builds the calling wrapper of an Exported from its avals and trees; a stand-in function
  with the saved signature provides those for the running jax version, and the saved StableHLO
  module replaces the stand-in's.
  """
  record = read_signature(path)
  module = storage.read_bytes(path)
  spec_in, spec_out = record['input'], record['output']
  shape_in = jax_export.symbolic_shape(', '.join(str(d) for d in spec_in['shape']))
  fixed_out = tuple(spec_out['shape'][1:])
  if not all(isinstance(d, int) for d in fixed_out):
    raise ValueError(f'{path}: only the batch dim may be symbolic, got output {spec_out["shape"]}')
  out_dtype = np.dtype(spec_out['dtype'])
  stand_in = jax.jit(lambda x: jnp.zeros((x.shape[0], *fixed_out), out_dtype))
  template = jax_export.export(stand_in, platforms=tuple(record['platforms']))(
      jax.ShapeDtypeStruct(shape_in, np.dtype(spec_in['dtype'])))
  if _shape_spec(template.out_avals[0]) != spec_out['shape']:
    raise ValueError(f'{path}: the output shape {spec_out["shape"]} does not follow from the '
                     f'input shape {spec_in["shape"]}')
  return dataclasses.replace(
      template, fun_name=record['fun_name'], mlir_module_serialized=module,
      calling_convention_version=record['calling_convention_version'],
      module_kept_var_idx=tuple(record['module_kept_var_idx']),
      uses_global_constants=record['uses_global_constants'])


def run(config: ml_collections.ConfigDict, workdir: str, output_path: str, *,
        checkpoint: str | int = 'best', tile_size: int | Sequence[int] | None = None,
        batch_size: int | None = None, platforms: Sequence[str] | None = None) -> list[str]:
  """Exports the checkpoint of `workdir` for tiles of `tile_size` (default config.data.crop_size).

  The signature file records what a caller needs besides the module: tile and output shapes,
  the mirror border, the translation step for tile placement, normalisation and class names.
  """
  # Before the checkpoint is read and anything compiles.
  storage.check_writable(storage.parent(output_path), flag='--output')
  restored = checkpointing.restore_for_inference(config, workdir, checkpoint=checkpoint)
  tile = tile_size if tile_size is not None else config.data.crop_size
  try:
    tile_shape = whole_image.crop_shape(tile, restored.spatial_rank)
  except ValueError:
    raise ValueError(f'tile_size={tile!r} does not fit a {restored.spatial_rank}D model') from None
  geometry = tiling.geometry_for(restored.model)
  out_shape = [geometry.check_tile_size(t, field='tile_size') for t in tile_shape]
  model = restored.model
  # conv_impl='auto' must follow where the module will run, not this host, and an exported
  # module never holds the oneDNN custom calls (they exist only in a process that registered
  # them): a CPU export takes 'portable'.
  model = model.clone(conv_impl=fast_conv.impl_for_platforms(
      model.conv_impl, platforms or (jax.default_backend(),)))
  exported = export_predictor(tiled.model_apply_fn(model), restored.variables,
                              tile_shape=tile_shape, input_channels=restored.input_channels,
                              batch_size=batch_size, platforms=platforms)
  metadata = {
      'step': restored.step, 'tile_shape': list(tile_shape), 'output_shape': out_shape,
      'border': [(t - o) // 2 for t, o in zip(tile_shape, out_shape)],
      'size_multiple': geometry.size_multiple, 'mean': config.data.mean, 'std': config.data.std,
      'intensity_scaling': image_files.load_scaling(workdir).to_dict(),
      'class_names': list(config.data.class_names), 'model': dict(config.model),
  }
  return save(exported, output_path, metadata=json.loads(json.dumps(metadata, default=str)))


__all__ = ['FORMAT', 'export_predictor', 'load', 'read_signature', 'run', 'save']
