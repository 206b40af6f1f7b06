"""Whole-image prediction: mirror padding places output pixel i over image pixel i."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import inference
from unet_jax import transforms as T
from unet_jax.models import UNet, output_size, valid_input_sizes


@pytest.mark.parametrize('padding,depth', [('VALID', 2), ('VALID', 1), ('SAME', 2)])
def test_model_padding_makes_a_runnable_input_covering_the_image(padding, depth):
  for size in (5, 17, 40, 64):
    (before, after), = inference.model_padding((size,), depth=depth, padding=padding)
    padded = size + before + after
    assert output_size(padded, depth=depth, padding=padding) >= size
    if padding == 'VALID':
      assert before == (padded - output_size(padded, depth=depth, padding=padding)) // 2
    else:
      assert before == 0


def test_valid_net_output_lines_up_with_the_image():
  """Any valid sub-window of the padded image predicts the same pixels as the full pass."""
  model = UNet(num_classes=2, width=2, depth=2, padding='VALID')
  image = np.random.default_rng(0).normal(size=(1, 30, 26, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 44, 44, 1)))
  apply = lambda x: model.apply(variables, x)
  full = np.asarray(inference.predict_logits(apply, image, depth=2, padding='VALID'))
  assert full.shape == (1, 30, 26, 2)
  pads = inference.model_padding((30, 26), depth=2, padding='VALID')
  padded = T.mirror_pad(image, [(0, 0), *pads, (0, 0)])
  size = valid_input_sizes(depth=2, count=1)[0]
  out = output_size(size, depth=2, padding='VALID')
  border = (size - out) // 2
  # Pooling makes the net equivariant to shifts by multiples of 2**depth only.
  last = lambda extent: (extent - size) // 4 * 4
  for top, left in [(0, 0), (4, 8), (last(padded.shape[1]), last(padded.shape[2]))]:
    window = padded[:, top:top + size, left:left + size]
    local = np.asarray(apply(jnp.asarray(window)))
    r0, c0 = top + border - pads[0][0], left + border - pads[1][0]
    rows = [r for r in range(r0, r0 + out) if 0 <= r < 30]
    cols = [c for c in range(c0, c0 + out) if 0 <= c < 26]
    np.testing.assert_allclose(local[0, rows[0] - r0:rows[-1] - r0 + 1, cols[0] - c0:cols[-1] - c0 + 1],
                               full[0, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1],
                               rtol=1e-5, atol=1e-5)


def test_same_net_prediction_equals_a_plain_forward_pass():
  model = UNet(num_classes=3, width=2, depth=2, padding='SAME')
  image = np.random.default_rng(1).normal(size=(2, 32, 24, 1)).astype(np.float32)
  variables = model.init(jax.random.key(0), jnp.asarray(image))
  apply = lambda x: model.apply(variables, x)
  np.testing.assert_allclose(inference.predict_logits(apply, image, depth=2, padding='SAME'),
                             apply(jnp.asarray(image)), rtol=1e-6)
  probs = inference.probabilities(apply(jnp.asarray(image)))
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
