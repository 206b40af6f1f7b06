"""Spatial size arithmetic of the U-Net family: which input sizes a network takes, what it returns.

Sizes are per spatial dim; a 2D or 3D input is valid when every one of its dims is.

Two kinds of geometry cover every variant:

* `PoolingGeometry`: `depth` 2× max poolings. With padding 'SAME' the output has the input's size,
  which must be a multiple of 2**depth. With 'VALID' every conv block trims `block_trim` pixels
  (4 for two 3×3 convolutions, 6 for a MultiRes block), every skip path trims `skip_trims[level]`
  more (MultiResUNet's Res paths), each pooling needs an even size and each skip must be at least
  as large as the up-sampled map it is cropped to.
* `PatchGeometry`: a ViT encoder on non-overlapping patches (UNETR): the size must be a multiple
  of the patch size and the output has the input's size.

`SizeContract` turns a model's `geometry()` into the methods the trainer and the overlap-tile
inference use: `output_size`, `valid_input_size`, `valid_input_sizes` and `size_multiple`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

PADDINGS = ('SAME', 'VALID')

# Scans for valid sizes stop this many size_multiple() steps past where one must have appeared.
_SEARCH_STEPS = 4096


class _Geometry:
  """Shared search logic; subclasses define `_output_or_reason` and `size_multiple`."""

  def _output_or_reason(self, input_size: int) -> int | str:
    raise NotImplementedError

  def size_multiple(self) -> int:
    raise NotImplementedError

  def is_valid(self, input_size: int) -> bool:
    return isinstance(self._output_or_reason(input_size), int)

  def output_size(self, input_size: int) -> int:
    """The output size along one spatial dim; ValueError naming nearby valid sizes otherwise."""
    result = self._output_or_reason(input_size)
    if isinstance(result, str):
      raise ValueError(f'input size {input_size} {result}; nearby valid sizes: '
                       f'{self.nearby_valid_sizes(input_size)}')
    return result

  def valid_input_sizes(self, count: int = 5, start: int = 1) -> list[int]:
    """The first `count` valid input sizes ≥ `start`."""
    sizes, size = [], max(1, start)
    limit = size + _SEARCH_STEPS * self.size_multiple() * max(count, 1)
    while len(sizes) < count and size < limit:
      if self.is_valid(size):
        sizes.append(size)
      size += 1
    return sizes

  def nearby_valid_sizes(self, input_size: int, below: int = 2, above: int = 3) -> list[int]:
    """Up to `below` valid sizes under `input_size` and `above` valid sizes over it."""
    lower, size = [], input_size - 1
    while len(lower) < below and size > 0:
      if self.is_valid(size):
        lower.insert(0, size)
      size -= 1
    return lower + self.valid_input_sizes(above, start=input_size + 1)

  def valid_input_size(self, min_output: int) -> int:
    """The smallest valid input size whose output is at least `min_output` pixels."""
    size = max(1, min_output)  # no variant's output is larger than its input
    limit = size + _SEARCH_STEPS * self.size_multiple()
    while size < limit:
      result = self._output_or_reason(size)
      if isinstance(result, int) and result >= min_output:
        return size
      size += 1
    raise ValueError(f'no valid input size produces an output of {min_output} pixels')


@dataclasses.dataclass(frozen=True)
class PoolingGeometry(_Geometry):
  """Size arithmetic of an encoder–decoder with `depth` 2× poolings (see module docstring)."""

  depth: int
  padding: str
  block_trim: int = 4
  skip_trims: Sequence[int] = ()

  def __post_init__(self):
    if self.padding not in PADDINGS:
      raise ValueError(f'model.padding={self.padding!r} is not one of {PADDINGS}')
    if self.depth < 1:
      raise ValueError(f'model.depth={self.depth} must be ≥ 1')

  def size_multiple(self) -> int:
    return 2**self.depth

  def _output_or_reason(self, input_size: int) -> int | str:
    if self.padding == 'SAME':
      if input_size <= 0 or input_size % 2**self.depth:
        return (f'is not a positive multiple of 2**depth = {2**self.depth} '
                f'(padding=SAME, depth={self.depth})')
      return input_size
    context = f'(padding=VALID, depth={self.depth})'
    size, encoder_sizes = input_size, []
    for _ in range(self.depth):
      size -= self.block_trim
      if size <= 0:
        return f'is too small {context}'
      if size % 2:
        return f'is invalid {context}: max pooling would see the odd size {size}'
      encoder_sizes.append(size)
      size //= 2
    size -= self.block_trim
    if size <= 0:
      return f'is too small {context}'
    for level in reversed(range(self.depth)):
      size *= 2
      skip = encoder_sizes[level] - (self.skip_trims[level] if self.skip_trims else 0)
      if skip < size or (skip - size) % 2:
        return f'is invalid {context}: the level-{level} skip ({skip}) cannot be cropped to {size}'
      size -= self.block_trim
      if size <= 0:
        return f'is too small {context}'
    return size


@dataclasses.dataclass(frozen=True)
class PatchGeometry(_Geometry):
  """Size arithmetic of a ViT encoder on non-overlapping `patch_size` patches (UNETR)."""

  patch_size: int

  def size_multiple(self) -> int:
    return self.patch_size

  def _output_or_reason(self, input_size: int) -> int | str:
    if input_size <= 0 or input_size % self.patch_size:
      return f'is not a positive multiple of the patch size {self.patch_size}'
    return input_size


class SizeContract:
  """Size methods shared by every model class; the class defines `geometry()`.

  The trainer picks crop sizes with `valid_input_size`, the inference pads images to sizes
  `output_size` accepts and places overlapping tiles at multiples of `size_multiple()`, which keep
  the network translation-equivariant.
  """

  def geometry(self) -> PoolingGeometry | PatchGeometry:
    raise NotImplementedError

  def output_size(self, input_size: int) -> int:
    """Output size along one spatial dim; ValueError listing nearby valid sizes if invalid."""
    return self.geometry().output_size(input_size)

  def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
    """`output_size` of every spatial dim."""
    return tuple(self.output_size(s) for s in input_shape)

  def valid_input_size(self, min_output: int) -> int:
    """The smallest valid input size whose output is at least `min_output`."""
    return self.geometry().valid_input_size(min_output)

  def valid_input_sizes(self, count: int = 5, start: int = 1) -> list[int]:
    """The first `count` valid input sizes ≥ `start`."""
    return self.geometry().valid_input_sizes(count, start)

  def size_multiple(self) -> int:
    """Shifts of the input by multiples of this shift the output by the same amount."""
    return self.geometry().size_multiple()
