"""Host-side pieces of batched generation: shape buckets, left padding, per-prompt images,
gathering a row-sharded array, which prompts a compaction keeps whole, and a trace counter that
proves nothing recompiles."""

from __future__ import annotations

import bisect
import collections
import functools
from typing import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from robot_r1_jax.model.vision import Grid


class TraceCounter:
  """Counts how often wrapped functions are traced; under jit a trace is a compilation.

  Tests use it to prove that repeated calls in one bucket never recompile.
  """

  def __init__(self):
    self.counts: collections.Counter[str] = collections.Counter()

  def wrap(self, name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def counted(*args, **kwargs):
      self.counts[name] += 1  # Runs only while jax traces; cached calls skip the Python body.
      return fn(*args, **kwargs)

    return counted


def bucket(length: int, buckets: Sequence[int], what: str) -> int:
  """The smallest of the increasing `buckets` ≥ `length`; ValueError naming `what` if none."""
  i = bisect.bisect_left(buckets, length)
  if i == len(buckets):
    raise ValueError(f"{what}={length} exceeds the largest bucket {buckets[-1]} of "
                     f"{tuple(buckets)}")
  return buckets[i]


def left_pad(prompt_ids: np.ndarray, prompt_mask: np.ndarray, length: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded [B, T'] prompts → [B, length] int32 ids and bool mask (more padding on the left).

  Raises ValueError if a row is right-padded or empty: decoding continues every row at its last
  slot, which must hold the prompt's last real token.
  """
  ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask).astype(bool)
  if ids.ndim != 2 or ids.shape != mask.shape:
    raise ValueError(f"prompt_ids {list(ids.shape)} and prompt_mask {list(mask.shape)} must be "
                     "the same [B, T] shape")
  bad = np.flatnonzero(~mask[:, -1] | (np.diff(mask.astype(np.int8), axis=1) < 0).any(axis=1))
  if bad.size:
    raise ValueError(f"prompt rows {bad.tolist()} are empty or not left-padded (prompt_mask must "
                     "be 0…0 1…1 with a real last token)")
  extra = length - ids.shape[1]
  return (np.pad(ids.astype(np.int32), ((0, 0), (extra, 0)), constant_values=pad_id),
          np.pad(mask, ((0, 0), (extra, 0))))


def host_rows(x: jax.Array) -> np.ndarray:
  """All of a (row-sharded) array on this host, from every process's devices."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def per_prompt(pixel_values: np.ndarray, grid: Grid, prompts: int, how: str) -> np.ndarray:
  """[B, P / B, patch_dim]: each prompt's image patches; ValueError unless every prompt has one
  image and all are of one grid."""
  if len(set(grid)) != 1 or len(grid) != prompts:
    raise ValueError(f"sampling {how} needs one image per prompt, all of one grid; got "
                     f"{len(grid)} images with grids {sorted(set(grid))} for {prompts} prompts")
  pixel_values = np.asarray(pixel_values)
  return pixel_values.reshape(prompts, -1, pixel_values.shape[-1])


def whole_groups(done: np.ndarray, size: int, per: int, groups: int) -> np.ndarray | None:
  """The prompts (groups of `per` consecutive rows) that keep their shared cache when `size` rows
  are kept: those with a live row, then finished ones to fill `size` (their rows draw nothing).
  None when a live prompt has finished rows, or `size` is not whole prompts on each of the
  `groups` data-parallel groups: then every row takes its own copy."""
  if size % per or (size // per) % groups:
    return None
  finished = done.reshape(-1, per)
  live = np.flatnonzero(~finished.all(axis=1))
  if finished[live].any():
    return None
  fill = np.flatnonzero(finished.all(axis=1))[:size // per - len(live)]
  return np.concatenate([live, fill])
