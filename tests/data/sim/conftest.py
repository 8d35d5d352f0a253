"""Shared simulator fixtures. Sim modules are imported inside the fixtures: every test file
skips itself first when pybullet is missing (`pytest.importorskip`)."""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture(scope="session")
def simulator():
  from robot_r1_jax.data.sim import Simulator  # pylint: disable=import-outside-toplevel
  with Simulator() as sim:
    yield sim


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory) -> pathlib.Path:
  """Episode 0 of every task, front camera only at 32x32 (images are cheap but not free)."""
  # pylint: disable-next=import-outside-toplevel
  from robot_r1_jax.data.sim import RenderConfig, generate, task_names
  root = tmp_path_factory.mktemp("sim_demos")
  generate(root, task_names(), 1, seed=0, config=RenderConfig(image_size=32, cameras=("front",)),
           progress=False)
  return root
