"""Device meshes from `--mesh` specs and multi-process start-up."""

from __future__ import annotations

import math
from typing import Mapping

import jax
from jax.sharding import AxisType, Mesh

from robot_r1_jax.model import sharding


class MeshSpecError(ValueError):
  """A `--mesh` spec does not fit the devices; the message says what to change."""


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
  """`"data=1,fsdp=-1,tensor=1"` → sizes for ('data', 'fsdp', 'tensor'); -1 takes the rest.

  Axes left out default to 1, except that with no -1 anywhere the unnamed remainder is an error.
  """
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, value = part.partition("=")
    name = name.strip()
    if not sep or name not in sharding.MESH_AXES:
      raise MeshSpecError(f"--mesh entry {part!r}: expected AXIS=SIZE with AXIS one of "
                          f"{', '.join(sharding.MESH_AXES)}")
    if name in sizes:
      raise MeshSpecError(f"--mesh names axis {name!r} twice")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise MeshSpecError(f"--mesh entry {part!r}: size {value!r} is not an integer") from None
    if sizes[name] == 0 or sizes[name] < -1:
      raise MeshSpecError(f"--mesh entry {part!r}: sizes are positive, or -1 for the rest")
  wild = [a for a, s in sizes.items() if s == -1]
  if len(wild) > 1:
    raise MeshSpecError(f"--mesh uses -1 for {wild}; at most one axis can take the rest")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if wild:
    if num_devices % fixed:
      raise MeshSpecError(f"--mesh {spec!r}: the fixed axes multiply to {fixed}, which does not "
                          f"divide the {num_devices} devices; pick sizes whose product divides "
                          f"{num_devices}")
    sizes[wild[0]] = num_devices // fixed
  full = {a: sizes.get(a, 1) for a in sharding.MESH_AXES}
  if math.prod(full.values()) != num_devices:
    raise MeshSpecError(f"--mesh {spec!r} covers {math.prod(full.values())} devices but there are "
                        f"{num_devices}; make the sizes multiply to {num_devices} or use -1 on one "
                        "axis")
  return full


def make_mesh(spec: str | Mapping[str, int], devices=None) -> Mesh:
  """A mesh with axes ('data', 'fsdp', 'tensor') of Auto type (XLA propagates shardings)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec, len(devices)) if isinstance(spec, str) else dict(spec)
  shape = tuple(sizes[a] for a in sharding.MESH_AXES)
  # Auto, not make_mesh's default Explicit: layers name logical axes and let XLA place the rest.
  return jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Starts jax.distributed: explicit localhost/cluster settings, or auto-detection (TPU pods,
  SLURM) when only `num_processes` > 1 or an environment that JAX detects is present."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif num_processes and num_processes > 1:
    jax.distributed.initialize()


def check_batches(batches: Mapping[str, int], mesh: Mesh) -> None:
  """Every global batch (by its flag) must split over data×fsdp devices and over processes;
  MeshSpecError names the first flag that does not, and the multiple it needs."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for flag, rows in batches.items():
    if rows % shards:
      raise MeshSpecError(f"--{flag}={rows} does not split over data×fsdp = {shards} devices; "
                          f"use a multiple of {shards} (or change --mesh)")
    if rows % jax.process_count():
      raise MeshSpecError(f"--{flag}={rows} does not split over {jax.process_count()} processes")
