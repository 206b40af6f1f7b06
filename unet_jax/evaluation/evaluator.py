"""Evaluation: exact scores over a whole split, for the training loop and for `--mode=eval`.

Scores come from one confusion matrix accumulated over every pixel of the split (Dice, IoU,
precision, recall, pixel accuracy), so they are set-level numbers, not averages of batch
averages. Whole images are mirror-padded for the model (models/whole_image.py), so a VALID
net is scored on every pixel too.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from unet_jax.evaluation import distance_metrics
from unet_jax.evaluation import isbi_metrics
from unet_jax.datasets import pipeline
from unet_jax.datasets.dataset import IGNORE_LABEL, Dataset
from unet_jax.evaluation import metrics as metrics_lib
from unet_jax import sharding
from unet_jax.models import whole_image


def eval_variables(state: Any) -> dict[str, Any]:
  """Parameters to evaluate: the EMA when the run keeps one, else the trained parameters."""
  params = state.ema_params if state.ema_params else state.params
  return {'params': params, 'batch_stats': state.batch_stats}


def predict_probabilities(state: Any, images: jax.Array, *, model: Any,
                          spatial_shape: tuple[int, ...], tta: str = 'none') -> jax.Array:
  """Softmax probabilities `(N, *spatial_shape, C)` of images mirror-padded for `model`
  (`pipeline.eval_batches`), cropped back to the image.

  `tta` (one of whole_image.TTA_MODES) averages over flipped and rotated copies of each image, as
  tiled prediction does: each copy is mirror-padded for its own shape (pooling makes a net
  depend on where the image sits in its input, so the padded batch itself is not transformed)
  and its prediction mapped back before the mean.
  """
  variables = eval_variables(state)

  def probabilities(padded: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    outputs = model.apply(variables, padded, train=False)
    return whole_image.head_probabilities(whole_image.crop_to(whole_image.final_logits(outputs),
                                                              shape))

  if tta == 'none':  # the batch is already padded for the model
    return probabilities(images, spatial_shape)
  pads = whole_image.model_padding(model, spatial_shape)
  unpadded = images[(slice(None),) + tuple(slice(b, b + int(s))
                                           for (b, _), s in zip(pads, spatial_shape))]

  def predict(x: jax.Array) -> jax.Array:
    shape = x.shape[1:-1]
    widths = [(0, 0), *whole_image.model_padding(model, shape), (0, 0)]
    return probabilities(whole_image.mirror_pad(x, widths), shape)

  return whole_image.tta_mean(predict, unpadded, mode=tta, rank=len(spatial_shape), batched=True)


def eval_step(state: Any, batch: dict[str, jax.Array], *, model: Any, num_classes: int,
              tta: str = 'none') -> tuple[jax.Array, jax.Array]:
  """(confusion matrix (C, C), probabilities) of one global batch; padding examples count nowhere.

  The probabilities feed host-side metrics that need more than a confusion matrix.
  """
  labels = batch['label']
  probs = predict_probabilities(state, batch['image'], model=model, spatial_shape=labels.shape[1:],
                                tta=tta)
  confusion = metrics_lib.confusion_matrix(jnp.argmax(probs, -1), labels, num_classes=num_classes)
  return confusion, probs


def make_eval_fn(model: Any, mesh: jax.sharding.Mesh, num_classes: int, *, tta: str = 'none'
                 ) -> Callable:
  """The jitted eval step; `tta` is config.eval.tta."""
  return jax.jit(functools.partial(eval_step, model=model, num_classes=num_classes, tta=tta),
                 out_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)))


def eval_batches(dataset: Dataset, config: ml_collections.ConfigDict, model: Any,
                 mesh: jax.sharding.Mesh) -> Iterator[dict[str, np.ndarray]]:
  local_batch = sharding.check_batch_size(config.eval_batch_size, mesh,
                                          field='config.eval_batch_size')
  pads = whole_image.model_padding(model, dataset.labels.shape[1:])
  return pipeline.eval_batches(dataset, batch_size=local_batch, pads=pads,
                                     mean=config.data.mean, std=config.data.std,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())


def evaluate(eval_fn: Callable, state: Any, dataset: Dataset,
             config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh,
             *, extra_metrics: list[Any] = ()) -> dict[str, float]:
  """Scores over the whole split. `extra_metrics` are host accumulators with
  `update(probabilities, labels)` and `result() -> dict` fed with this process's examples."""
  accumulator = metrics_lib.ConfusionAccumulator(len(config.data.class_names))
  for extra in extra_metrics:
    extra.reset()
  for batch in eval_batches(dataset, config, model, mesh):
    global_batch = sharding.to_global(batch, mesh)
    confusion, probs = eval_fn(state, global_batch)
    accumulator.update(confusion)
    if extra_metrics:  # every process scores the whole batch, so all agree on the result
      probs = np.asarray(multihost_utils.process_allgather(probs, tiled=True))
      labels = np.asarray(multihost_utils.process_allgather(global_batch['label'], tiled=True))
      keep = (labels.reshape(len(labels), -1) != IGNORE_LABEL).any(1)
      for extra in extra_metrics:
        extra.update(probs[keep], labels[keep])
  scores = accumulator.result(config.data.class_names)
  for extra in extra_metrics:
    scores.update(extra.result())
  return scores


