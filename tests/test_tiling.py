"""Tile placement: exact coverage, alignment with the image, the equivariance lattice, errors."""


import numpy as np
import pytest

from unet_jax.inference import tiling
from unet_jax.models import UNet

from unet_sizes import output_size, valid_input_size


def _unet_geometry(depth, padding):
  return tiling.geometry_for(UNet(depth=depth, padding=padding))


CASES = [
    # (spatial shape, tile size, depth, padding, overlap)
    ((45, 50), 60, 2, 'VALID', 0.0),    # larger than one tile's output
    ((7, 5), 52, 2, 'VALID', 0.0),      # smaller than the border the net trims
    ((20, 20), 60, 2, 'VALID', 0.0),    # exactly one output
    ((100, 33), 572, 4, 'VALID', 0.0),  # the paper's tile
    ((30, 17, 9), 48, 2, 'VALID', 0.0),
    ((37, 50), 16, 2, 'SAME', 0.5),
    ((16, 16), 16, 2, 'SAME', 0.25),
    ((5, 70), 16, 2, 'SAME', 0.0),
    ((21, 19, 6), 8, 1, 'SAME', 0.3),
]


@pytest.mark.parametrize('shape,tile,depth,padding,overlap', CASES)
def test_tiles_cover_every_pixel_and_line_up_with_the_image(shape, tile, depth, padding, overlap):
  geometry = _unet_geometry(depth, padding)
  plan = tiling.plan_tiles(shape, (tile,) * len(shape), geometry, overlap=overlap)
  out = output_size(tile, depth=depth, padding=padding)
  assert plan.output_shape == (out,) * len(shape)
  assert plan.blended == (padding == 'SAME')
  padded_shape = [s + b + a for s, (b, a) in zip(shape, plan.pads)]
  count = np.zeros(shape, np.int64)
  for t in plan.tiles():
    count[t.destination] += 1
    for axis, (window, source, dest) in enumerate(zip(t.input, t.source, t.destination)):
      assert 0 <= window.start and window.stop <= padded_shape[axis]
      assert window.stop - window.start == tile
      # The lattice on which a pooling net is translation-equivariant.
      assert window.start % 2**depth == 0
      assert 0 <= source.start <= source.stop <= out
      assert source.stop - source.start == dest.stop - dest.start > 0
      # Output pixel j of a tile lies over padded pixel start + border + j, i.e. image pixel
      # start + border + j - pad_before.
      border = (tile - out) // 2
      assert window.start + border + source.start - plan.pads[axis][0] == dest.start
  if padding == 'VALID':
    np.testing.assert_array_equal(count, 1)  # every pixel written by exactly one tile
  else:
    assert count.min() >= 1
  assert len(plan.tiles()) == len(plan) == np.prod(plan.grid)


def test_valid_stride_is_the_largest_lattice_step_within_the_output():
  plan = tiling.plan_tiles((2048, 2048), (572, 572), _unet_geometry(4, 'VALID'))
  axis = plan.axes[0]
  assert (axis.out, axis.border, axis.stride) == (388, 92, 384)
  assert axis.starts == tuple(range(0, 6 * 384, 384))  # 6 tiles cover 2048
  assert axis.starts[-1] + axis.out >= 2048 > axis.starts[-2] + axis.out


def test_same_overlap_sets_the_stride():
  geometry = _unet_geometry(2, 'SAME')
  strides = [tiling.plan_tiles((100,), (16,), geometry, overlap=o).axes[0].stride
             for o in (0.0, 0.25, 0.5, 0.9)]
  assert strides == [16, 12, 8, 4]  # multiples of 2**depth, at least one step


