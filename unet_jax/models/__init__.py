"""Model constructors, chosen by `config.model.name` from one explicit table.

| name             | class          | module            |
| ---------------- | -------------- | ----------------- |
| 'unet'           | UNet           | unet.py           |
| 'attention_unet' | AttentionUNet  | attention_unet.py |
| 'unet_plus_plus' | UNetPlusPlus   | unet_plus_plus.py |
| 'res_unet'       | ResUNet        | res_unet.py       |
| 'multires_unet'  | MultiResUNet   | multires_unet.py  |
| 'unetr'          | UNETR          | unetr.py          |

Every class takes 2D (N, H, W, C) or 3D (N, D, H, W, C) input and has the size methods
`output_size`, `valid_input_size`, `valid_input_sizes` and `size_multiple` (see sizes.py);
whole_image.py turns them into crop sizes, mirror padding and the final head.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from unet_jax.models import fast_conv
from unet_jax.models.attention_unet import AttentionUNet
from unet_jax.models.multires_unet import MultiResUNet
from unet_jax.models.res_unet import ResUNet
from unet_jax.models.unet import UNet
from unet_jax.models.unet_plus_plus import UNetPlusPlus
from unet_jax.models.unetr import UNETR

MODELS: dict[str, Callable[..., nn.Module]] = {
    'unet': UNet,
    'attention_unet': AttentionUNet,
    'unet_plus_plus': UNetPlusPlus,
    'res_unet': ResUNet,
    'multires_unet': MultiResUNet,
    'unetr': UNETR,
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def model_options(name: str) -> set[str]:
  """The config.model fields the variant `name` takes (its dataclass fields but the wiring)."""
  return set(MODELS[name].__dataclass_fields__) - {'parent', 'name', 'num_classes'}


def build_model(model_config: Any, *, num_classes: int,
                platforms: Sequence[str] | None = None) -> nn.Module:
  """Builds the model named by `model_config.name`; every other field is a constructor kwarg.

  `platforms`: where the program will run when that is not this host's backend (ahead-of-time
  compiles, exports); conv_impl='auto' then follows them (fast_conv.impl_for_platforms).
  """
  kwargs = dict(model_config)
  name = kwargs.pop('name')
  if name not in MODELS:
    raise ValueError(f'config.model.name={name!r} is not one of {sorted(MODELS)}')
  # Options of one variant live in a sub-config named after it (config.model.unetr.hidden_size);
  # the sub-configs of the other variants are not this model's business.
  per_model = {k: kwargs.pop(k) for k in list(kwargs) if k in MODELS}
  kwargs.update(dict(per_model.get(name) or {}))
  dtype = kwargs.pop('dtype', 'float32')
  if dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={dtype!r} is not one of {sorted(DTYPES)}')
  if platforms is not None and 'conv_impl' in kwargs:
    kwargs['conv_impl'] = fast_conv.impl_for_platforms(kwargs['conv_impl'], platforms)
  constructor = MODELS[name]
  fields = model_options(name)
  unknown = set(kwargs) - fields
  if unknown:
    raise ValueError(f'config.model has fields {sorted(unknown)} that {name!r} does not take; '
                     f'it takes {sorted(fields | {"dtype"})}')
  return constructor(num_classes=num_classes, dtype=DTYPES[dtype], **kwargs)


__all__ = ['DTYPES', 'MODELS', 'AttentionUNet', 'MultiResUNet', 'ResUNet', 'UNETR', 'UNet',
           'UNetPlusPlus', 'build_model', 'model_options']
