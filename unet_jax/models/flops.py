"""The model's own FLOP count: multiply-adds of its convolutions and matrix products, ×2.

Counted from the equations of one forward pass (`jax.make_jaxpr` on abstract inputs, so nothing
runs), which makes it the same count for every variant of the family and independent of what a
compiler fuses, rematerialises or pads. Element-wise work (activations, norms, softmax) is left
out, as FLOP counts of convolutional networks usually do. A training step is counted as 3×
the forward pass (forward, input gradient, kernel gradient), the convention of MFU figures.

  forward_flops(model, variables, (8, 572, 572, 1))  # one forward pass of 8 images
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

TRAIN_FLOPS_PER_FORWARD = 3


def _conv_flops(eqn: Any) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  dims = eqn.params['dimension_numbers']
  # rhs_spec = (out feature dim, in feature dim, *spatial dims)
  kernel_in = rhs.shape[dims.rhs_spec[1]]
  kernel_spatial = math.prod(rhs.shape[d] for d in dims.rhs_spec[2:])
  # A transposed convolution is a convolution of the input dilated with zeros: of the kernel's
  # taps, only 1 in prod(lhs_dilation) meets a real pixel.
  dilation = math.prod(eqn.params.get('lhs_dilation') or (1,))
  del lhs
  return 2 * math.prod(out.shape) * kernel_in * kernel_spatial // dilation


def _dot_flops(eqn: Any) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  contracted = math.prod(lhs.shape[d] for d in lhs_contract)
  del rhs
  return 2 * math.prod(eqn.outvars[0].aval.shape) * contracted


_COUNTERS = {'conv_general_dilated': _conv_flops, 'dot_general': _dot_flops}


def jaxpr_flops(jaxpr: Any) -> int:
  """Convolution and matrix-product FLOPs of a (closed) jaxpr, inner jaxprs included."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    counter = _COUNTERS.get(eqn.primitive.name)
    if counter is not None:
      total += counter(eqn)
      continue
    repeats = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
    for sub in jax_core.jaxprs_in_params(eqn.params):
      total += repeats * jaxpr_flops(sub)
  return total


def forward_flops(model: Any, variables: Any, input_shape: Sequence[int],
                  dtype: Any = jnp.float32) -> int:
  """FLOPs of `model.apply(variables, x, train=False)` for x of `input_shape` (N, *spatial, C).

  `variables` may be abstract (`jax.ShapeDtypeStruct`s), as from `jax.eval_shape`.
  """
  images = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images)
  return jaxpr_flops(jaxpr)
