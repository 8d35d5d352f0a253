"""Atomic file and directory writes: readers see the old content or the new, never a partial one."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterator


def write_bytes(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file in the same directory and a rename."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def directory(path: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields an empty temporary directory that replaces `path` when the block succeeds.

  On an exception the temporary directory is removed and `path` is left as it was. An existing
  `path` is moved aside before the new one is renamed in, then deleted: the two renames are the only
  moment `path` is absent. Temporary names start with a dot so directory listings can skip them.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if path.exists():
    old = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    os.replace(path, old / path.name)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, path)
