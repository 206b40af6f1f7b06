"""Where metrics go: a JSON-lines file and TensorBoard event files in the workdir.

Only process 0 writes; the others get a writer that drops everything, so callers never branch.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping


class MetricWriter:
  """Appends `{"step": s, "time": t, **scalars}` lines to metrics.jsonl and to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self._enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    record = {'step': int(step), 'time': time.time(),
              **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for key, value in clean.items():
      self._tb.add_scalar(key, value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()


def progress_bar(total: int, initial: int, *, enabled: bool):
  """A tqdm bar with ETA; disabled on every process but the first."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, disable=not enabled, unit='step', dynamic_ncols=True,
              mininterval=2.0)


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