def test_padded_image_is_the_mirror_extrapolation():
  image = np.arange(7 * 5, dtype=np.float32).reshape(7, 5, 1)
  plan = tiling.plan_tiles((7, 5), (52, 52), _unet_geometry(2, 'VALID'))
  padded = plan.pad_image(image)
  (top, _), (left, _) = plan.pads
  np.testing.assert_array_equal(padded[top:top + 7, left:left + 5], image)
  # Reflection about the first row/column, continued periodically with period 2 (n - 1).
  rows = np.arange(padded.shape[0]) - top
  period = 2 * (7 - 1)
  folded = np.abs((rows + period * 100) % period)
  folded = np.where(folded >= 7, period - folded, folded)
  np.testing.assert_array_equal(padded[:, left, 0], image[folded, 0, 0])


def test_invalid_tile_size_lists_valid_sizes():
  geometry = _unet_geometry(2, 'VALID')
  with pytest.raises(ValueError, match='valid .*sizes') as info:
    tiling.plan_tiles((64, 64), (50, 50), geometry)
  listed = [int(s) for s in str(info.value).split('[')[-1].rstrip(']').split(',')]
  assert 48 in listed and 52 in listed
  for size in listed:
    output_size(size, depth=2, padding='VALID')  # each listed size really runs
  with pytest.raises(ValueError, match='valid .*sizes.*24'):
    tiling.plan_tiles((64, 64), (26, 26), _unet_geometry(2, 'SAME'))
  with pytest.raises(ValueError, match='translation step'):
    tiling.plan_tiles((64,), (188,), _unet_geometry(4, 'VALID'))  # 4 output pixels < 16
  with pytest.raises(ValueError, match='overlap'):
    tiling.plan_tiles((64,), (16,), _unet_geometry(2, 'SAME'), overlap=1.0)


def test_geometry_prefers_the_model_methods():
  class Model:
    depth, padding = 3, 'VALID'

    def output_size(self, size):
      return size - 10

    def valid_input_size(self, min_output):
      return min_output + 10

    def size_multiple(self):
      return 2

  geometry = tiling.geometry_for(Model())
  assert (geometry.output_size(30), geometry.valid_input_size(5), geometry.size_multiple) == \
      (20, 15, 2)
  fallback = _unet_geometry(3, 'VALID')
  assert fallback.output_size(548) == output_size(
      548, depth=3, padding='VALID')
  assert fallback.valid_input_size(100) == valid_input_size(100, depth=3, padding='VALID')
  assert fallback.size_multiple == 8
  with pytest.raises(ValueError, match='TileGeometry'):
    tiling.geometry_for(object())


def test_geometry_of_the_unet_matches_its_size_arithmetic():
  for depth, padding, sizes in [(2, 'VALID', (44, 48, 60, 572)), (3, 'SAME', (8, 16, 24))]:
    geometry = tiling.geometry_for(UNet(depth=depth, padding=padding))
    assert geometry.size_multiple == 2**depth
    for size in sizes:
      out = output_size(size, depth=depth, padding=padding)
      assert geometry.output_size(size) == out
      assert geometry.valid_input_size(out) == valid_input_size(out, depth=depth,
                                                                      padding=padding)
    with pytest.raises(ValueError):
      geometry.output_size(sizes[0] + 2)


def test_blend_weights():
  weights = tiling.blend_weights((9, 12), 'gaussian')
  assert weights.shape == (9, 12) and weights.dtype == np.float32
  assert weights.max() == pytest.approx(1.0, abs=1e-3) and weights.min() >= 1e-3
  np.testing.assert_allclose(weights, weights[::-1, ::-1], rtol=1e-6)
  x = np.arange(12) - 5.5
  expected_row = np.exp(-0.5 * (x / (0.125 * 12))**2)
  np.testing.assert_allclose(weights[4] / weights[4].max(),
                             np.maximum(expected_row / expected_row.max(), 1e-3), rtol=1e-5)
  np.testing.assert_array_equal(tiling.blend_weights((4, 3, 2), 'constant'), 1.0)
  with pytest.raises(ValueError, match='gaussian'):
    tiling.blend_weights((4,), 'cosine')
