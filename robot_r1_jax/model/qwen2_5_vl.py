"""Qwen2.5-VL for conditional generation: vision tower + text decoder + LM head."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robot_r1_jax.model import layers, rope, sharding
from robot_r1_jax.model.config import ModelConfig
from robot_r1_jax.model.text import KVCache, TextModel
from robot_r1_jax.model.vision import VisionTower


@dataclasses.dataclass(frozen=True)
class Output:
  logits: jax.Array  # [B, T, V] in the compute dtype
  cache: KVCache | None  # the extended (or new) cache when one was passed in (or asked for)
  rope_deltas: jax.Array  # [B]: decode position = real tokens so far + delta


jax.tree_util.register_dataclass(Output, data_fields=["logits", "cache", "rope_deltas"],
                                 meta_fields=[])


class Qwen25VL(nnx.Module):
  """The full model. Parameters in `param_dtype`, compute in `dtype`."""

  def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, remat: bool = False,
               rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.cfg, self.dtype = cfg, dtype
    self.vision = VisionTower(cfg.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.text = TextModel(cfg.text, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
    if not cfg.text.tie_word_embeddings:
      self.lm_head = layers.param(rngs, (cfg.text.hidden_size, cfg.text.vocab_size),
                                  ("embed", "vocab"), param_dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               pixel_values: jax.Array | None = None,
               image_grid_thw: np.ndarray | tuple | None = None) -> jax.Array:
    """[B, T] ids (+ images) → [B, T, V] logits. See `forward` for the cached variant."""
    return self.forward(input_ids, attention_mask, pixel_values, image_grid_thw).logits

  def forward(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
              pixel_values: jax.Array | None = None,
              image_grid_thw: np.ndarray | tuple | None = None, *,
              cache: KVCache | None = None, positions: jax.Array | None = None,
              rope_deltas: jax.Array | None = None, logits_from: int = 0,
              image_mask: jax.Array | None = None,
              unstacked: tuple[nnx.Module, ...] | None = None,
              new_cache: int | None = None, prefix: KVCache | None = None) -> Output:
    """Full forward, prefill (empty `cache`) or decode step (`positions` from `rope.decode_positions`).

    Args:
      input_ids: [B, T] token ids, left- or right-padded.
      attention_mask: [B, T], 1 for real tokens; None means all real.
      pixel_values: [P, patch_dim] patches of every image in batch order (from the processor).
      image_grid_thw: the images' (t, h, w) patch grids; static under jit (a tuple of tuples).
      cache: a KV cache to extend at its index.
      positions: [3, B, T] M-RoPE positions; computed from the ids when None.
      rope_deltas: [B], returned unchanged when `positions` is given (decode steps).
      logits_from: return logits only for positions [logits_from, T) (a trainer scoring the
        completion after a fixed-length prompt skips the [B, T_prompt, V] head output).
      image_mask: [B, T] image slots; default: the `<|image_pad|>` tokens.
      unstacked: `self.text.unstacked_layers()`, with an unstacked `cache`: decode loops run the
        layers unrolled on weights sliced once, outside the loop (see `TextModel`).
      new_cache: instead of `cache`, the length of a new cache to return filled with this chunk (a
        prefill that attends to the chunk only).
      prefix: a filled cache (a prompt's) that this chunk attends to after, read but not
        extended; with `positions` (a trainer scoring completions after a shared prompt).
    """
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    x = self.text.embed(input_ids)
    if pixel_values is not None:
      if image_grid_thw is None:
        raise ValueError("pixel_values were given without image_grid_thw")
      image_grid_thw = tuple(tuple(int(v) for v in g) for g in np.asarray(image_grid_thw))
      x = self.merge_image_features(input_ids, x, self.vision(pixel_values, image_grid_thw),
                                    image_mask)
    if positions is None:
      index = rope.get_rope_index(input_ids, attention_mask, image_grid_thw,
                                  image_token_id=self.cfg.image_token_id,
                                  spatial_merge_size=self.cfg.vision.spatial_merge_size)
      positions, rope_deltas = index.positions, index.deltas
    elif rope_deltas is None:
      rope_deltas = jnp.zeros(input_ids.shape[:1], jnp.int32)
    hidden, cache = self.text(x, positions, attention_mask, cache, unstacked, new_cache, prefix)
    return Output(logits=self.logits(hidden[:, logits_from:]), cache=cache,
                  rope_deltas=rope_deltas)

  def merge_image_features(self, input_ids: jax.Array, x: jax.Array, features: jax.Array,
                           image_mask: jax.Array | None = None) -> jax.Array:
    """Writes image features [P', D] over the `<|image_pad|>` embeddings of x [B, T, D], in order.

    Counts are checked when the ids are concrete; under jit the i-th pad token takes feature i.
    `image_mask` [B, T] overrides which tokens are image slots (a trainer scoring a completion
    that happens to emit the pad id keeps that token text, as the sampler embedded it).
    """
    is_image = input_ids == self.cfg.image_token_id if image_mask is None else image_mask
    if not isinstance(input_ids, jax.core.Tracer):
      count = int(np.asarray(is_image).sum())
      if count != features.shape[0]:
        raise ValueError(f"image features and image tokens do not match: {count} "
                         f"<|image_pad|> tokens in input_ids, {features.shape[0]} features "
                         "from pixel_values/image_grid_thw")
    ordinal = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    gathered = jnp.take(features.astype(x.dtype), jnp.clip(ordinal, 0, features.shape[0] - 1),
                        axis=0)
    return jnp.where(is_image[..., None], gathered, x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, T, D] final hidden states → [B, T, V] in the compute dtype."""
    if self.cfg.text.tie_word_embeddings:
      return jnp.einsum("BTD,VD->BTV", hidden, self.text.embedding[...].astype(self.dtype))
    return jnp.einsum("BTD,DV->BTV", hidden, self.lm_head[...].astype(self.dtype))

  def init_cache(self, batch: int, length: int) -> KVCache:
    return KVCache.zeros(self.cfg.text, batch, length, self.dtype)


def init_model(cfg: ModelConfig, *, seed: int = 0, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, remat: bool = False,
               mesh: jax.sharding.Mesh | None = None) -> Qwen25VL:
  """A randomly initialised model, built abstractly and filled on the host (no RNG compiles).

  With a mesh, every parameter is placed directly on its `sharding.RULES` placement.
  """
  model = nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                          rngs=nnx.Rngs(0)))
  if mesh is None:
    layers.materialize(model, seed)
  else:
    layers.materialize(model, seed,
                       lambda var, a: jax.device_put(a, sharding.variable_sharding(var, mesh)))
  return model
