"""--mesh specs: parsing, the errors that say what to change, and host <-> global rows."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from robot_r1_jax.launch import mesh as mesh_lib
from robot_r1_jax.model import sharding


@pytest.mark.parametrize("spec, devices, want", [
    ("data=1,fsdp=-1,tensor=1", 8, (1, 8, 1)),
    ("data=2,fsdp=2,tensor=2", 8, (2, 2, 2)),
    ("tensor=2,data=-1", 8, (4, 1, 2)),
    ("fsdp=-1", 1, (1, 1, 1)),
])
def test_parse(spec, devices, want):
  got = mesh_lib.parse_mesh_spec(spec, devices)
  assert (got["data"], got["fsdp"], got["tensor"]) == want


@pytest.mark.parametrize("spec, message", [
    ("data=3,fsdp=-1", "do not divide|does not divide"),
    ("data=2,fsdp=2", "covers 4 devices but there are 8"),
    ("data=-1,fsdp=-1", "at most one axis"),
    ("model=2", "AXIS=SIZE"),
    ("data=two", "not an integer"),
    ("data=0,fsdp=-1", "positive"),
    ("data=2,data=4", "twice"),
])
def test_bad_specs_say_what_to_change(spec, message):
  with pytest.raises(mesh_lib.MeshSpecError, match=message):
    mesh_lib.parse_mesh_spec(spec, 8)


def test_batch_must_split_over_data_and_fsdp():
  mesh = mesh_lib.make_mesh("data=2,fsdp=2,tensor=2", devices=jax.devices()[:8])
  mesh_lib.check_batches({"rollout_batch_size": 8, "micro_batch_size": 4}, mesh)
  with pytest.raises(mesh_lib.MeshSpecError, match="--micro_batch_size=6 .* multiple of 4"):
    mesh_lib.check_batches({"rollout_batch_size": 8, "micro_batch_size": 6}, mesh)


def test_global_rows_round_trip():
  mesh = mesh_lib.make_mesh("data=2,fsdp=2,tensor=2", devices=jax.devices()[:8])
  local = np.arange(24, dtype=np.float32).reshape(8, 3)
  arr = sharding.global_rows(local, mesh)
  assert arr.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(sharding.local_rows(arr), local)
