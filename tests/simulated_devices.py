"""XLA_FLAGS for a process the tests start with another number of simulated CPU devices."""

import os


def xla_flags(devices: int) -> str:
  """The session's XLA_FLAGS (tests/conftest.py) with `devices` simulated CPU devices instead
  (XLA takes the last occurrence of a flag)."""
  return f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={devices}'