class _FromProbabilities:
  """Feeds a host accumulator what it wants from (probabilities, labels) batches."""

  def __init__(self, accumulator: Any, convert: Callable[[np.ndarray], np.ndarray]):
    self._accumulator, self._convert = accumulator, convert

  def reset(self) -> None:
    self._accumulator.reset()

  def update(self, probabilities: np.ndarray, labels: np.ndarray) -> None:
    self._accumulator.update(self._convert(probabilities), labels)

  def result(self) -> dict[str, float]:
    return self._accumulator.result()


def extra_metrics(config: ml_collections.ConfigDict) -> list[Any]:
  """Host-side accumulators `config.eval` asks for beyond the confusion-matrix scores.

  isbi_metrics: the ISBI 2012 challenge's pixel, Rand and warping errors, computed on the
    probability of `config.eval.membrane_class`.
  hausdorff_classes: class ids whose Hausdorff distance and HD95 are averaged over images.
  """
  extras = []
  if config.eval.isbi_metrics:
    membrane = config.eval.membrane_class
    extras.append(_FromProbabilities(isbi_metrics.ISBIAccumulator(),
                                     lambda p: p[..., membrane]))
  if config.eval.hausdorff_classes:
    extras.append(_FromProbabilities(
        distance_metrics.HausdorffAccumulator(config.data.class_names,
                                              classes=config.eval.hausdorff_classes),
        lambda p: np.argmax(p, axis=-1)))
  return extras


# The paper's ISBI 2012 results (hidden test set), shown next to ours (held-out training slices)
# for runs on the ISBI data only: on other data the comparison means nothing.
ISBI_SOURCES = ('isbi', 'isbi_volume')
PAPER_ISBI = {'isbi_warping_error': 0.000353, 'isbi_rand_error': 0.0382,
              'isbi_pixel_error': 0.0611}


def paper_comparison(scores: dict[str, float]) -> str:
  rows = [f'{k}: {scores[k]:.6f} (paper: {v})' for k, v in PAPER_ISBI.items() if k in scores]
  return '; '.join(rows)


def format_scores(scores: dict[str, float], class_names: tuple[str, ...]) -> str:
  keys = ['pixel_error', *(f'dice_{c}' for c in class_names), *(f'iou_{c}' for c in class_names),
          'isbi_pixel_error', 'isbi_rand_error', 'isbi_warping_error', 'isbi_vrand', 'isbi_vinfo']
  return ', '.join(f'{k}={scores[k]:.4f}' for k in keys if k in scores)
