"""Rows packed into their real tokens: a prefill's left-padded prompts, or the right-padded
completions that scoring runs after their prompts, [B, T] as N rows per batch shard, so the weight
matmuls, norms and MLPs (and scoring's LM head) run on real tokens only. Attention and the cache
keep the padded [B, T] layout (their masks, the splash kernel's blocks, the decode step's reads),
so each layer moves its queries/keys/values there and its attention output back: four row gathers
a layer, each ≈1% of one weight matmul's time (0.27 ms for [1536, 768] rows against 24 ms for
their product with a [768, 2048] weight, 2-core CPU).

Rows stay on their shard: shard s (of S along the batch axes) packs the real tokens of its own
B/S rows, so every gather is local to a device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

# Packed rows are a multiple of this (a TPU tile's rows) ...
_MULTIPLE = 128
# ... and take at most this many distinct counts per padded shape: a prefill compiles once per
# count, so a run's varying prompt lengths reuse a handful of programs.
_COUNTS = 8


@functools.partial(jax.tree_util.register_dataclass, data_fields=["take", "put"],
                   meta_fields=["length"])
@dataclasses.dataclass(frozen=True)
class Packed:
  """Where the real tokens of rows [B, T] sit when packed into [S, N] rows."""

  take: jax.Array  # [S, N] int32: the padded slot (of its shard's B/S·T) each packed row holds
  put: jax.Array  # [S, B/S·T] int32: the packed row each padded slot reads (padding: any)
  length: int  # T

  @classmethod
  def of(cls, real: jax.Array, shards: int, rows: int) -> "Packed":
    """The packing of `real` [B, T] (True on real tokens) into `rows` rows per shard, at least
    the fullest shard's real tokens (`rows_for`; fewer would drop tokens, unchecked under jit);
    rows past a shard's real tokens repeat its first slot (computed, never read)."""
    b, t = real.shape
    flat = real.reshape(shards, b // shards * t)
    take = jax.vmap(lambda r: jnp.nonzero(r, size=rows, fill_value=0)[0])(flat)
    put = jnp.maximum(jnp.cumsum(flat, axis=1, dtype=jnp.int32) - 1, 0)
    return cls(take=take.astype(jnp.int32), put=put, length=t)

  def pack(self, x: jax.Array) -> jax.Array:
    """[B, T, …] → [S, N, …]: each shard's real tokens, in order."""
    return _rows_of(x.reshape(self.take.shape[0], -1, *x.shape[2:]), self.take)

  def unpack(self, x: jax.Array) -> jax.Array:
    """[S, N, …] → [B, T, …]; a padding slot holds a copy of some real token of its shard."""
    return _rows_of(x, self.put).reshape(-1, self.length, *x.shape[2:])


def _rows_of(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [S, R, …] and index [S, M] → [S, M, …]: rows of each shard's own x."""
  return jax.vmap(lambda a, i: jnp.take(a, i, axis=0, mode="clip"))(x, index)


def rows_for(mask: np.ndarray, shards: int) -> int | None:
  """N for `Packed.of`, from this process's rows of a left-padded mask [B, T] (multi-process: the
  global rows stack the processes' rows in order; every process gets the same N): `rounded` of
  the most real tokens of any shard (rows split in order into `shards`)."""
  real = np.asarray(mask).sum(axis=1, dtype=np.int32)
  if jax.process_count() > 1:
    real = np.asarray(multihost_utils.process_allgather(real)).reshape(-1)
  most = int(real.reshape(shards, -1).sum(axis=1).max())
  return rounded(most, len(real) // shards * np.shape(mask)[1])


def rounded(most: int, padded: int, counts: int = _COUNTS) -> int | None:
  """`most` real tokens of a shard's `padded` slots rounded up to one of `counts` steps of
  `padded`, each a multiple of `_MULTIPLE`; None when that saves no row."""
  step = -(-padded // counts // _MULTIPLE) * _MULTIPLE
  rows = max(step, -(-most // step) * step)
  return rows if rows < padded else None
