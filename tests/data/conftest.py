"""Shared builders for the data tests: synthetic demos and a stand-in `rlbench` package.

The stand-in package lets a subprocess pickle and unpickle with real class objects named
`rlbench.demo.Demo` / `rlbench.backend.observation.Observation`, as RLBench itself would; it is
never put on this process's sys.path.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Callable

import numpy as np
import pytest

from robot_r1_jax.data import rlbench_io
from robot_r1_jax.data.demo import Demo, Observation

_FAKE_RLBENCH = {
    "rlbench/__init__.py": "",
    "rlbench/backend/__init__.py": "",
    "rlbench/demo.py": """
        class Demo:
          def __init__(self, observations, random_seed=None, num_reset_attempts=None):
            self._observations = observations
            self.random_seed = random_seed
            self.num_reset_attempts = num_reset_attempts
          def __len__(self):
            return len(self._observations)
          def __getitem__(self, i):
            return self._observations[i]
        """,
    "rlbench/backend/observation.py": """
        class Observation:
          def __init__(self, **fields):
            self.__dict__.update(fields)
        """,
}


@pytest.fixture(scope="session")
def run_with_rlbench(tmp_path_factory) -> Callable[[str], str]:
  """Runs Python code in a subprocess where a stand-in `rlbench` package is importable."""
  root = tmp_path_factory.mktemp("fake_rlbench")
  for name, text in _FAKE_RLBENCH.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(textwrap.dedent(text))

  def run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(root))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout

  return run


def synthetic_demo(num_frames: int = 60, seed: int = 0, image_size: int = 32,
                   pause_every: int = 15) -> tuple[Demo, list[np.ndarray]]:
  """A pick-like episode: the gripper moves between random waypoints, pausing at each, closing
  half way; plus one small front image per step (a square that follows the gripper)."""
  rng = np.random.default_rng(seed)
  waypoints = rng.uniform([0.0, -0.3, 0.8], [0.5, 0.3, 1.3],
                          size=(num_frames // pause_every + 2, 3))
  observations, images = [], []
  for i in range(num_frames):
    segment, offset = divmod(i, pause_every)
    paused = offset >= pause_every - 2  # The arm rests for the last two steps of each segment.
    t = min(offset / (pause_every - 2), 1.0)
    xyz = waypoints[segment] + t * (waypoints[segment + 1] - waypoints[segment])
    observations.append(Observation(
        joint_velocities=np.full(7, 0.0 if paused else 0.5),
        joint_positions=rng.normal(size=7),
        gripper_open=1.0 if i < num_frames // 2 else 0.0,
        gripper_pose=np.concatenate([xyz, [0.0, 1.0, 0.0, 0.0]]),
        misc={"front_camera_near": 0.01, "front_camera_far": 4.5}))
    image = np.full((image_size, image_size, 3), 40, np.uint8)
    row, col = (np.clip((xyz[:2] + [0.0, 0.3]) / 0.6, 0, 0.9) * image_size).astype(int)
    image[row:row + 4, col:col + 4] = (255, 128, i % 256)
    images.append(image)
  seed_state = np.random.default_rng(seed).integers(0, 2**31, size=3)
  return Demo(observations, random_seed=seed_state), images


def write_episode(root: pathlib.Path, task: str, episode: int, *, seed: int,
                  num_frames: int = 60, variation: int = 0) -> pathlib.Path:
  """Writes a synthetic episode under `root/task/variation<N>/episodes/episode<K>`."""
  variation_dir = root / task / f"variation{variation}"
  if not (variation_dir / rlbench_io.VARIATION_DESCRIPTIONS).exists():
    rlbench_io.save_variation_descriptions(variation_dir, [f"{task.replace('_', ' ')}",
                                                           f"please {task.replace('_', ' ')}"])
  demo, images = synthetic_demo(num_frames, seed)
  episode_dir = variation_dir / "episodes" / f"episode{episode}"
  rlbench_io.save_demo(demo, episode_dir, {"front": images})
  return episode_dir


@pytest.fixture
def make_demo() -> Callable[..., tuple[Demo, list[np.ndarray]]]:
  return synthetic_demo


@pytest.fixture
def make_episode() -> Callable[..., pathlib.Path]:
  return write_episode
