"""Model constructors, chosen by `config.model.name` from one explicit table."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from unet_jax.models.unet import UNet, output_shape, output_size, valid_input_size, valid_input_sizes

MODELS: dict[str, Callable[..., nn.Module]] = {
    'unet': UNet,
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def build_model(model_config: Any, *, num_classes: int) -> nn.Module:
  """Builds the model named by `model_config.name`; every other field is a constructor kwarg."""
  kwargs = dict(model_config)
  name = kwargs.pop('name')
  if name not in MODELS:
    raise ValueError(f'config.model.name={name!r} is not one of {sorted(MODELS)}')
  dtype = kwargs.pop('dtype', 'float32')
  if dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={dtype!r} is not one of {sorted(DTYPES)}')
  constructor = MODELS[name]
  unknown = set(kwargs) - set(constructor.__dataclass_fields__)
  if unknown:
    raise ValueError(f'config.model has fields {sorted(unknown)} that {name!r} does not take')
  return constructor(num_classes=num_classes, dtype=DTYPES[dtype], **kwargs)


__all__ = ['MODELS', 'UNet', 'build_model', 'output_shape', 'output_size', 'valid_input_size',
           'valid_input_sizes']
