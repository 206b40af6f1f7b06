"""Where metrics go: a JSON-lines file and TensorBoard event files in the workdir.

Only process 0 writes; the others get a writer that drops everything, so callers never branch.
The workdir may be a bucket (gs://...): both files are then storage.GrowingFiles, rewritten
whole at most every few seconds and on `flush(force=True)`, which the loop calls before every
checkpoint. TensorBoard reads such a logdir directly: `tensorboard --logdir=gs://bucket/run`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from typing import Any, Mapping, Sequence

from unet_jax import storage


class _GrowingFileFactory:
  """tensorboardX's hook for event files under a URL scheme: they become GrowingFiles."""

  def __init__(self):
    self.files: list[storage.GrowingFile] = []

  def open(self, path: str) -> storage.GrowingFile:
    self.files.append(storage.GrowingFile(path, keep_existing=False))
    return self.files[-1]

  def directory_check(self, path: str) -> None:
    del path  # a bucket has no directories to create


class MetricWriter:
  """Appends `{"step": s, "time": t, **scalars}` lines to metrics.jsonl and to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self._enabled = enabled
    self._jsonl = None
    self._tb = None
    self._event_files = _GrowingFileFactory()
    if not enabled:
      return
    self._jsonl = storage.GrowingFile(storage.join(workdir, 'metrics.jsonl'))
    # pylint: disable-next=g-import-not-at-top  (tensorboardX is only needed on process 0)
    from tensorboardX import SummaryWriter, record_writer
    if storage.is_remote(workdir):
      # Instead of tensorboardX's own gs:// writer, which uploads on every flush and once more
      # from __del__ at interpreter exit.
      record_writer.register_writer_factory(workdir.split('://')[0], self._event_files)
    self._tb = SummaryWriter(storage.join(workdir, 'tensorboard'))

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

  def flush(self) -> None:
    """Everything written so far is stored, in a bucket too (before a checkpoint)."""
    if self._enabled:
      self._jsonl.flush(force=True)
      self._tb.flush()  # hands queued events to the event files
      for events in self._event_files.files:
        events.flush(force=True)

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
  """The records of metrics.jsonl; a last line cut short by a killed process is left out."""
  records = []
  for line in storage.read_text(path).splitlines(keepends=True):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        if line.endswith('\n'):  # only the very last write can be cut short
          raise
  return records


def latest_per_step(records: list[dict]) -> list[dict]:
  """One record per (step, kind of scalars), the last written, in step order.

  A resumed run redoes the steps after its checkpoint and appends them again; the later
  records are the run's history, the earlier ones belong to the attempt that was cut short.
  """
  latest: dict[tuple[int, tuple[str, ...]], dict] = {}
  for record in records:
    kind = tuple(sorted(k for k in record if k not in ('step', 'time')))
    latest.pop((record['step'], kind), None)  # re-inserted: order follows the last write
    latest[(record['step'], kind)] = record
  return sorted(latest.values(), key=lambda r: r['step'])


def write_table(rows: Sequence[Mapping[str, Any]], path_stem: str, *, columns: Sequence[str]
                ) -> None:
  """`path_stem`.csv and `path_stem`.md with the given columns in order."""
  text = io.StringIO(newline='')
  writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction='ignore')
  writer.writeheader()
  writer.writerows(rows)
  storage.write_atomic(path_stem + '.csv', text.getvalue())
  fmt = lambda v: f'{v:.4f}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(fmt(row.get(c, '')) for c in columns) + ' |' for row in rows]
  storage.write_atomic(path_stem + '.md', '\n'.join(lines) + '\n')
