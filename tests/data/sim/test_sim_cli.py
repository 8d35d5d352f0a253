"""`python -m robot_r1_jax.data.sim`: worker processes, progress, idempotent re-runs, bad flags."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("pybullet")

# pylint: disable=wrong-import-position
from robot_r1_jax.data import rlbench_io

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _run(*args: str) -> subprocess.CompletedProcess:
  # -W error: the CLI, its worker processes and their imports must not warn either.
  return subprocess.run([sys.executable, "-W", "error", "-m", "robot_r1_jax.data.sim", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_cli_writes_episodes_with_workers_and_skips_them_on_rerun(tmp_path):
  args = ["--out", str(tmp_path), "--tasks", "reach_target", "--episodes", "2",
          "--image_size", "32", "--cameras", "front", "--workers", "2"]
  first = _run(*args)
  assert first.returncode == 0, first.stderr
  assert "2/2" in first.stderr  # tqdm's progress bar.
  refs = rlbench_io.list_episodes(tmp_path)
  assert [(r.task, r.episode) for r in refs] == [("reach_target", 0), ("reach_target", 1)]
  assert rlbench_io.load_demo(refs[1].episode_dir).image(0).shape == (32, 32, 3)
  again = _run(*args)
  assert again.returncode == 0, again.stderr
  assert "wrote 0 episodes, skipped 2" in again.stderr


@pytest.mark.parametrize("flag, value", [("--image_size", "8"), ("--tasks", "nope"),
                                         ("--cameras", "overhead")])
def test_cli_bad_flags_exit_with_a_message_naming_the_flag(tmp_path, flag, value):
  result = _run("--out", str(tmp_path), flag, value)
  assert result.returncode != 0
  assert flag.lstrip("-") in result.stderr
  assert not (tmp_path / "reach_target").exists()
