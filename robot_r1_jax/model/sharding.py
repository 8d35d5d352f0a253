"""Logical axis names → mesh axes: the one rules table every parameter and activation goes through.

Layers only ever name logical axes (`embed`, `mlp`, …); which mesh axis (`data`, `fsdp`, `tensor`)
carries them is decided here, so a new parallelism layout is a change to this table alone.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis or axes or None). Every logical name used by a layer must appear here.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),  # B: activations and data
    # B where the hidden width is split over fsdp (the embedding lookup's output): rows move to
    # fsdp from there with one all-to-all, where a mesh with data and fsdp > 1 could not go
    # straight from D over fsdp to B over both (XLA replicated the whole hidden state instead).
    ("batch_data", "data"),
    ("layers", None),  # L: the stacked (scanned) layer axis
    ("embed", "fsdp"),  # D (and the vision width): parameters sharded FSDP-style
    ("mlp", "tensor"),  # F
    ("heads", "tensor"),  # N
    # K is 2–4 in Qwen2.5-VL: split over tensor where it divides (each device then holds its
    # query heads' own K/V head and cache), else replicated (`_fit`).
    ("kv_heads", "tensor"),
    ("head_dim", None),  # H
    ("vocab", "tensor"),  # V
    # V of the LM head while scoring completions (`train.scoring.head_scores`): split over every
    # device, so that the head never moves inside the loop over position chunks.
    ("vocab_split", ("data", "fsdp", "tensor")),
    ("norm", None),  # RMSNorm scales
    ("patch", None),  # the flattened 1176-long patch vector
    ("merge", "fsdp"),  # the merger's 4·D_vision input width
)
_RULES = dict(RULES)


def logical_to_spec(names: Sequence[str | None]) -> PartitionSpec:
  """PartitionSpec for a tuple of logical axis names; unknown names raise KeyError naming them."""
  unknown = [n for n in names if n is not None and n not in _RULES]
  if unknown:
    raise KeyError(f"logical axis name(s) {unknown} have no entry in sharding.RULES")
  return PartitionSpec(*(None if n is None else _RULES[n] for n in names))


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops a mesh axis from a dimension it does not divide (e.g. a 1031-long tiny vocabulary)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    group = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = 1
    for a in group:
      size *= mesh.shape[a]
    out.append(axes if dim % size == 0 else None)
  return PartitionSpec(*out)


def fitted_spec(names: Sequence[str | None], shape: Sequence[int], mesh) -> PartitionSpec:
  """The PartitionSpec of an array of `shape` whose axes are the logical `names`, on `mesh` (a
  concrete or abstract one), without the mesh axes that do not divide their dimension."""
  return _fit(logical_to_spec(names), shape, mesh)


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
  """Placement of one variable from its logical axis names (`out_sharding` metadata)."""
  value = var.get_value()
  names = var.get_metadata().get("out_sharding") or (None,) * value.ndim
  return NamedSharding(mesh, fitted_spec(names, value.shape, mesh))


def param_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """NamedSharding for every variable in `state`."""
  return jax.tree.map(lambda v: variable_sharding(v, mesh), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def inference_mesh(mesh: Mesh, tensor: int) -> Mesh:
  """The rollout layout's mesh: `mesh`'s devices in their order as (data = n / tensor, fsdp = 1,
  tensor). Parameters placed on it by `RULES` are split over tensor only (no FSDP gather per use)
  and rows over data; its device order is `mesh`'s, so arrays of both meshes mix in one program."""
  if mesh.devices.size % tensor:
    raise ValueError(f"tensor={tensor} does not divide the mesh's {mesh.devices.size} devices")
  return Mesh(mesh.devices.reshape(-1, 1, tensor), MESH_AXES, axis_types=mesh.axis_types)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batch-major arrays: the leading B axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def global_rows(local: np.ndarray, mesh: Mesh, leading: int = 0) -> jax.Array:
  """This process's rows → one global array whose row axis (after `leading` unsharded axes) is
  split over (data, fsdp). Single-process, it is a device_put; multi-process, every process passes
  its own rows (e.g. its loader shard) and the global array stacks them in process order."""
  names = (None,) * leading + ("batch",) + (None,) * (np.ndim(local) - leading - 1)
  return jax.make_array_from_process_local_data(NamedSharding(mesh, logical_to_spec(names)),
                                                np.asarray(local))


def local_rows(array: jax.Array, leading: int = 0) -> np.ndarray:
  """The rows of a row-sharded global array that live on this process, in order."""
  if array.is_fully_addressable:
    return np.asarray(array)
  pieces = {}
  for shard in array.addressable_shards:
    pieces.setdefault(shard.index[leading].start or 0, np.asarray(shard.data))
  return np.concatenate([pieces[k] for k in sorted(pieces)], axis=leading)


def abstract_params(model: nnx.Module, mesh: Mesh) -> None:
  """Gives every parameter of an abstract (`nnx.eval_shape`) model its placement on `mesh`, as a
  `jax.ShapeDtypeStruct` with a sharding: the model then lowers for that mesh without any array
  (e.g. a 7B preset compiled for a TPU slice from a CPU host)."""
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype,
                                       sharding=variable_sharding(var, mesh)))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins activation `x` to the placement its logical axis `names` map to, under the mesh of the
  current `jax.set_mesh` context (a mesh axis that does not divide its dimension is dropped);
  unchanged without one. Layers name logical axes only: which mesh carries them is the caller's.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, fitted_spec(names, x.shape, mesh))


def batch_shards(rows: int, mesh: Mesh | None = None) -> int:
  """How many blocks the batch axes split `rows` rows into on `mesh` (default: the mesh of the
  current `jax.set_mesh` context; 1 off a mesh), as `constrain` would place them."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    return 1
  axes = fitted_spec(("batch",), (rows,), mesh)[0]
  return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))


def on_mesh(mesh: Mesh | None) -> contextlib.AbstractContextManager:
  """The context that programs traced on `mesh` run under (`constrain` reads it); nothing for
  None (one device)."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
