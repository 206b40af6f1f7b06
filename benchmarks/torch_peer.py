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


def torch_unet(torch: Any, *, width: int, depth: int, norm: str, num_classes: int) -> Any:
  """The same network as unet_jax.models.UNet(padding='SAME'), in torch.nn."""
  tnn = torch.nn

  def conv_block(cin: int, cout: int) -> Any:
    layers = []
    for c in (cin, cout):
      layers.append(tnn.Conv2d(c, cout, 3, padding=1, bias=norm == 'none'))
      if norm == 'batch':
        layers.append(tnn.BatchNorm2d(cout, eps=1e-5, momentum=0.1))
      layers.append(tnn.ReLU(inplace=True))
    return tnn.Sequential(*layers)

  class UNet(tnn.Module):

    def __init__(self):
      super().__init__()
      self.encoders = tnn.ModuleList(
          conv_block(1 if level == 0 else width * 2**(level - 1), width * 2**level)
          for level in range(depth + 1))
      self.ups = tnn.ModuleList(
          tnn.ConvTranspose2d(width * 2**(level + 1), width * 2**level, 2, stride=2)
          for level in range(depth))
      self.decoders = tnn.ModuleList(
          conv_block(width * 2**(level + 1), width * 2**level) for level in range(depth))
      self.head = tnn.Conv2d(width, num_classes, 1)

    def forward(self, x):
      skips = []
      for level, encoder in enumerate(self.encoders):
        if level:
          x = torch.nn.functional.max_pool2d(x, 2)
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

  def get(path: str) -> Any:
    return torch.from_numpy(np.ascontiguousarray(variables[path]))

  def conv_block(seq: Any, prefix: str) -> None:
    convs = [m for m in seq if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in seq if isinstance(m, torch.nn.BatchNorm2d)]
    for i, conv in enumerate(convs):
      p = f"{prefix}['block']['conv{i}']"
      conv.weight.copy_(get(f"['params']{p}['kernel']").permute(3, 2, 0, 1))  # HWIO → OIHW
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
      # the kernel as (C_in, C_out, kh, kw).
      kernel = np.ascontiguousarray(variables[p + "['kernel']"][::-1, ::-1].transpose(2, 3, 0, 1))
      model.ups[level].weight.copy_(torch.from_numpy(kernel))
      model.ups[level].bias.copy_(get(p + "['bias']"))
    model.head.weight.copy_(get("['params']['head']['Conv_0']['kernel']").permute(3, 2, 0, 1))
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
    """Builds the model from the JAX `variables` and takes the JAX side's batch `data`."""
    torch = self.torch
    self.num_classes = num_classes
    self.model = torch_unet(torch, width=width, depth=depth, norm=norm, num_classes=num_classes)
    copy_jax_weights(torch, self.model, variables, depth=depth, norm=norm)
    self.memory_format = (torch.channels_last if layout == 'channels_last'
                          else torch.contiguous_format)
    self.model = self.model.to(memory_format=self.memory_format)
    self.image = torch.from_numpy(data['image']).permute(0, 3, 1, 2).contiguous(
        memory_format=self.memory_format)
    self.label = torch.from_numpy(data['label']).long()
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=learning_rate, eps=1e-8)

  def _loss(self, logits: Any) -> Any:
    """Cross-entropy + soft Dice (smooth 1, all classes), as unet_jax.training.losses."""
    functional = self.torch.nn.functional
    ce = functional.cross_entropy(logits, self.label)
    probs = logits.softmax(1)
    onehot = functional.one_hot(self.label, self.num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    inter = (probs * onehot).sum((2, 3))
    total = probs.sum((2, 3)) + onehot.sum((2, 3))
    dice = (2 * inter + 1) / (total + 1)
    return ce + (1 - dice.mean(1)).mean()

  def outputs(self) -> tuple[float, np.ndarray]:
    self.model.train()
    with self.torch.no_grad():
      logits = self.model(self.image)
      loss = self._loss(logits)
    return float(loss), logits.permute(0, 2, 3, 1).contiguous().numpy()

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
