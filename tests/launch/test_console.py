"""What the console keeps: our records, errors, each library warning once; no library INFO."""

from __future__ import annotations

import logging

import pytest
from absl import logging as absl_logging

from robot_r1_jax.launch import console
from robot_r1_jax.train import metrics


@pytest.fixture
def handler():
  handler = absl_logging.get_absl_handler()
  before = list(handler.filters)
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  console.quiet_libraries()
  yield handler
  handler.filters[:] = before
  absl_logging.set_verbosity(verbosity)


def _record(level: int, message: str, *, name: str = "gcsfs",
            pathname: str = "/site-packages/gcsfs/core.py") -> logging.LogRecord:
  return logging.LogRecord(name, level, pathname, 1, message, (), None)


def test_library_info_goes_and_each_warning_prints_once(handler):
  assert not handler.filter(_record(logging.INFO, "opened a file"))
  warning = "Could not determine bucket type for bucket name test"
  assert handler.filter(_record(logging.WARNING, warning))
  assert not handler.filter(_record(logging.WARNING, warning))
  assert handler.filter(_record(logging.WARNING, "another warning"))
  assert handler.filter(_record(logging.WARNING, warning, name="orbax"))  # another library's
  assert handler.filter(_record(logging.ERROR, "failed"))
  assert handler.filter(_record(logging.ERROR, "failed"))  # errors every time


def test_our_records_all_print(handler):
  ours = metrics.__file__
  assert handler.filter(_record(logging.INFO, "checkpoint: saving step 1", name="absl",
                                pathname=ours))
  for _ in range(2):
    assert handler.filter(_record(logging.WARNING, "same warning", name="absl", pathname=ours))


def test_verbosity_one_keeps_everything():
  handler = absl_logging.get_absl_handler()
  before, verbosity = list(handler.filters), absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.DEBUG)
  try:
    console.quiet_libraries()
    assert handler.filter(_record(logging.INFO, "opened a file"))
  finally:
    handler.filters[:] = before
    absl_logging.set_verbosity(verbosity)
