"""What a run prints: our own lines, every error, each distinct warning once, and libraries' INFO
only when asked for.

Left alone, orbax logs ~30 INFO lines per checkpoint saved (every rename and merge), jax logs its
backend probe, with libtpu installed on a host without a TPU the TPU plugin prints a dozen lines
of probe errors from C++, and gcsfs warns once per file it opens in a bucket when it cannot tell
the bucket's type (~300 identical lines in a 2-step run); the progress and the final table drown.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pathlib
import sys
from typing import Iterator

from absl import logging as absl_logging

_PACKAGE = str(pathlib.Path(__file__).resolve().parents[1]) + os.sep


def skip_absent_tpu() -> None:
  """Picks the CPU backend when this host has no accelerator JAX could use, before any backend
  starts, so the TPU plugin (installed with libtpu for `--compile_only`) is not probed.

  Does nothing when JAX_PLATFORMS is set, or when a TPU (a Google PCI device), an NVIDIA GPU or an
  AMD GPU (ROCm's /dev/kfd) may be present.
  """
  if os.environ.get("JAX_PLATFORMS") is not None or os.environ.get("JAX_FORCE_TPU_INIT"):
    return
  google = "0x1ae0"  # TPU chips' PCI vendor id, what jax's own TPU detection reads
  vendors = glob.glob("/sys/bus/pci/devices/*/vendor")
  if any(pathlib.Path(v).read_text().strip() == google for v in vendors):
    return
  if glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"):
    return
  import jax  # the backends start on first use, not at import

  jax.config.update("jax_platforms", "cpu")


def quiet_libraries() -> None:
  """Below `--verbosity=1`, drops INFO (and DEBUG) records logged from outside this package and
  repeats of a library's warning (same logger, same message); errors from anywhere and our own
  records all print. Call after flags are parsed."""
  if absl_logging.get_verbosity() >= absl_logging.DEBUG:
    return
  absl_logging.get_absl_handler().addFilter(_Quiet())


@contextlib.contextmanager
def one_line_errors(*errors: type[Exception]) -> Iterator[None]:
  """Ends the program with `error: <message>` for `errors`, whose messages name the flag, file or
  key and what to do; the traceback only under `--verbosity=1` or more."""
  try:
    yield
  except errors as e:
    if absl_logging.get_verbosity() >= absl_logging.DEBUG:
      raise
    sys.exit(f"error: {e}")


class _Quiet(logging.Filter):

  def __init__(self):
    super().__init__()
    self._warned: set[tuple[str, str]] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    if record.pathname.startswith(_PACKAGE) or record.levelno >= logging.ERROR:
      return True
    if record.levelno < logging.WARNING:
      return False
    key = (record.name, record.getMessage())
    if key in self._warned:
      return False
    self._warned.add(key)
    return True
