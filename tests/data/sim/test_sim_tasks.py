"""Every task: seeded episodes succeed, ARM's rule finds the scripted keyframes, RLBench fields."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pybullet")

# pylint: disable=wrong-import-position
from robot_r1_jax.data.keyframes import discover_keyframes
from robot_r1_jax.data.sim import TASKS, RenderConfig, episode_seed, task_names
from robot_r1_jax.data.sim.expert import MIN_SEGMENT_FRAMES
from robot_r1_jax.data.sim.generate import record_successful
from robot_r1_jax.data.sim.robot import LOWER, UPPER

EPISODES = 5
TRAINING = ("pick_up_cup", "push_button", "put_rubbish_in_bin", "phone_on_base",
            "take_lid_off_saucepan")


@pytest.fixture(scope="module")
def episodes(simulator):
  """5 seeded episodes per task, without images (the physics and the expert are the same)."""
  config = RenderConfig(render=False)
  return {task: [record_successful(simulator, task, k, 0, config) for k in range(EPISODES)]
          for task in task_names()}


def test_registry_has_the_training_tasks_and_held_out_ones():
  assert set(task_names(held_out=False)) == set(TRAINING)
  assert len(task_names(held_out=True)) >= 2
  for cls in TASKS.values():
    assert cls.descriptions and all(isinstance(d, str) and d for d in cls.descriptions)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_seeded_episodes_succeed(episodes, task):
  runs = episodes[task]
  assert all(run.success for run in runs)
  for k, run in enumerate(runs):
    # The stored seed is the one the successful attempt derived from (seed 0, episode k).
    assert run.seed == episode_seed(0, task, k, run.demo.num_reset_attempts - 1)
    assert run.demo.random_seed == run.seed
  assert len({run.seed for run in runs}) == EPISODES
  # Randomised scenes: the objects start somewhere else every episode.
  starts = {tuple(np.round(run.demo[0].task_low_dim_state[:3], 4)) for run in runs}
  assert len(starts) == EPISODES


@pytest.mark.parametrize("task", sorted(TASKS))
def test_arm_rule_finds_the_scripted_keyframes(episodes, task):
  for run in episodes[task]:
    demo = run.demo
    assert discover_keyframes(demo) == run.keyframes
    gripper = np.array([obs.gripper_open for obs in demo])
    changes = [i for i in range(1, len(demo)) if gripper[i] != gripper[i - 1]]
    assert set(changes) <= set(run.keyframes)  # Every grasp and release is a keyframe.
    if task in ("pick_up_cup", "take_lid_off_saucepan", "put_rubbish_in_bin", "phone_on_base"):
      assert changes  # These tasks grasp something.
    # Every keyframe is either a gripper change, the last frame, or a pause where the arm is still.
    for i in set(run.keyframes) - set(changes) - {len(demo) - 1}:
      assert np.max(np.abs(demo[i].joint_velocities)) <= 0.1
      assert np.max(np.abs(demo[i - 1].joint_velocities)) > 0.1  # ... that starts there.


@pytest.mark.parametrize("task", sorted(TASKS))
def test_moves_leave_room_for_questions_and_clear_the_stop_threshold(episodes, task):
  for run in episodes[task]:
    demo, keyframes = run.demo, run.keyframes
    assert 12 <= len(demo) <= 120
    starts = [0, *keyframes[:-1]]
    # Questions are cut every 10 frames before each keyframe: each segment has at least one.
    assert min(k - s for s, k in zip(starts, keyframes)) >= MIN_SEGMENT_FRAMES
    speeds = np.array([np.max(np.abs(obs.joint_velocities)) for obs in demo])
    still = speeds <= 0.1
    # Moving frames are well clear of ARM's 0.1 rad/s, so no spurious stop can appear.
    assert np.all(speeds[~still] > 0.15)
    # Still stretches (pauses, gripper actions) are at most 5 frames: a 6th would be a new stop.
    run_length = 0
    for s in still[1:]:
      run_length = run_length + 1 if s else 0
      assert run_length <= 5


@pytest.mark.parametrize("task", sorted(TASKS))
def test_observation_fields_follow_rlbench(episodes, task):
  run = episodes[task][0]
  state_size = run.demo[0].task_low_dim_state.shape
  for obs in run.demo:
    assert obs.joint_positions.shape == obs.joint_velocities.shape == obs.joint_forces.shape == (7,)
    assert np.all((obs.joint_positions >= LOWER - 1e-3) & (obs.joint_positions <= UPPER + 1e-3))
    assert obs.gripper_open in (0.0, 1.0) and isinstance(obs.gripper_open, float)
    assert obs.gripper_pose.shape == (7,)
    np.testing.assert_allclose(np.linalg.norm(obs.gripper_pose[3:]), 1.0, atol=1e-6)
    matrix = obs.gripper_matrix
    np.testing.assert_allclose(matrix[:3, 3], obs.gripper_pose[:3])
    x, y, z, w = obs.gripper_pose[3:]  # xyzw: the matrix's rotation from the quaternion.
    np.testing.assert_allclose(matrix[:3, 2], [2 * (x * z + w * y), 2 * (y * z - w * x),
                                               1 - 2 * (x * x + y * y)], atol=1e-6)
    assert obs.gripper_joint_positions.shape == (2,)
    assert np.all((obs.gripper_joint_positions > -1e-3) & (obs.gripper_joint_positions < 0.041))
    assert obs.gripper_touch_forces.shape == (6,)
    assert obs.task_low_dim_state.shape == state_size
    assert obs.ignore_collisions.shape == () and float(obs.ignore_collisions) in (0.0, 1.0)
    for camera in ("front", "wrist"):
      assert obs.misc[f"{camera}_camera_extrinsics"].shape == (4, 4)
      assert obs.misc[f"{camera}_camera_intrinsics"].shape == (3, 3)
      assert 0 < obs.misc[f"{camera}_camera_near"] < obs.misc[f"{camera}_camera_far"]
  # The gripper points down while it works: the grasp frame's z axis is world -z.
  assert run.demo[run.keyframes[0]].gripper_matrix[2, 2] < -0.99
