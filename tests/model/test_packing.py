"""Packed prefills: the real tokens of left-padded rows as packed rows, shard by shard."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robot_r1_jax.model import packing
from robot_r1_jax.model.packing import Packed
from robot_r1_jax.model.qwen2_5_vl import init_model

from hf_reference import left_padded_batch, tiny_config

LENGTHS = (23, 5, 17, 11)  # four prompts of a 29-slot bucket: 56 real tokens of 116


@pytest.mark.parametrize("shards, rows", [(1, 56), (1, 64), (2, 41), (4, 29)])
def test_pack_keeps_each_shards_real_tokens_in_order_and_unpack_restores_them(shards, rows):
  _, mask = left_padded_batch(np.random.default_rng(0), LENGTHS, 29)
  real = mask.astype(bool)
  x = np.random.default_rng(1).standard_normal((4, 29, 3)).astype(np.float32)
  packed = Packed.of(jnp.asarray(real), shards, rows)
  rows_of = np.asarray(packed.pack(jnp.asarray(x)))
  assert rows_of.shape == (shards, rows, 3)
  per_shard = 4 // shards
  for s in range(shards):
    own = x[s * per_shard:(s + 1) * per_shard][real[s * per_shard:(s + 1) * per_shard]]
    np.testing.assert_array_equal(rows_of[s, :len(own)], own)
  back = np.asarray(packed.unpack(jnp.asarray(rows_of)))
  assert back.shape == x.shape
  np.testing.assert_array_equal(back[real], x[real])


def _mask(lengths, slots):
  return np.arange(slots)[None, :] >= slots - np.array(lengths)[:, None]


def test_rows_for_takes_a_few_counts_and_only_when_rows_are_saved():
  # The benchmark's prompts: 1469 real tokens in 8 × 224 slots → 6 steps of 256 rows.
  assert packing.rows_for(_mask([163, 164, 166, 179, 182, 195, 203, 217], 224), 1) == 1536
  # Shards count their own rows: the fuller shard (400 of 448) decides, and saves nothing.
  assert packing.rows_for(_mask([200, 200, 10, 10], 224), 2) is None
  assert packing.rows_for(_mask([100, 100, 10, 10], 224), 2) == 256
  counts = {packing.rows_for(_mask([n], 1792), 1) for n in range(1, 1793)}
  assert len(counts - {None}) <= 7 and all(c % 128 == 0 for c in counts - {None})


@pytest.mark.parametrize("shards", [1, 2])
def test_packed_prefill_equals_the_padded_one(shards):
  model = init_model(tiny_config(), seed=5)
  ids, mask = left_padded_batch(np.random.default_rng(2), LENGTHS, 29)
  packed = Packed.of(jnp.asarray(mask.astype(bool)), shards, 64 // shards)
  prefill = nnx.jit(lambda m, i, a, p: m.prefill(i, a, cache_length=32, packed=p))
  want, got = prefill(model, ids, mask, None), prefill(model, ids, mask, packed)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got.logits)[real], np.asarray(want.logits)[real],
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got.cache.valid), np.asarray(want.cache.valid))
  for name in ("k", "v"):
    slots = -1 if name == "k" else -2  # keys [B, K, H, S], values [B, K, S, H]
    for g, w in zip(getattr(got.cache, name), getattr(want.cache, name)):
      by_slot = lambda x: np.moveaxis(np.asarray(x), slots, 1)[:, :29][real]
      np.testing.assert_allclose(by_slot(g), by_slot(w), atol=1e-5)
