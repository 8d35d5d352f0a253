"""Building blocks shared by the text decoder and the vision tower.

Parameters carry logical axis names (see `sharding.RULES`) and are created without eager sharding:
placement is decided once, for the whole state, by `sharding.param_shardings`.
"""

from __future__ import annotations

import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INIT_STD = 0.02  # Hugging Face's initializer_range for Qwen2.5-VL


def param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None],
          dtype: jnp.dtype) -> nnx.Param:
  """A N(0, 0.02²) parameter with logical axis `names` (one per dimension of `shape`)."""
  if len(names) != len(shape):
    raise ValueError(f"{len(names)} axis names {tuple(names)} for a {len(shape)}-D shape {shape}")
  value = INIT_STD * jax.random.normal(rngs.params(), tuple(shape), dtype)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False, init="normal")


def zeros_param(shape: Sequence[int], names: Sequence[str | None], dtype: jnp.dtype) -> nnx.Param:
  return nnx.Param(jnp.zeros(tuple(shape), dtype), out_sharding=tuple(names),
                   eager_sharding=False, init="zeros")


def materialize(module: nnx.Module, seed: int,
                place: Callable[[nnx.Variable, np.ndarray], jax.Array] = lambda v, a: jnp.asarray(a)
                ) -> None:
  """Fills an abstract (`nnx.eval_shape`) module with random values drawn on the host.

  Compiling a random initialiser costs ~0.5 s per parameter shape on CPU; NumPy costs nothing to
  compile, so tests and CPU runs build models this way. Each parameter's stream is seeded by
  (seed, path), so values do not depend on construction order. `place` puts each array on devices
  (e.g. straight onto its sharding).
  """
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    abstract = var.get_value()
    kind = var.get_metadata().get("init", "normal")
    name = "/".join(map(str, path))
    if kind == "zeros":
      array = np.zeros(abstract.shape)
    elif kind == "ones":
      array = np.ones(abstract.shape)
    else:
      rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
      array = INIT_STD * rng.standard_normal(abstract.shape, dtype=np.float32)
    var.set_value(place(var, array.astype(abstract.dtype)))


def cast_floating(tree, dtype: jnp.dtype):
  """Every floating-point leaf of `tree` (arrays or abstract arrays) in `dtype`; others unchanged.

  A parameter copy in the compute dtype computes exactly what the f32 parameters do: every layer
  casts its weights to the compute dtype where it uses them.
  """
  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)

  return jax.tree.map(cast, tree)


class RMSNorm(nnx.Module):
  """Hugging Face's Qwen2 RMSNorm: normalise in fp32, cast to the compute dtype, then scale."""

  def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype = jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",),
                           eager_sharding=False, init="ones")

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


def scan(layers: nnx.Module | nnx.List, body: Callable, carry, xs=None, *, remat: bool = False):
  """Runs `body(layer, carry, x) -> (carry, y)` over the layers; returns the carry and the ys
  stacked on a leading L axis.

  Stacked `layers` run as one compiled layer in a scan. An `nnx.List` of separate layers (the
  rollout layout, where each layer's weights are their own buffers) runs unrolled: a scan would
  need them stacked, a copy of every layer. `xs` are per-layer inputs with a leading L axis (e.g.
  a KV cache), or None. Parameters are read, never updated, so the layer state is not threaded
  through the carry.
  """
  def step(graphdef):
    def run(c, inputs):
      layer_state, x = inputs
      return body(nnx.merge(graphdef, layer_state), c, x)

    return jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable) if remat else run

  if isinstance(layers, nnx.List):
    ys = []
    for i, layer in enumerate(layers):
      graphdef, state = nnx.split(layer)
      carry, y = step(graphdef)(carry, (state, jax.tree.map(lambda a, i=i: a[i], xs)))
      ys.append(y)
    return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)
  graphdef, state = nnx.split(layers)
  return jax.lax.scan(step(graphdef), carry, (state, xs))
