r"""The PyTorch peer of benchmarks/train_step.py; needs torch: pip install torch==2.13.0.

The same network as the project's `UNet(padding='SAME')` written in torch.nn, the copying of
the flax variables into it (layout by layout), and its eager training step: Adam and
cross-entropy + soft Dice, as `unet_jax.training.losses.make_loss({'cross_entropy': 1.0,
'dice': 1.0})`. torch is imported by `TorchWorker` alone, so this module loads without it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

TORCH_PIN = 'torch==2.13.0'


def torch_unet(torch: Any, *, width: int, depth: int, norm: str, num_classes: int,
               rank: int = 2) -> Any:
  """The same network as unet_jax.models.UNet(padding='SAME'), in torch.nn; 2D or 3D."""
  tnn = torch.nn
  conv_nd = {2: tnn.Conv2d, 3: tnn.Conv3d}[rank]
  norm_nd = {2: tnn.BatchNorm2d, 3: tnn.BatchNorm3d}[rank]
  up_nd = {2: tnn.ConvTranspose2d, 3: tnn.ConvTranspose3d}[rank]
  pool_nd = {2: torch.nn.functional.max_pool2d, 3: torch.nn.functional.max_pool3d}[rank]

  def conv_block(cin: int, cout: int) -> Any:
    layers = []
    for c in (cin, cout):
      layers.append(conv_nd(c, cout, 3, padding=1, bias=norm == 'none'))
      if norm == 'batch':
        layers.append(norm_nd(cout, eps=1e-5, momentum=0.1))
      layers.append(tnn.ReLU(inplace=True))
    return tnn.Sequential(*layers)

  class UNet(tnn.Module):

    def __init__(self):
      super().__init__()
      self.encoders = tnn.ModuleList(
          conv_block(1 if level == 0 else width * 2**(level - 1), width * 2**level)
          for level in range(depth + 1))
      self.ups = tnn.ModuleList(
          up_nd(width * 2**(level + 1), width * 2**level, 2, stride=2)
          for level in range(depth))
      self.decoders = tnn.ModuleList(
          conv_block(width * 2**(level + 1), width * 2**level) for level in range(depth))
      self.head = conv_nd(width, num_classes, 1)

    def forward(self, x):
      skips = []
      for level, encoder in enumerate(self.encoders):
        if level:
          x = pool_nd(x, 2)
        x = encoder(x)
        skips.append(x)
      x = skips.pop()
      for level in reversed(range(depth)):
        x = self.decoders[level](torch.cat([skips[level], self.ups[level](x)], 1))
      return self.head(x)

  return UNet()


def copy_jax_weights(torch: Any, model: Any, variables: dict[str, np.ndarray], *,
                     depth: int, norm: str) -> None:
  """Copies the flax variables (keystr → array) into the torch model, layout by layout."""
  rank = model.head.weight.ndim - 2
  # (*kernel, I, O) → (O, I, *kernel), e.g. HWIO → OIHW.
  to_oi = (rank + 1, rank, *range(rank))

  def get(path: str) -> Any:
    return torch.from_numpy(np.ascontiguousarray(variables[path]))

  def conv_block(seq: Any, prefix: str) -> None:
    convs = [m for m in seq if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    norms = [m for m in seq if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d))]
    for i, conv in enumerate(convs):
      p = f"{prefix}['block']['conv{i}']"
      conv.weight.copy_(get(f"['params']{p}['kernel']").permute(*to_oi))
      if conv.bias is not None:
        conv.bias.copy_(get(f"['params']{p}['bias']"))
      if norm == 'batch':
        q = f"{prefix}['block']['norm{i}']['BatchNorm_0']"
        norms[i].weight.copy_(get(f"['params']{q}['scale']"))
        norms[i].bias.copy_(get(f"['params']{q}['bias']"))
        norms[i].running_mean.copy_(get(f"['batch_stats']{q}['mean']"))
        norms[i].running_var.copy_(get(f"['batch_stats']{q}['var']"))

  with torch.no_grad():
    for level, encoder in enumerate(model.encoders):
      conv_block(encoder, f"['encoder{level}']")
    for level in range(depth):
      conv_block(model.decoders[level], f"['decoder{level}']")
      p = f"['params']['decoder{level}']['upsample']['ConvTranspose_0']"
      # lax.conv_transpose does not flip the kernel; torch's transposed conv does, and keeps
      # the kernel as (C_in, C_out, *kernel).
      flipped = variables[p + "['kernel']"][(slice(None, None, -1),) * rank]
      kernel = np.ascontiguousarray(flipped.transpose(rank, rank + 1, *range(rank)))
      model.ups[level].weight.copy_(torch.from_numpy(kernel))
      model.ups[level].bias.copy_(get(p + "['bias']"))
    model.head.weight.copy_(get("['params']['head']['Conv_0']['kernel']").permute(*to_oi))
    model.head.bias.copy_(get("['params']['head']['Conv_0']['bias']"))


class TorchWorker:
  """The PyTorch eager peer: same network, weights, data, loss and optimizer as the JAX side."""

  def __init__(self, threads: int):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise SystemExit(f'PyTorch is needed for the comparison: pip install {TORCH_PIN}') from None
    torch.set_num_threads(threads)
    self.torch = torch

  def describe(self) -> str:
    return f'torch {self.torch.__version__}, {self.torch.get_num_threads()} threads'

  def setup(self, *, width: int, depth: int, num_classes: int, norm: str, layout: str,
            learning_rate: float, variables: dict[str, np.ndarray],
            data: dict[str, np.ndarray]) -> None:
    """Builds the model from the JAX `variables` and takes the JAX side's batch `data`
    (2D or 3D, channels-last); 'channels_last' is channels_last_3d for 3D."""
    torch = self.torch
    self.num_classes = num_classes
    self.rank = rank = data['image'].ndim - 2
    self.model = torch_unet(torch, width=width, depth=depth, norm=norm, num_classes=num_classes,
                            rank=rank)
    copy_jax_weights(torch, self.model, variables, depth=depth, norm=norm)
    channels_last = {2: torch.channels_last, 3: torch.channels_last_3d}[rank]
    self.memory_format = channels_last if layout == 'channels_last' else torch.contiguous_format
    self.model = self.model.to(memory_format=self.memory_format)
    self.image = torch.from_numpy(data['image']).permute(0, rank + 1, *range(1, rank + 1))
    self.image = self.image.contiguous(memory_format=self.memory_format)
    self.label = torch.from_numpy(data['label']).long()
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=learning_rate, eps=1e-8)

  def _loss(self, logits: Any) -> Any:
    """Cross-entropy + soft Dice (smooth 1, all classes), as unet_jax.training.losses."""
    functional = self.torch.nn.functional
    ce = functional.cross_entropy(logits, self.label)
    probs = logits.softmax(1)
    onehot = functional.one_hot(self.label, self.num_classes)
    onehot = onehot.permute(0, self.rank + 1, *range(1, self.rank + 1)).to(probs.dtype)
    spatial = tuple(range(2, self.rank + 2))
    inter = (probs * onehot).sum(spatial)
    total = probs.sum(spatial) + onehot.sum(spatial)
    dice = (2 * inter + 1) / (total + 1)
    return ce + (1 - dice.mean(1)).mean()

  def outputs(self) -> tuple[float, np.ndarray]:
    self.model.train()
    with self.torch.no_grad():
      logits = self.model(self.image)
      loss = self._loss(logits)
    return float(loss), logits.permute(0, *range(2, self.rank + 2), 1).contiguous().numpy()

  def step(self) -> float:
    self.model.train()
    start = time.perf_counter()
    self.optimizer.zero_grad(set_to_none=True)
    loss = self._loss(self.model(self.image))
    loss.backward()
    self.optimizer.step()
    loss.item()  # reads the loss back, as the JAX side blocks on its metrics
    return time.perf_counter() - start

  def forward(self) -> float:
    self.model.eval()
    start = time.perf_counter()
    with self.torch.no_grad():
      self.model(self.image)
    return time.perf_counter() - start
