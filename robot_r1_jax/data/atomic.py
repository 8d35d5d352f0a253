"""Atomic file and directory writes: readers see the old content or the new, never a partial one.

Temporary names start with a dot and sit beside the target (same file system, so the final rename
is atomic). They are created with plain `open`/`mkdir` rather than `tempfile`, whose 0600/0700
modes would survive the rename; these follow the umask like any other file.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil
from typing import Iterator


def _temporary_name(path: pathlib.Path, kind: str) -> pathlib.Path:
  return path.with_name(f".{path.name}.{kind}-{secrets.token_hex(8)}")


def is_remote(path: str | os.PathLike[str]) -> bool:
  """Whether `path` names an object store (`gs://…`, `s3://…`) rather than a local folder."""
  return "://" in os.fspath(path)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
  """Writes `data` to `path` via a temporary file in the same directory and a rename; on an
  object store (`gs://…`, through etils.epath), as one object, which is atomic there."""
  if is_remote(path):
    from etils import epath  # only remote paths need it

    epath.Path(path).write_bytes(data)
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _temporary_name(path, "tmp")
  try:
    with open(tmp, "xb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def directory(path: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields an empty temporary directory that replaces `path` when the block succeeds.

  On an exception the temporary directory is removed and `path` is left as it was. An existing
  `path` is moved aside before the new one is renamed in, then deleted: between those two renames
  `path` is briefly absent, but never partial.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _temporary_name(path, "tmp")
  tmp.mkdir()
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if path.exists():
    old = _temporary_name(path, "old")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, path)
