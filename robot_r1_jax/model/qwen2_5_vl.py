"""Qwen2.5-VL for conditional generation: vision tower + text decoder + LM head."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robot_r1_jax.model import attention, layers, rope, sharding
from robot_r1_jax.model.config import ModelConfig
from robot_r1_jax.model.packing import Packed
from robot_r1_jax.model.text import KVCache, TextModel
from robot_r1_jax.model.vision import VisionTower


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Output:
  """A forward pass: logits, the final hidden states and the M-RoPE deltas its positions imply."""

  logits: jax.Array | None  # [B, T, V] in the compute dtype; None when run without the head
  hidden: jax.Array  # [B, T, D] final-normed (positions from `logits_from` on, as the logits)
  rope_deltas: jax.Array  # [B]: decode position = real tokens so far + delta


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefill:
  """A prefill: the forward's logits and deltas, and a new cache holding the chunk."""

  logits: jax.Array  # [B, T, V] (positions from `logits_from` on)
  cache: KVCache  # stacked; slots [0, T) filled
  rope_deltas: jax.Array  # [B]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Decoded:
  """One decode step: next-token logits and the cache with the step's token written."""

  logits: jax.Array  # [B, T, V], T the tokens fed (1 in a decode loop)
  cache: KVCache


class Qwen25VL(nnx.Module):
  """The full model. Parameters in `param_dtype`, compute in `dtype`.

  Entry points, one per way the model is run (each a plain function of its arguments):
    `__call__` / `forward`   a full causal forward (HF parity, SFT and whole-row scoring);
    `prefill`                the forward, and a new KV cache holding the prompt (the sampler);
    `decode_step`            tokens at the cache's index, the layers unrolled (a decode loop);
    `with_prompt`            prompts and the chunks that follow them in one pass over the layers
                             (completions scored after their shared prompt, run once per prompt
                             for its G samples).
  """

  def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, remat: bool = False,
               attention_implementation: str = "xla", rngs: nnx.Rngs | None = None):
    """`attention_implementation`: one of `attention.IMPLEMENTATIONS` but "auto", which whoever
    knows the devices resolves (`init_model`, `load_hf`)."""
    attention.check(attention_implementation, dtype)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.cfg, self.dtype = cfg, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, remat=remat,
              attention_implementation=attention_implementation, rngs=rngs)
    self.vision = VisionTower(cfg.vision, **kw)
    self.text = TextModel(cfg.text, **kw)
    if not cfg.text.tie_word_embeddings:
      self.lm_head = layers.param(rngs, (cfg.text.hidden_size, cfg.text.vocab_size),
                                  ("embed", "vocab"), param_dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               pixel_values: jax.Array | None = None,
               image_grid_thw: np.ndarray | tuple | None = None) -> jax.Array:
    """[B, T] ids (+ images) → [B, T, V] logits."""
    return self.forward(input_ids, attention_mask, pixel_values, image_grid_thw).logits

  def forward(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
              pixel_values: jax.Array | None = None,
              image_grid_thw: np.ndarray | tuple | None = None, *,
              positions: jax.Array | None = None, logits_from: int = 0,
              image_mask: jax.Array | None = None, head: bool = True) -> Output:
    """A full causal forward.

    Args:
      input_ids: [B, T] token ids, left- or right-padded.
      attention_mask: [B, T], 1 for real tokens; None means all real.
      pixel_values: [P, 1176] patches of every image in batch order (from the processor).
      image_grid_thw: the images' (t, h, w) patch grids; static under jit (a tuple of tuples).
      positions: [3, B, T] M-RoPE positions; computed from the ids when None.
      logits_from: return logits only for positions [logits_from, T) (a trainer scoring the
        completion after a fixed-length prompt skips the [B, T_prompt, V] head output).
      image_mask: [B, T] image slots; default: the `<|image_pad|>` tokens.
      head: apply the LM head; False leaves `logits` None (a scorer applies the head to chunks of
        the hidden states, never holding [B, T, V]).
    """
    x, mask, positions, deltas = self._inputs(input_ids, attention_mask, pixel_values,
                                              image_grid_thw, positions, image_mask)
    hidden = self.text(x, positions, mask)[:, logits_from:]
    return Output(logits=self.logits(hidden) if head else None, hidden=hidden,
                  rope_deltas=deltas)

  def prefill(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
              pixel_values: jax.Array | None = None,
              image_grid_thw: np.ndarray | tuple | None = None, *, cache_length: int,
              logits_from: int = 0, packed: Packed | None = None) -> Prefill:
    """`forward` that also returns a new cache of `cache_length` slots holding the chunk (which
    attends to itself only, not to the empty slots). Arguments as for `forward`; `packed` (of
    `attention_mask`) runs the text layers' matmuls on the real tokens only."""
    x, mask, positions, deltas = self._inputs(input_ids, attention_mask, pixel_values,
                                              image_grid_thw, None, None)
    hidden, cache = self.text.prefill(x, positions, mask, cache_length, packed)
    return Prefill(logits=self.logits(hidden[:, logits_from:]), cache=cache, rope_deltas=deltas)

  def decode_layers(self) -> tuple[nnx.Module, ...]:
    """The decoder layers for `decode_step`, each parameter sliced out once: a decode loop builds
    them before it starts (see `TextModel.unstacked_layers`)."""
    return self.text.unstacked_layers()

  def decode_step(self, input_ids: jax.Array, cache: KVCache, positions: jax.Array, *,
                  layers: tuple[nnx.Module, ...]) -> Decoded:
    """Text tokens [B, T] (all real) at the cache's index.

    Args:
      input_ids: [B, T] ids, T = 1 in a decode loop.
      cache: from `prefill`; its buffers are updated in place (donate them under jit).
      positions: [3, B, T] from `rope.decode_positions`.
      layers: `decode_layers()`.
    """
    x = self.text.embed(input_ids)
    hidden, cache = self.text.decode(layers, x, positions, jnp.ones(input_ids.shape, jnp.int32),
                                     cache)
    return Decoded(logits=self.logits(hidden), cache=cache)

  def with_prompt(self, prompt_ids: jax.Array, prompt_mask: jax.Array,
                  pixel_values: jax.Array | None, image_grid_thw: np.ndarray | tuple | None,
                  input_ids: jax.Array, attention_mask: jax.Array, *, share: int,
                  head: bool = True, packed: Packed | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """B left-padded prompts [B, T] (+ their images, as for `forward`) and the text chunks
    [B·share, R] that continue them, a prompt's `share` chunks adjacent (its G samples).

    Returns ([B, 1, V] logits at each prompt's last position, which predict its chunks' first
    token; [B·share, R, V] chunk logits), or with `head=False` the final hidden states of both
    ([B, 1, D]; [B·share, R, D]). The prompt runs once for its chunks, which attend to its keys
    and values: the numbers of a forward over each whole row, up to float rounding. A generated
    `<|image_pad|>` id in a chunk stays a text token: no image features are merged there.
    With `packed` (of `attention_mask`), the chunks' outputs are its rows, [S, N, ·].
    """
    xp, prompt_mask, prompt_positions, deltas = self._inputs(
        prompt_ids, prompt_mask, pixel_values, image_grid_thw, None, None)
    repeat = lambda a: jnp.repeat(a, share, axis=0)
    positions = rope.decode_positions(repeat(prompt_mask.sum(1).astype(jnp.int32)),
                                      repeat(deltas), input_ids.shape[1])
    hidden_p, hidden = self.text.with_prompt(xp, prompt_positions, prompt_mask,
                                             self.text.embed(input_ids), positions,
                                             attention_mask, share, packed)
    last = hidden_p[:, -1:]
    return (self.logits(last), self.logits(hidden)) if head else (last, hidden)

  def _inputs(self, input_ids, attention_mask, pixel_values, image_grid_thw, positions,
              image_mask) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Embeddings with image features merged, the mask, positions and rope deltas."""
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
      return x, attention_mask, index.positions, index.deltas
    return x, attention_mask, positions, jnp.zeros(input_ids.shape[:1], jnp.int32)

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

  def head_weight(self) -> tuple[jax.Array, str]:
    """The LM head in the compute dtype and its axes: the embedding [V, D] ("VD") when tied,
    else [D, V] ("DV")."""
    if self.cfg.text.tie_word_embeddings:
      return self.text.embedding[...].astype(self.dtype), "VD"
    return self.lm_head[...].astype(self.dtype), "DV"

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, T, D] final hidden states → [B, T, V] in the compute dtype."""
    weight, axes = self.head_weight()
    return jnp.einsum(f"BTD,{axes}->BTV", hidden, weight)


def init_model(cfg: ModelConfig, *, seed: int = 0, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, remat: bool = False,
               attention_implementation: str = "xla",
               mesh: jax.sharding.Mesh | None = None) -> Qwen25VL:
  """A randomly initialised model, built abstractly and filled on the host (no RNG compiles).

  With a mesh, every parameter is placed directly on its `sharding.RULES` placement;
  `attention_implementation` "auto" picks the one for the mesh's (or the default) devices.
  """
  impl = attention.resolve(attention_implementation, platform(mesh))
  model = nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                          attention_implementation=impl, rngs=nnx.Rngs(0)))
  if mesh is None:
    layers.materialize(model, seed)
  else:
    layers.materialize(model, seed,
                       lambda var, a: jax.device_put(a, sharding.variable_sharding(var, mesh)))
  return model


def platform(mesh: jax.sharding.Mesh | None) -> str:
  """"tpu", "gpu" or "cpu": the platform of `mesh`'s devices, else of JAX's default backend."""
  return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
