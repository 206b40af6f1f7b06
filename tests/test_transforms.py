"""Host augmentation: spec parsing, geometric ops against scipy references, alignment, crops."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from unet_jax.augment import geometric as G
from unet_jax.augment import intensity as I
from unet_jax.augment import transforms as T

FULL_SPEC = ('elastic(p=0.5, sigma=10, grid=3)|rotate(p=0.5, degrees=15)|scale(p=0.3, min=0.9, '
             'max=1.1)|flip|rot90|brightness(p=0.3, delta=0.1)|contrast(p=0.3, min=0.8, max=1.2)|'
             'gamma(p=0.3, min=0.8, max=1.25)|noise(p=0.3, std=0.03)|blur(p=0.2, sigma_max=1.0)')
ALWAYS_GEOMETRIC = ['elastic(p=1, sigma=4)', 'rotate(p=1, degrees=40)',
                    'scale(p=1, min=0.7, max=1.4)', 'shift(p=1, max=3.5)', 'flip(p=0.5)', 'rot90']


def _derived(shape, seed=0):
  """Every key derived from the image, so any misalignment between keys shows."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (*shape, 1), dtype=np.uint8)
  return {'image': image, 'label': (image[..., 0] > 127).astype(np.uint8),
          'weight': image[..., 0].astype(np.float32) * 0.5,
          'instances': (image[..., 0] // 64).astype(np.int32), 'id': 'keep'}


def _smooth(shape, seed=0, sigma=2.0):
  rng = np.random.default_rng(seed)
  x = ndi.gaussian_filter(rng.normal(size=shape), sigma, mode='wrap')
  return ((x - x.min()) / (x.max() - x.min()) * 255).astype(np.float32)


def _assert_aligned(out):
  raw = out['image'][..., 0]
  np.testing.assert_array_equal(out['label'], (raw > 127).astype(np.uint8))
  np.testing.assert_array_equal(out['weight'], raw.astype(np.float32) * 0.5)
  np.testing.assert_array_equal(out['instances'], raw // 64)
  assert out['id'] == 'keep'


def _one(spec):
  (op,) = T.parse_augment(spec)
  return op


# ---------------------------------------------------------------------------------------------
# The spec.


def test_spec_parses_into_op_dataclasses_in_order():
  ops = T.parse_augment(FULL_SPEC)
  assert [type(op) for op in ops] == [G.ElasticDeform, G.RandomRotate, G.RandomScale,
                                      G.RandomFlip, G.RandomRot90, I.Brightness, I.Contrast,
                                      I.Gamma, I.GaussianNoise, I.GaussianBlur]
  assert ops[0] == G.ElasticDeform(p=0.5, sigma=10, grid=3)
  assert ops[2] == G.RandomScale(p=0.3, min=0.9, max=1.1)
  assert ops[8] == I.GaussianNoise(p=0.3, std=0.03)
  assert T.parse_augment('') == T.parse_augment('  ') == ()
  assert T.parse_augment(" rotate(axis='random', p=1) | flip ")[0].axis == 'random'


@pytest.mark.parametrize('spec, fragments', [
    ('flip|elastc(p=0.5)', ["'elastc'", 'valid ops', 'elastic', 'rot90', 'blur']),
    ('rotate(deg=3)', ["'rotate'", "'deg'", 'degrees', 'axis']),
    ('rot90(p=1)', ["'rot90'", "'p'", 'none']),
    ('flip(0.5)', ['flip(0.5)', 'keyword']),
    ('rotate(p=x)', ['rotate(p=x)', 'literal']),
    ('flip|', ['cannot parse']),
    ('flip(p=2)', ['flip', 'p=2']),
    ('scale(min=1.2, max=0.9)', ['scale', 'min <= max']),
    ('elastic(grid=1)', ['elastic', 'grid=1']),
    ("rotate(axis='xy')", ['rotate', "'xy'"]),
    ('gamma(min=0, max=2)', ['gamma', '0 < min']),
])
def test_spec_errors_name_the_bad_part(spec, fragments):
  with pytest.raises(ValueError) as e:
    T.parse_augment(spec)
  assert 'config.data.augment' in str(e.value)
  for fragment in fragments:
    assert fragment in str(e.value)


def test_build_train_transforms_chains_pad_geometry_intensity_normalize():
  kw = dict(crop_size=(8, 8), border=2, mean=0.5, std=0.2)
  assert [type(op) for op in T.build_train_transforms('', **kw)] == [T.MirrorPad, T.RandomCrop,
                                                                      T.Normalize]
  assert type(T.build_train_transforms('gamma', crop='foreground', **kw)[1]) is T.ForegroundCrop
  chain = T.build_train_transforms('noise|rotate|gamma|flip', crop='foreground', order=3, **kw)
  assert [type(op) for op in chain] == [T.MirrorPad, G.GeometricAugment, I.ToUnitRange,
                                        I.GaussianNoise, I.Gamma, T.Normalize]
  fused = chain[1]
  assert [type(op) for op in fused.ops] == [G.RandomRotate, G.RandomFlip]
  assert (fused.size, fused.order, fused.foreground_p) == ((8, 8), 3, 0.5)
  assert chain[-1].scale == 1.0
  with pytest.raises(ValueError, match="config.data.crop='center'"):
    T.build_train_transforms('', crop='center', **kw)


def _run(chain, example, rng):
  for op in chain:
    example = op.random_map(example, rng) if hasattr(op, 'random_map') else op.map(example)
  return example


@pytest.mark.parametrize('shape, crop', [((20, 20), (12, 12)), ((6, 10, 10), (4, 8, 8))])
def test_full_chain_keeps_keys_aligned_and_normalises(shape, crop):
  spec = '|'.join(ALWAYS_GEOMETRIC)
  chain = T.build_train_transforms(spec, crop_size=crop, border=3, mean=0.5, std=0.2, order=0)
  rng = np.random.default_rng(0)
  for _ in range(4):
    out = _run(chain, _derived(shape), rng)
    assert out['image'].shape == (*crop, 1) and out['image'].dtype == np.float32
    assert out['label'].dtype == out['instances'].dtype == np.int32
    raw = np.round((out['image'][..., 0] * 0.2 + 0.5) * 255)
    np.testing.assert_array_equal(out['label'], raw > 127)
    np.testing.assert_array_equal(out['instances'], raw // 64)
    np.testing.assert_allclose(out['weight'], raw * 0.5, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Geometric ops.


@pytest.mark.parametrize('spec', ALWAYS_GEOMETRIC + ["rotate(p=1, axis='random', degrees=60)"])
@pytest.mark.parametrize('shape', [(16, 16), (6, 10, 10)])
def test_each_geometric_op_moves_every_key_alike(spec, shape):
  fused = G.GeometricAugment((_one(spec),), order=0)  # nearest everywhere: exact comparison
  example = _derived(shape)
  changed = False
  for seed in range(3):
    out = fused.random_map(example, np.random.default_rng(seed))
    assert out['image'].shape == example['image'].shape
    _assert_aligned(out)
    changed |= not np.array_equal(out['image'], example['image'])
  assert changed


@pytest.mark.parametrize('shape', [(32, 32), (12, 24, 24)])
@pytest.mark.parametrize('order', [1, 3])
def test_interpolated_image_stays_aligned_with_nearest_labels(shape, order):
  image = _smooth(shape, sigma=4.0)
  threshold = np.median(image)
  example = {'image': image[..., None], 'label': (image > threshold).astype(np.int32)}
  fused = G.GeometricAugment(T.parse_augment('|'.join(ALWAYS_GEOMETRIC)), order=order)
  for seed in range(3):
    out = fused.random_map(example, np.random.default_rng(seed))
    derived = out['image'][..., 0] > threshold
    mismatch = np.mean(out['label'] != derived)
    # Nearest and interpolated sampling may disagree near the contour (< half a pixel of
    # drift), clearly less than a label one pixel off would.
    assert mismatch < 0.06
    assert mismatch < 0.6 * np.mean(np.roll(out['label'], 1, axis=-1) != derived)


@pytest.mark.parametrize('spec', ['elastic(p=1, sigma=0)', 'rotate(p=1, degrees=0)',
                                  'scale(p=1, min=1, max=1)', 'shift(p=1, max=0)',
                                  "rotate(p=1, degrees=0, axis='random')"])
@pytest.mark.parametrize('order', [1, 3])
def test_zero_strength_ops_are_identities(spec, order):
  for shape in [(12, 14), (5, 8, 9)]:
    image = _smooth(shape)[..., None]
    example = {'image': image, 'label': (image[..., 0] > 100).astype(np.int32),
               'weight': image[..., 0] + 1}
    out = G.GeometricAugment((_one(spec),), order=order).random_map(
        example, np.random.default_rng(0))
    np.testing.assert_allclose(out['image'], image, atol=1e-3)
    np.testing.assert_allclose(out['weight'], example['weight'], atol=1e-3)
    np.testing.assert_array_equal(out['label'], example['label'])


def test_rotation_by_90_degrees_equals_np_rot90():
  rotate = G.RandomRotate(p=1.0, degrees=90)
  for shape in [(10, 10), (4, 10, 10)]:
    image = _smooth(shape)
    example = {'image': image[..., None], 'label': np.zeros(shape, np.int32)}
    for u1, turns in [(1.0, 1), (0.0, -1)]:  # angle = (2 u1 - 1) · degrees
      out = G.GeometricAugment((rotate,)).apply(example, [(np.array([0.0, u1]), np.zeros(0))])
      np.testing.assert_allclose(out['image'][..., 0], np.rot90(image, turns, axes=(-2, -1)),
                                 atol=1e-3)
  for k in range(4):  # rot90 draws k = floor(4 u)
    out = G.GeometricAugment((G.RandomRot90(),)).apply(example, [(np.array([k / 4 + 0.1]), [])])
    np.testing.assert_array_equal(out['image'][..., 0], np.rot90(image, k, axes=(1, 2)))


def _apply(op, image, u, z=()):
  example = {'image': image[..., None], 'label': np.zeros(image.shape, np.int32)}
  return G.GeometricAugment((op,)).apply(example, [(np.asarray(u), np.asarray(z))])['image'][..., 0]


def test_affine_ops_match_scipy():
  image = _smooth((24, 30))
  centre = (np.array(image.shape) - 1) / 2
  # rotate: angle = (2 u1 - 1) · degrees; scipy turns the same way (ndi.rotate(x, 90) == rot90).
  out = _apply(G.RandomRotate(p=1, degrees=40), image, [0.0, 0.8])
  expected = ndi.rotate(image, 0.6 * 40, reshape=False, order=1, mode='mirror')
  np.testing.assert_allclose(out, expected, atol=1e-3)
  # scale: factor = min + u1 (max - min); > 1 magnifies about the centre.
  out = _apply(G.RandomScale(p=1, min=1.0, max=2.0), image, [0.0, 0.25])
  expected = ndi.affine_transform(image, np.eye(2) / 1.25, offset=centre - centre / 1.25,
                                  order=1, mode='mirror')
  np.testing.assert_allclose(out, expected, atol=1e-3)
  # shift: by (2 u - 1) · max along each axis, like ndi.shift.
  out = _apply(G.RandomShift(p=1, max=4), image, [0.0, 0.9, 0.2])
  expected = ndi.shift(image, [0.8 * 4, -0.6 * 4], order=1, mode='mirror')
  np.testing.assert_allclose(out, expected, atol=1e-3)


def test_random_axis_rotation_matches_scipy_rotation():
  volume = _smooth((12, 14, 16))
  # angle = (2 u1 - 1)·degrees; the axis has polar cos θ = 2 u2 - 1 and azimuth φ = 2π u3.
  u = np.array([0.0, 0.9, 0.3, 0.7])
  cos_t, phi = 2 * u[2] - 1, 2 * np.pi * u[3]
  axis = np.array([np.sqrt(1 - cos_t**2) * np.cos(phi), np.sqrt(1 - cos_t**2) * np.sin(phi),
                   cos_t])
  angle = np.deg2rad(0.8 * 50)
  out = _apply(G.RandomRotate(p=1, degrees=50, axis='random'), volume, u)
  backward = Rotation.from_rotvec(-angle * axis).as_matrix()
  centre = (np.array(volume.shape) - 1) / 2
  expected = ndi.affine_transform(volume, backward, offset=centre - backward @ centre, order=1,
                                  mode='mirror')
  np.testing.assert_allclose(out, expected, atol=1e-3)


@pytest.mark.parametrize('shape', [(20, 26), (7, 9, 11)])
def test_elastic_field_is_a_cubic_spline_through_the_coarse_grid(shape):
  image = _smooth(shape)
  grid, sigma, rank = 3, 2.0, len(shape)
  z = np.random.default_rng(1).normal(size=rank * grid**rank)
  out = _apply(G.ElasticDeform(p=1, sigma=sigma, grid=grid), image, [0.0], z)
  # Reference: each displacement component interpolated directly by scipy's nD cubic spline
  # from the coarse grid whose nodes span the output tile.
  coarse = z.reshape((rank,) + (grid,) * rank) * sigma
  nodes = np.meshgrid(*[np.linspace(0, grid - 1, n) for n in shape], indexing='ij')
  field = np.stack([ndi.map_coordinates(c, nodes, order=3, mode='mirror') for c in coarse])
  pixels = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'))
  expected = ndi.map_coordinates(image, pixels + field, order=1, mode='mirror')
  np.testing.assert_allclose(out, expected, atol=1e-3)
  assert np.abs(field).max() > 1.0 and not np.allclose(out, image, atol=1.0)


def test_paper_elastic_defaults():
  assert G.ElasticDeform() == G.ElasticDeform(p=0.5, sigma=10.0, grid=3)
  matrix = G.cubic_upsample_matrix(3, 9)
  np.testing.assert_allclose(matrix[[0, 4, 8]], np.eye(3), atol=1e-12)  # passes through nodes
  np.testing.assert_allclose(matrix.sum(1), 1.0, atol=1e-12)  # a constant field stays constant


# ---------------------------------------------------------------------------------------------
# Crops.


def test_fused_crop_resamples_the_source_at_the_crop_coordinates():
  image = _smooth((30, 34))
  example = {'image': image[..., None], 'label': np.zeros(image.shape, np.int32)}
  size, start = (12, 16), (5, 11)
  out = G.GeometricAugment((G.RandomRotate(p=1, degrees=30),), size=size).apply(
      example, [(np.array([0.0, 0.75]), np.zeros(0))], start=start)
  # Reference: rotate the whole image about the crop's centre, then crop.
  angle = np.deg2rad(0.5 * 30)
  backward = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
  c_out = (np.array(size) - 1) / 2
  c_src = np.array(start) + c_out
  expected = ndi.affine_transform(image, backward, offset=c_src - backward @ c_out,
                                  output_shape=size, order=1, mode='mirror')
  np.testing.assert_allclose(out['image'][..., 0], expected, atol=1e-3)


def test_flips_and_turns_of_a_crop_are_exact_views_of_the_source():
  example = _derived((20, 20))
  fused = G.GeometricAugment((G.RandomFlip(), G.RandomRot90()), size=(9, 9))
  windows = {np.rot90(np.flip(example['image'][i:i + 9, j:j + 9, 0], a) if a is not None
                      else example['image'][i:i + 9, j:j + 9, 0], k).tobytes()
             for i in range(12) for j in range(12) for a in (None, 0, 1, (0, 1)) for k in range(4)}
  for seed in range(10):
    out = fused.random_map(example, np.random.default_rng(seed))
    assert out['image'].dtype == np.uint8 and out['image'][..., 0].tobytes() in windows
    _assert_aligned(out)


def test_reads_beyond_the_source_mirror_like_mirror_pad():
  image = _smooth((10, 12))
  example = {'image': image[..., None], 'label': np.zeros(image.shape, np.int32)}
  # elastic with sigma 0 forces the interpolating path; shift by (-4, +3) reads outside.
  ops = (G.ElasticDeform(p=1, sigma=0), G.RandomShift(p=1, max=4))
  out = G.GeometricAugment(ops).apply(example, [([0.0], np.zeros(18)), ([0.0, 0.0, 0.875], [])])
  padded = np.pad(image, 4, mode='reflect')
  np.testing.assert_allclose(out['image'][..., 0], padded[8:18, 1:13], atol=1e-3)
  assert T.MirrorPad(4).map(example)['image'][..., 0].tolist() == padded.tolist()


@pytest.mark.parametrize('make', [
    lambda p: T.ForegroundCrop((6, 6), foreground_class=2, p=p),
    lambda p: G.GeometricAugment((G.RandomFlip(),), size=(6, 6), foreground_class=2,
                                 foreground_p=p),
])
def test_foreground_crop_centres_on_the_foreground_class(make):
  label = np.zeros((40, 40), np.int32)
  label[3, 35] = 2  # one foreground pixel near a corner
  label[20, 20] = 1  # another class
  example = {'image': label[..., None].astype(np.uint8), 'label': label}
  hits = lambda p: [(make(p).random_map(example, np.random.default_rng(s))['label'] == 2).any()
                    for s in range(30)]
  assert all(hits(1.0))
  assert sum(hits(0.0)) < 10  # a uniform 6×6 crop of 40×40 rarely holds the pixel
  assert 5 < sum(hits(0.5)) < 30
  empty = {'image': example['image'], 'label': np.zeros_like(label)}
  assert make(1.0).random_map(empty, np.random.default_rng(0))['label'].shape == (6, 6)


def test_crop_that_does_not_fit_names_the_config_field():
  with pytest.raises(ValueError, match='config.data.crop_size'):
    G.GeometricAugment((G.RandomFlip(),), size=(30, 8)).random_map(
        _derived((20, 20)), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# Intensity ops (on the image in [0, 1]).


def _unit_example(shape=(48, 48)):
  image = 0.3 + 0.4 * _smooth(shape)[..., None] / 255  # inside [0.3, 0.7]: nothing clips
  return {'image': image.astype(np.float32), 'label': np.ones(shape, np.int32),
          'weight': np.full(shape, 2.0, np.float32)}


def _intensity(op, example, seed=0):
  out = op.random_map(example, np.random.default_rng(seed))
  for key in ('label', 'weight'):
    if key in example:
      np.testing.assert_array_equal(out[key], example[key])
  assert out['image'].dtype == np.float32 and out['image'].shape == example['image'].shape
  return example['image'].astype(np.float64), out['image'].astype(np.float64)


def test_brightness_contrast_gamma_follow_their_formulas():
  example = _unit_example()
  offsets, factors, gammas = set(), set(), set()
  for seed in range(4):
    x, y = _intensity(I.Brightness(p=1, delta=0.2), example, seed)
    offset = (y - x).mean()
    np.testing.assert_allclose(y - x, offset, atol=1e-6)
    assert -0.2 <= offset <= 0.2
    offsets.add(round(offset, 6))
    x, y = _intensity(I.Contrast(p=1, min=0.5, max=1.5), example, seed)
    factor = np.std(y) / np.std(x)
    np.testing.assert_allclose(y - x.mean(), factor * (x - x.mean()), atol=1e-5)
    assert 0.5 <= factor <= 1.5
    factors.add(round(factor, 6))
    x, y = _intensity(I.Gamma(p=1, min=0.5, max=2.0), example, seed)
    exponent = np.median(np.log(y) / np.log(x))
    np.testing.assert_allclose(y, x**exponent, atol=1e-5)
    assert 0.5 <= exponent <= 2.0
    gammas.add(round(exponent, 6))
  assert min(len(offsets), len(factors), len(gammas)) == 4  # drawn per example
  bright = {'image': np.full((4, 4, 1), 0.95, np.float32), 'label': np.zeros((4, 4), np.int32)}
  assert _intensity(I.Brightness(p=1, delta=0.5), bright, seed=1)[1].max() <= 1.0


def test_noise_and_blur():
  example = _unit_example((64, 64))
  x, y = _intensity(I.GaussianNoise(p=1, std=0.1), example)
  assert abs(np.std(y - x) - 0.1) < 0.01 and abs(np.mean(y - x)) < 0.01
  for shape in [(20, 24), (6, 10, 12)]:
    example = _unit_example(shape)
    x, y = _intensity(I.GaussianBlur(p=1, sigma_min=1.5, sigma_max=1.5), example)
    expected = ndi.gaussian_filter(x, [1.5] * len(shape) + [0], mode='mirror', truncate=4.0)
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_intensity_ops_with_p_zero_and_the_unit_range_round_trip():
  example = _unit_example()
  for op in T.parse_augment('brightness(p=0)|contrast(p=0)|gamma(p=0)|noise(p=0)|blur(p=0)'):
    assert op.random_map(example, np.random.default_rng(0)) is example
  raw = _derived((6, 6))
  direct = T.Normalize(0.5, 0.2).map(raw)
  via_unit = T.Normalize(0.5, 0.2, scale=1.0).map(I.ToUnitRange().map(raw))
  np.testing.assert_allclose(via_unit['image'], direct['image'], atol=1e-6)
  assert direct['instances'].dtype == np.int32 and direct['weight'].dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Determinism and the benchmark helper.


def test_same_seed_same_output_and_seeds_differ():
  chain = T.build_train_transforms(FULL_SPEC, crop_size=(16, 16),
                                   border=4, mean=0.5, std=0.2, crop='foreground')
  example = _derived((24, 24))
  a = _run(chain, example, np.random.default_rng(3))
  b = _run(chain, example, np.random.default_rng(3))
  c = _run(chain, example, np.random.default_rng(4))
  for key in ('image', 'label', 'weight', 'instances'):
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a['image'], c['image'])
