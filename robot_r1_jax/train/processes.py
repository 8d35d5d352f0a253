"""Host-side values across the processes of a multi-process run (jax.distributed)."""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def any_process(flag: bool) -> bool:
  """`flag` on any process; a collective when there are several (free with one)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def gather_json(value: Any) -> list[Any]:
  """`value` (anything `json.dumps` takes) from every process, in process order.

  A collective: every process must call it at the same point. With one process it is `[value]`
  and costs nothing. Values of different sizes are sent as bytes padded to the longest.
  """
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))  # [processes, longest]
  return [json.loads(row[:size].tobytes()) for row, size in zip(rows, sizes.reshape(-1))]
