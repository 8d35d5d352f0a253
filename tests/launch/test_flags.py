"""The packaged flagfiles parse, and --help documents the training flags."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "robot_r1_jax" / "launch" / "configs").glob("*.cfg"))


def _help(*args: str) -> str:
  proc = subprocess.run([sys.executable, "-m", "robot_r1_jax.launch", *args, "--helpshort"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  return proc.stdout + proc.stderr


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_flagfile_parses(cfg):
  out = _help(f"--flagfile={cfg}")
  assert "Error" not in out and "ERROR" not in out, out[-2000:]
  assert "--algo" in out


def test_help_lists_training_flags():
  out = _help()
  for flag in ("--mesh", "--algo", "--kl_in_reward", "--num_generations", "--micro_batch_size",
               "--coordinator_address", "--compute_dtype", "--checkpoint_every"):
    assert flag in out, flag
  assert len(CONFIGS) >= 2
