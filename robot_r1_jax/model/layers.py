"""Building blocks shared by the text decoder and the vision tower.

Parameters carry logical axis names (see `sharding.RULES`) and are created without eager sharding:
placement is decided once, for the whole state, by `sharding.param_shardings`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]
DEFAULT_INIT: Initializer = jax.nn.initializers.normal(stddev=0.02)


def param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None], dtype: jnp.dtype,
          init: Initializer = DEFAULT_INIT) -> nnx.Param:
  """A parameter with logical axis `names` (one per dimension of `shape`)."""
  if len(names) != len(shape):
    raise ValueError(f"{len(names)} axis names {tuple(names)} for a {len(shape)}-D shape {shape}")
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names),
                   eager_sharding=False)


def zeros_param(shape: Sequence[int], names: Sequence[str | None], dtype: jnp.dtype) -> nnx.Param:
  return nnx.Param(jnp.zeros(tuple(shape), dtype), out_sharding=tuple(names),
                   eager_sharding=False)


class RMSNorm(nnx.Module):
  """Hugging Face's Qwen2 RMSNorm: normalise in fp32, cast to the compute dtype, then scale."""

  def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype = jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",),
                           eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    # fp32 statistics regardless of the compute dtype (HF casts up first); the scale multiplies after
    # the cast back, so a bf16 model rounds exactly where transformers rounds.
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(dtype) * normed.astype(dtype)


def stack(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
  """`num` copies of a module with every parameter stacked on a leading `layers` axis (for scan)."""

  @nnx.split_rngs(splits=num)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r):
    return make(r)

  return create(rngs)


def scan(layers: nnx.Module, body: Callable, carry, xs=None, *, remat: bool = False):
  """Runs `body(layer, carry, x) -> (carry, y)` over stacked `layers` with one compiled layer.

  `xs` are per-layer inputs with a leading L axis (e.g. a KV cache), or None. Parameters are read,
  never updated, so the layer state is not threaded through the carry.
  """
  graphdef, state = nnx.split(layers)

  def step(c, inputs):
    layer_state, x = inputs
    return body(nnx.merge(graphdef, layer_state), c, x)

  if remat:
    step = jax.checkpoint(step, policy=jax.checkpoint_policies.nothing_saveable)
  return jax.lax.scan(step, carry, (state, xs))
