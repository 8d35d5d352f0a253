"""The contact sheet: built from real episodes; the committed docs/ copy covers every task."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

pytest.importorskip("pybullet")

# pylint: disable=wrong-import-position
from PIL import Image

from robot_r1_jax.data.sim import task_names
from robot_r1_jax.data.sim.contact_sheet import FRONT_TILES, GAP, LABEL_WIDTH, make_contact_sheet

COMMITTED = pathlib.Path(__file__).resolve().parents[3] / "docs" / "sim_contact_sheet.png"


def _shape(tasks: int, size: int) -> tuple[int, int, int]:
  return (20 + tasks * (size + GAP), LABEL_WIDTH + (FRONT_TILES + 1) * (size + GAP), 3)


def test_sheet_shows_rendered_frames():
  sheet = make_contact_sheet(["reach_target"], image_size=32)
  assert sheet.shape == _shape(1, 32) and sheet.dtype == np.uint8
  first_tile = sheet[20:52, LABEL_WIDTH:LABEL_WIDTH + 32]
  assert len(np.unique(first_tile.reshape(-1, 3), axis=0)) > 20  # A scene, not a blank tile.


def test_committed_sheet_has_a_row_per_task():
  # Regenerate with: python -m robot_r1_jax.data.sim.contact_sheet --out docs/sim_contact_sheet.png
  with Image.open(COMMITTED) as image:
    assert np.asarray(image.convert("RGB")).shape == _shape(len(task_names()), 128)
