"""Paths that may be on a disk or in a bucket (gs://bucket/...): the one home for how the package
reads, writes and checks files.

Every file a run reads or writes goes through `etils.epath`, which hands gs:// (and other fsspec
URLs) to gcsfs when TensorFlow is absent; Orbax and tensorstore take the same URLs natively.
Nothing is staged on local disk, so a preempted VM loses nothing that was written.

An object store is not a disk in three ways that matter here:
- An object appears only once its upload completes, so one `write_atomic` call is atomic with no
  temporary name; on a disk it writes a temporary file and renames it.
- An object is replaced whole: there is no append. Files that grow (metrics.jsonl, TensorBoard
  events) are `GrowingFile`s, rewritten whole on `flush`, at most once per MIN_REWRITE_SECONDS
  unless forced (a bucket takes about one write per second to one object; the loop forces a
  flush before every checkpoint, so what a checkpoint covers is never lost).
- Exclusive creation is a precondition (ifGenerationMatch=0), which `create_exclusive` uses.

Access problems (a missing bucket, no credentials, no permission to write) become one-line
`StorageError`s naming the URL (`explain`, `check_writable`), raised before anything compiles.
Transient errors (HTTP 429/5xx, dropped connections) are retried with backoff by gcsfs and by
tensorstore's gcs driver, so they never reach this module.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import threading
import time
import uuid
from typing import IO

import fsspec
from etils import epath

# gcsfs logs a full traceback for every refused request before raising it; the one-line
# StorageError that follows says the same.
logging.getLogger('gcsfs').setLevel(logging.CRITICAL)
# fsspec caches bucket listings per filesystem instance, and etils, Orbax and this module hold
# instances of their own; a listing cached by one would hide what another (or another host)
# wrote or deleted since, e.g. a checkpoint step moved aside.
for _protocol in ('gs', 'gcs'):
  fsspec.config.conf.setdefault(_protocol, {})['use_listings_cache'] = False

MIN_REWRITE_SECONDS = 10.0
CREDENTIALS_HELP = ('run `gcloud auth application-default login`, or set '
                    'GOOGLE_APPLICATION_CREDENTIALS to a service-account key file')


class StorageError(OSError):
  """A path that cannot be used as asked; `str()` is one line naming it."""


def is_remote(path: str | os.PathLike) -> bool:
  """True for URLs with a scheme (gs://, s3://), False for local paths."""
  return '://' in os.fspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
  """`base/part/...` as a string, for a local path or a URL alike."""
  return os.fspath(epath.Path(base).joinpath(*parts))


def parent(path: str | os.PathLike) -> str:
  """The directory that holds `path` (a URL's prefix; '.' for a bare local file name)."""
  return os.fspath(epath.Path(path).parent)


def absolute(path: str | os.PathLike) -> str:
  """An absolute local path (what Orbax needs), or the URL as it is."""
  return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def bucket_of(url: str) -> str:
  """'gs://bucket' of 'gs://bucket/a/b'."""
  scheme, _, rest = url.partition('://')
  return f'{scheme}://{rest.split("/", 1)[0]}'


def _filesystem(url: str):
  return fsspec.core.url_to_fs(url)[0]


def explain(error: BaseException, url: str, *, action: str) -> str | None:
  """One line saying why `action` (e.g. 'write to') failed on `url`, for the access errors a
  bucket gives; None for errors this module does not recognise."""
  code = getattr(error, 'code', None)
  text = f'{type(error).__name__} {error}'
  if code == 401 or 'DefaultCredentialsError' in text or 'RefreshError' in text:
    return f'no credentials to {action} {url}: {CREDENTIALS_HELP}'
  if code == 403 or isinstance(error, PermissionError) or text.startswith('OSError Forbidden'):
    return (f'no permission to {action} {url}: the account in use needs '
            f'roles/storage.objectAdmin (or objectViewer to read) on {bucket_of(url)}')
  return None


def _bucket_missing(url: str) -> bool:
  try:
    _filesystem(url).info(bucket_of(url).partition('://')[2])
    return False
  except FileNotFoundError:
    return True


def check_writable(directory: str, *, flag: str = '--workdir') -> None:
  """Creates `directory` and writes, then removes, a probe file in it; a StorageError naming
  `flag` and the directory when that fails (missing bucket, credentials or permission)."""
  probe = epath.Path(directory) / f'.write_test_{uuid.uuid4().hex[:12]}'
  try:
    if not is_remote(directory):
      if os.path.exists(directory) and not os.path.isdir(directory):
        raise StorageError(f'{flag}={directory} is a file, not a directory; checkpoints and logs '
                           f'go into a directory: choose another {flag}')
      os.makedirs(directory, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except StorageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (gcsfs and google-auth raise many types)
    raise StorageError(_access_message(e, directory, flag)) from e


def _access_message(error: BaseException, url: str, flag: str) -> str:
  explained = explain(error, url, action='write to')
  if explained:
    return f'{flag}={url}: {explained}'
  if is_remote(url) and isinstance(error, FileNotFoundError) and _bucket_missing(url):
    return (f'{flag}={url}: bucket {bucket_of(url)} does not exist; create it (gcloud storage '
            f'buckets create {bucket_of(url)}) or choose another {flag}')
  reason = getattr(error, 'strerror', None) or ' '.join(str(error).split())
  return f'{flag}={url} is not writable ({reason}); choose another {flag}'


def check_readable(path: str, *, field: str) -> None:
  """A StorageError naming `field` when `path` is in a bucket that is missing or unreadable;
  local paths and missing files are left to the caller's own checks."""
  if not is_remote(path):
    return
  try:
    epath.Path(path).exists()
    missing = _bucket_missing(path)
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(f'{field}={path}: ' + (explain(e, path, action='read') or
                                               ' '.join(str(e).split()))) from e
  if missing:
    raise StorageError(f'{field}={path}: bucket {bucket_of(path)} does not exist')


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes the whole file so that a reader sees the old content or the new, never a part."""
  payload = data.encode('utf-8') if isinstance(data, str) else data
  if is_remote(path):
    with _access(path, 'write to'):
      epath.Path(path).write_bytes(payload)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, temporary = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(payload)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


@contextlib.contextmanager
def _access(path: str | os.PathLike, action: str):
  """Turns a bucket's access errors (no credentials, no permission) into a one-line
  StorageError naming `path`; anything else passes through."""
  try:
    yield
  except (FileNotFoundError, StorageError):
    raise
  except Exception as e:  # pylint: disable=broad-except  (gcsfs and google-auth raise many types)
    explained = explain(e, os.fspath(path), action=action)
    if explained is None:
      raise
    raise StorageError(explained) from e


def read_bytes(path: str | os.PathLike) -> bytes:
  with _access(path, 'read'):
    return epath.Path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
  return read_bytes(path).decode('utf-8')


def exists(path: str | os.PathLike) -> bool:
  with _access(path, 'read'):
    return epath.Path(path).exists()


def is_dir(path: str | os.PathLike) -> bool:
  with _access(path, 'read'):
    return bool(path) and epath.Path(path).is_dir()


def is_file(path: str | os.PathLike) -> bool:
  with _access(path, 'read'):
    return bool(path) and epath.Path(path).is_file()


def list_names(directory: str | os.PathLike) -> list[str]:
  """The names (not paths) directly in `directory`, sorted."""
  with _access(directory, 'list'):
    return sorted(p.name for p in epath.Path(directory).iterdir())


def remove(path: str | os.PathLike) -> None:
  """Removes a file; one that is already gone is fine."""
  try:
    epath.Path(path).unlink()
  except FileNotFoundError:
    pass


def makedirs(directory: str | os.PathLike) -> None:
  """Creates a local directory; buckets have no directories to create."""
  if not is_remote(directory):
    os.makedirs(directory, exist_ok=True)


def move(source: str, destination: str) -> None:
  """Moves a file or a directory tree. In a bucket each object is copied through this process,
  then the source removed: fsspec's recursive move ignores objects it failed to copy before it
  deletes them all, and the emulator the tests use refuses server-side copies."""
  if not is_remote(source):
    os.rename(source, destination)
    return
  fs = _filesystem(source)
  source_key, destination_key = source.split('://', 1)[1], destination.split('://', 1)[1]
  for key in fs.find(source_key):
    fs.pipe(destination_key + key[len(source_key):], fs.cat(key))
  fs.rm(source_key, recursive=True)


def download_tree(url: str, local_directory: str) -> None:
  """Copies every object under `url` into `local_directory`, keeping their relative paths."""
  fs = _filesystem(url)
  key = url.split('://', 1)[1].rstrip('/')
  with _access(url, 'read'):
    for found in fs.find(key):
      target = os.path.join(local_directory, found[len(key) + 1:])
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with open(target, 'wb') as f:
        f.write(fs.cat(found))


def create_exclusive(path: str | os.PathLike, data: bytes) -> bool:
  """Creates the file with `data` unless it exists; True if this call created it."""
  if is_remote(path):
    try:
      with _access(path, 'write to'):
        _filesystem(os.fspath(path)).pipe(os.fspath(path), data, mode='create')
      return True
    except FileExistsError:
      return False
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  return True


def readable(path: str | os.PathLike) -> str | IO[bytes]:
  """What a decoder (Pillow, tifffile) can open: the local path itself, or the object's bytes."""
  return os.fspath(path) if not is_remote(path) else io.BytesIO(read_bytes(path))


class GrowingFile:
  """A file that only grows (metrics.jsonl, TensorBoard events), appended to in place on disk
  and rewritten whole in a bucket.

  In a bucket the existing content is read once at opening, so a resumed run appends to it;
  `flush()` uploads at most once per MIN_REWRITE_SECONDS, `flush(force=True)` and `close()`
  always. Thread-safe: TensorBoard's writer flushes from a thread of its own.
  """

  def __init__(self, path: str | os.PathLike, *, keep_existing: bool = True):
    self.path = os.fspath(path)
    self._remote = is_remote(path)
    self._lock = threading.Lock()
    self._dirty = False
    self._last_upload = 0.0
    if self._remote:
      self._buffer = io.BytesIO()
      if keep_existing and exists(path):
        self._buffer.write(read_bytes(path))
    else:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      self._file = open(self.path, 'ab' if keep_existing else 'wb')  # pylint: disable=consider-using-with

  def write(self, data: bytes | str) -> None:
    payload = data.encode('utf-8') if isinstance(data, str) else data
    with self._lock:
      (self._buffer if self._remote else self._file).write(payload)
      self._dirty = True

  def flush(self, force: bool = False) -> None:
    with self._lock:
      if not self._dirty:
        return
      if not self._remote:
        self._file.flush()
        self._dirty = False
        return
      if not force and time.monotonic() - self._last_upload < MIN_REWRITE_SECONDS:
        return
      with _access(self.path, 'write to'):
        epath.Path(self.path).write_bytes(self._buffer.getvalue())
      self._last_upload, self._dirty = time.monotonic(), False

  def close(self) -> None:
    self.flush(force=True)
    if not self._remote:
      with self._lock:
        self._file.close()
