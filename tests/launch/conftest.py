"""Shared launch-test data: a small simulated, extracted question set (built once per session)."""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture(scope="session")
def extracted_data(tmp_path_factory) -> pathlib.Path:
  pytest.importorskip("pybullet")
  from robot_r1_jax.data import extract, sim

  root = tmp_path_factory.mktemp("launch_data")
  sim.generate(root / "demos", ["push_button"], 2, seed=0, progress=False,
               config=sim.RenderConfig(image_size=64, cameras=("front",)))
  extract.extract(root / "demos", root / "extracted",
                  extract.ExtractConfig(image_size=64, val_fraction=0.5, progress=False))
  return root / "extracted"
