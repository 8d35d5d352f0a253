"""M-RoPE position ids against Hugging Face's `get_rope_index` on random layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robot_r1_jax.model import config as config_lib
from robot_r1_jax.model import rope

IMAGE = config_lib.tiny().image_token_id


def _random_batch(rng: np.random.Generator):
  """A left- or right-padded batch of rows mixing text runs and 0–3 images."""
  batch = int(rng.integers(1, 4))
  rows, grids = [], []
  for _ in range(batch):
    ids = list(rng.integers(0, 1000, size=int(rng.integers(1, 6))))
    for _ in range(int(rng.integers(0, 4))):
      t = int(rng.choice([1, 1, 1, 2]))
      h, w = 2 * int(rng.integers(1, 7)), 2 * int(rng.integers(1, 7))
      grids.append((t, h, w))
      ids += [IMAGE] * (t * h * w // 4)
      ids += list(rng.integers(0, 1000, size=int(rng.integers(1, 5))))
    rows.append(ids)
  length = max(map(len, rows)) + int(rng.integers(0, 3))
  left = bool(rng.integers(0, 2))
  input_ids = np.zeros((batch, length), np.int64)
  mask = np.zeros((batch, length), np.int64)
  for b, ids in enumerate(rows):
    sl = slice(length - len(ids), length) if left else slice(0, len(ids))
    input_ids[b, sl], mask[b, sl] = ids, 1
  return input_ids, mask, np.array(grids, np.int64).reshape(-1, 3)


@pytest.fixture(scope="module")
def hf_model():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = config_lib.tiny()
  hf_cfg = transformers.Qwen2_5_VLConfig(**config_lib.to_hf_config(cfg))
  with torch.device("meta"):
    return transformers.Qwen2_5_VLModel(hf_cfg)


def _fixed_shape(input_ids, mask, grids, rows=3, length=160, images=9):
  """Pads a case to one shape (so the jitted index compiles once): extra rows fully masked,
  extra columns masked on the padded side, extra images of size 0 after the real ones."""
  ids = np.zeros((rows, length), np.int64)
  pad_mask = np.zeros((rows, length), np.int64)
  b, t = input_ids.shape
  left = mask[:, 0].min() == 0 if b else False
  cols = slice(length - t, length) if left else slice(0, t)
  ids[:b, cols], pad_mask[:b, cols] = input_ids, mask
  pad_grids = np.zeros((images, 3), np.int64)
  pad_grids[:len(grids)] = grids
  return ids, pad_mask, pad_grids, (slice(0, b), cols)


def test_matches_hf_on_random_layouts(hf_model):
  import torch
  rng = np.random.default_rng(0)
  index_fn = jax.jit(rope.get_rope_index, static_argnames=("image_token_id",))
  for case in range(60):
    input_ids, mask, grids = _random_batch(rng)
    t_ids = torch.from_numpy(input_ids)
    want_pos, want_delta = hf_model.get_rope_index(
        t_ids, mm_token_type_ids=(t_ids == IMAGE).int(),
        image_grid_thw=torch.from_numpy(grids) if len(grids) else None,
        attention_mask=torch.from_numpy(mask))
    ids, pad_mask, pad_grids, (rows, cols) = _fixed_shape(input_ids, mask, grids)
    got = index_fn(ids, pad_mask, pad_grids, image_token_id=IMAGE)
    np.testing.assert_array_equal(np.asarray(got.positions)[:, rows, cols], want_pos.numpy(),
                                  err_msg=f"case {case}")
    np.testing.assert_array_equal(np.asarray(got.deltas)[rows], want_delta.numpy()[:, 0],
                                  err_msg=f"case {case}")
  assert index_fn._cache_size() == 1


def test_text_only_is_cumsum_and_zero_delta():
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  got = rope.get_rope_index(np.ones_like(mask), mask, image_token_id=IMAGE)
  np.testing.assert_array_equal(got.positions[0], [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(got.positions[0], got.positions[2])
  np.testing.assert_array_equal(got.deltas, [0, 0])


def test_decode_positions_continue_after_image():
  # 2 text tokens, a 4x6-patch image (2x3 merged = 6 tokens), 1 text token.
  ids = np.array([[5, 6] + [IMAGE] * 6 + [7]])
  got = rope.get_rope_index(ids, None, np.array([[1, 4, 6]]), image_token_id=IMAGE)
  np.testing.assert_array_equal(got.positions[:, 0, -1], [5, 5, 5])  # start 2 + max(2, 3)
  nxt = rope.decode_positions(jnp.array([9]), got.deltas, length=2)
  np.testing.assert_array_equal(nxt[:, 0], [[6, 7]] * 3)


def test_mrope_sections_pick_axes():
  positions = jnp.stack([jnp.full((1, 1), 1), jnp.full((1, 1), 2), jnp.full((1, 1), 3)])
  cos, _ = rope.mrope_cos_sin(positions, head_dim=16, theta=1e6, mrope_section=(2, 3, 3),
                              dtype=jnp.float32)
  inv = 1.0 / (1e6 ** (np.arange(0, 16, 2) / 16))
  want = np.cos(np.array([1, 1, 2, 2, 2, 3, 3, 3]) * inv)
  np.testing.assert_allclose(cos[0, 0], np.concatenate([want, want]), rtol=1e-6)
