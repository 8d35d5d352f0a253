"""Multimodal rotary embeddings (M-RoPE): 3-D position ids and the rotation itself.

Position ids follow Hugging Face's `Qwen2_5_VLModel.get_rope_index` (transformers 5.23): text tokens
advance the (t, h, w) axes together; an image block of `t·h·w / merge²` tokens gets `(start + t,
start + row, start + col)`; the text after it resumes at `start + max(h, w) / merge`. Padding gets 0,
and `delta = max position + 1 − number of real tokens`, so decoding step k of a row sits at
`max + 1 + k`. Written as a closed form (cumulative sums instead of HF's per-row Python loop) so it
jits and runs inside the sampler.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RopeIndex:
  positions: jax.Array  # [3, B, T] int32: (temporal, height, width) position of every token
  deltas: jax.Array  # [B] int32: decode position = number of real tokens so far + delta


def get_rope_index(input_ids: jax.Array, attention_mask: jax.Array | None = None,
                   image_grid_thw: jax.Array | np.ndarray | None = None, *, image_token_id: int,
                   spatial_merge_size: int = 2) -> RopeIndex:
  """3-D M-RoPE positions for a batch.

  Args:
    input_ids: [B, T] token ids; each image is a contiguous run of `<|image_pad|>` tokens (runs are
      separated by text such as `<|vision_end|>`/`<|vision_start|>`, as the chat template renders).
    attention_mask: [B, T], 1 for real tokens (left or right padding), or None for no padding.
    image_grid_thw: [M, 3] patch grids (before merging) of the images in batch order, or None.
    image_token_id: the `<|image_pad|>` id.
    spatial_merge_size: the vision merger's spatial factor (2).
  """
  input_ids = jnp.asarray(input_ids)
  valid = (jnp.ones(input_ids.shape, bool) if attention_mask is None
           else jnp.asarray(attention_mask).astype(bool))
  advance = valid.astype(jnp.int32)  # each real text token moves every axis by one
  offset = jnp.zeros((3,) + input_ids.shape, jnp.int32)

  if image_grid_thw is not None and len(image_grid_thw):
    grid = jnp.asarray(image_grid_thw, jnp.int32)
    gt, gh, gw = grid[:, 0], grid[:, 1] // spatial_merge_size, grid[:, 2] // spatial_merge_size
    sizes = gt * gh * gw
    ends = jnp.cumsum(sizes)
    is_image = (input_ids == image_token_id) & valid
    # Images are consumed in batch order, row by row, exactly as HF walks its grid iterator.
    ordinal = (jnp.cumsum(is_image.reshape(-1)) - 1).reshape(input_ids.shape)
    image = jnp.clip(jnp.searchsorted(ends, ordinal, side="right"), 0, len(sizes) - 1)
    j = ordinal - (ends[image] - sizes[image])
    hw = gh[image] * gw[image]
    within = jnp.stack([j // hw, (j % hw) // gw[image], j % gw[image]])
    offset = jnp.where(is_image[None], within, 0)
    # The whole block advances by max(h, w) (HF ignores t here); book it on the block's last token
    # so that every token of the block shares one start.
    last = j == sizes[image] - 1
    advance = jnp.where(is_image, jnp.where(last, jnp.maximum(gh[image], gw[image]), 0), advance)

  start = jnp.cumsum(advance, axis=1) - advance  # exclusive prefix sum along T
  positions = jnp.where(valid[None], start[None] + offset, 0).astype(jnp.int32)
  count = valid.sum(axis=1)
  deltas = jnp.where(count > 0, positions.max(axis=(0, 2)) + 1 - count, 0).astype(jnp.int32)
  return RopeIndex(positions=positions, deltas=deltas)


def decode_positions(num_real: jax.Array, deltas: jax.Array, length: int = 1) -> jax.Array:
  """[3, B, length] positions of the next `length` tokens given `num_real` [B] real tokens so far."""
  pos = num_real[:, None] + deltas[:, None] + jnp.arange(length, dtype=jnp.int32)[None]
  return jnp.broadcast_to(pos[None], (3,) + pos.shape).astype(jnp.int32)


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                  mrope_section: tuple[int, int, int], dtype: jnp.dtype
                  ) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables [B, T, H] for 3-D positions [3, B, T].

  Frequency chunk i of `mrope_section` takes its angle from axis i (t, h, w); the half-table is then
  repeated, as HF's `recomposition_frequencies` does. Angles in fp32, then cast to the compute dtype
  (HF rotates in the compute dtype).
  """
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  axis_of_freq = np.repeat(np.arange(3), mrope_section)  # [H/2]
  pos = positions.astype(jnp.float32)[jnp.asarray(axis_of_freq)]  # [H/2, B, T]
  freqs = jnp.moveaxis(pos, 0, -1) * jnp.asarray(inv_freq)  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Applies RoPE to x [B, T, N, H] with cos/sin [B, T, H] (rotate-half convention)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
