"""The rollout layout: the copy of the trainer's parameters that a `Sampler` call samples with.

The copy is in the compute dtype; on a mesh it lives on `sharding.inference_mesh` (split over
tensor only, so no weight is gathered inside the decode loop). Its text layers are L separate
buffers: the decode loop reads every layer at every token, and slicing the layers out of stacked
arrays before the loop (`TextModel.unstacked_layers`) held a second copy of all of them (5.2 GiB of
the 7B decode's temporaries per chip on v5e:4x4). The prefill runs the separate layers unrolled.

The copy runs one parameter at a time (a stacked text parameter gives its L layers in one program),
so its temporaries are one parameter's, not the whole model's. A parameter the layout would hold
unchanged (off a mesh, in the compute dtype, not stacked) is not copied.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from robot_r1_jax.model import sharding
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL

_TEXT_LAYERS = ("text", "layers")  # the stacked parameters held as separate layers


def tensor_parallel(requested: int, model: Qwen25VL, mesh: Mesh) -> int:
  """The layout's tensor-parallel degree: `requested`, or (0) the largest that divides the K/V
  heads, the mesh and (multi-process) each process's devices, so every process's rows stay on
  its own devices."""
  devices, local = mesh.devices.size, jax.local_device_count()
  if requested:
    if devices % requested or (jax.process_count() > 1 and local % requested):
      raise ValueError(f"tensor_parallel={requested} must divide the mesh's {devices} devices "
                       f"and each process's {local}")
    return requested
  return math.gcd(model.cfg.text.num_kv_heads, devices,
                  local if jax.process_count() > 1 else devices)


@functools.cache
def _program(dtype: jnp.dtype, layers: int, source: jax.sharding.Sharding | None,
             target: NamedSharding | None):
  """One parameter cast to `dtype` and moved from `source` to `target`, or (`layers` > 0) its L
  leading slices, each placed on its own; shared by every parameter of the same kind, so equal
  shapes compile once. The cast happens where the parameter lives: the move carries the compute
  dtype's bytes (half of f32's for bf16)."""
  def copy(x):
    x = x.astype(dtype)
    if source is not None:
      x = jax.lax.with_sharding_constraint(x, source)
    return tuple(x[i] for i in range(layers)) if layers else x

  return jax.jit(copy, out_shardings=(target,) * layers if layers and target else target)


class LayoutCopy:
  """Makes the rollout layout from the model's state (`__call__`); `graphdef` is the model with
  separate text layers, to merge with the copy."""

  def __init__(self, model: Qwen25VL, mesh: Mesh | None):
    graphdef, state = nnx.split(model)

    def separate(state: nnx.State) -> Qwen25VL:
      copy = nnx.merge(graphdef, state)
      copy.text.unstack_layers()
      return copy

    self.graphdef, abstract = nnx.split(nnx.eval_shape(separate, state))
    self._variables = dict(nnx.to_flat_state(abstract))  # the copy's paths and metadata
    self._targets = {path: self._target(var, path[:2] == _TEXT_LAYERS, model.dtype, mesh)
                     for path, var in nnx.to_flat_state(state)}

  @staticmethod
  def _target(var: nnx.Variable, per_layer: bool, dtype: jnp.dtype, mesh: Mesh | None
              ) -> tuple[jnp.dtype, int, NamedSharding | None]:
    """The copy's dtype, layer count (0: not split) and placement for one parameter."""
    value = var.get_value()
    dtype = dtype if jnp.issubdtype(value.dtype, jnp.floating) else value.dtype
    names = var.get_metadata().get("out_sharding") or (None,) * value.ndim
    shape = value.shape
    if per_layer:  # each layer on the stacked parameter's placement, less its layers axis
      names, shape = names[1:], shape[1:]
    target = None if mesh is None else NamedSharding(mesh,
                                                     sharding.fitted_spec(names, shape, mesh))
    return jnp.dtype(dtype), value.shape[0] if per_layer else 0, target

  def _program(self, path: tuple, value: jax.Array | jax.ShapeDtypeStruct):
    """The copy program of one parameter, and the parameter on devices that program can read."""
    dtype, layers, target = self._targets[path]
    source = None if target is None else getattr(value, "sharding", None)
    if source is not None and source.device_set != target.device_set:
      # A parameter outside the layout's devices (a model on one device, sampled on a mesh) is
      # first placed as the copy will be, so one program sees one set of devices.
      spec = (None, *target.spec) if layers else target.spec
      source = NamedSharding(target.mesh, jax.sharding.PartitionSpec(*spec))
      value = (jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=source)
               if isinstance(value, jax.ShapeDtypeStruct) else jax.device_put(value, source))
    return _program(dtype, layers, source, target), value

  def _as_is(self, path: tuple, value: jax.Array | jax.ShapeDtypeStruct) -> bool:
    """Whether the layout holds this parameter as it is: off a mesh, already in the compute
    dtype and not a stacked text parameter (the embedding and the vision tower of an f32 model on
    one device). The rollout only reads it, so it needs no copy of its own."""
    dtype, layers, target = self._targets[path]
    return target is None and not layers and value.dtype == dtype

  def __call__(self, state: nnx.State) -> nnx.State:
    """The layout of `state` (the model's, or abstract arrays: then the copy's abstract arrays)."""
    out = []
    for path, var in nnx.to_flat_state(state):
      if self._as_is(path, var.get_value()):
        out.append((path, var.get_value()))
        continue
      program, value = self._program(path, var.get_value())
      copied = (jax.eval_shape(program, value) if isinstance(value, jax.ShapeDtypeStruct)
                else program(value))
      if self._targets[path][1]:  # a stacked text parameter: its L layers
        out += [(path[:2] + (i,) + path[2:], layer) for i, layer in enumerate(copied)]
      else:
        out.append((path, copied))
    return nnx.from_flat_state([(path, self._variables[path].replace(value))
                                for path, value in out])

  def lower(self, state: Any) -> list[jax.stages.Lowered]:
    """The copy's programs for `state` (abstract arrays), one per parameter it copies, in running
    order."""
    return [program.lower(value) for program, value in
            (self._program(path, var.get_value()) for path, var in nnx.to_flat_state(state)
             if not self._as_is(path, var.get_value()))]
