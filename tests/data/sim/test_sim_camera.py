"""The stored camera metadata matches the rendered images, in RLBench's (PyRep's) conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest

pybullet = pytest.importorskip("pybullet")

# pylint: disable=wrong-import-position

from robot_r1_jax.data.sim import camera as camera_lib
from robot_r1_jax.data.sim.expert import Waypoint, plan_segment
from robot_r1_jax.data.sim.robot import FINGER_LINKS, Panda
from robot_r1_jax.data.sim.scene import TABLE_TOP_Z

SIZE = 128
POSES = [((0.1, -0.2, 0.85), 0.4), ((0.3, 0.2, 1.0), -0.7), ((0.2, 0.0, 0.8), 1.2)]


def _rlbench_unproject(depth: np.ndarray, extrinsics: np.ndarray,
                       intrinsics: np.ndarray) -> np.ndarray:
  """World points of every pixel, computed the way RLBench's
  `pointcloud_from_depth_and_camera_params` does: pixel (row, col) -> (col, row, 1) · depth, then
  the inverse of K · [R^T | -R^T C]."""
  rows, cols = np.indices(depth.shape)
  pixels = np.stack([cols * depth, rows * depth, depth], -1).reshape(-1, 3)
  rotation, centre = extrinsics[:3, :3], extrinsics[:3, 3:]
  projection = np.eye(4)
  projection[:3] = intrinsics @ np.concatenate([rotation.T, -rotation.T @ centre], 1)
  homogeneous = np.concatenate([pixels, np.ones((len(pixels), 1))], 1)
  return (homogeneous @ np.linalg.inv(projection).T)[:, :3].reshape(*depth.shape, 3)


def _finger_mask(segmentation: np.ndarray, robot: int) -> np.ndarray:
  # With ER_SEGMENTATION_MASK_OBJECT_AND_LINKINDEX a pixel holds body + (link + 1) << 24.
  return np.isin(segmentation, [robot + ((link + 1) << 24) for link in FINGER_LINKS])


def _views(simulator, gripper_open: bool):
  """(camera name, spec, pose, arm state) at a few arm poses, gripper open or closed."""
  scene = simulator.scene
  scene.reset()
  panda = Panda(scene, gripper_open)
  for position, yaw in POSES:
    q = plan_segment(simulator.kinematics, panda.joint_positions(),
                     Waypoint(position, yaw)).samples[-1]
    for joint, value in enumerate(q):
      pybullet.resetJointState(panda.id, joint, value, physicsClientId=scene.client)
    state = panda.state()
    yield "front", camera_lib.FRONT_CAMERA, camera_lib.front_pose(), state, panda
    yield ("wrist", camera_lib.WRIST_CAMERA,
           camera_lib.wrist_pose(state.hand_position, state.hand_orientation), state, panda)


def test_intrinsics_are_pyreps():
  k = camera_lib.intrinsics(camera_lib.FRONT_CAMERA, SIZE)
  focal = -SIZE / (2 * math.tan(math.radians(40.0) / 2))  # PyRep: negative focal lengths.
  np.testing.assert_allclose(k, [[focal, 0, SIZE / 2], [0, focal, SIZE / 2], [0, 0, 1]])


def test_extrinsics_are_proper_poses_looking_at_the_target():
  pose = camera_lib.front_pose()
  np.testing.assert_allclose(pose[:3, :3].T @ pose[:3, :3], np.eye(3), atol=1e-12)
  assert np.linalg.det(pose[:3, :3]) == pytest.approx(1.0)
  np.testing.assert_allclose(pose[:3, 3], camera_lib.FRONT_EYE)
  # The target projects to the image centre.
  centre = camera_lib.project(np.array(camera_lib.FRONT_TARGET), pose,
                              camera_lib.intrinsics(camera_lib.FRONT_CAMERA, SIZE))
  np.testing.assert_allclose(centre, [SIZE / 2, SIZE / 2], atol=1e-9)
  with pytest.raises(ValueError, match="parallel"):
    camera_lib.look_at((0, 0, 1), (0, 0, 0), (0, 0, 1))


@pytest.mark.parametrize("gripper_open", [False, True])
def test_projected_gripper_pose_lands_on_the_gripper(simulator, gripper_open):
  checked = 0
  for name, spec, pose, state, panda in _views(simulator, gripper_open):
    rendering = camera_lib.render(simulator.scene.client, spec, pose, SIZE, segmentation=True)
    col, row = camera_lib.project(state.gripper_pose[:3], pose, camera_lib.intrinsics(spec, SIZE))
    fingers = [np.argwhere(_finger_mask(rendering.segmentation, panda.id) & (
        rendering.segmentation >> 24 == link + 1)) for link in FINGER_LINKS]
    assert all(len(f) for f in fingers), f"{name}: a finger is not in view"
    # The grasp point lies between the two fingers: at the midpoint of their pixel centroids
    # across the image, a little below it along the fingers (the centroids sit ~2 cm above the
    # fingertips: 2-4 px here, the most in the close-up wrist view).
    middle = np.mean([f.mean(0) + 0.5 for f in fingers], 0)  # (row, col) of pixel centres.
    assert abs(middle[1] - col) < 2.0, (name, middle, (row, col))
    assert abs(middle[0] - row) < 5.0, (name, middle, (row, col))
    if not gripper_open:
      # Closed fingers cover the grasp point itself.
      pixels = np.concatenate(fingers) + 0.5
      assert np.min(np.hypot(pixels[:, 0] - row, pixels[:, 1] - col)) < 1.5, name
    checked += 1
  assert checked == 2 * len(POSES)


def test_depth_unprojects_onto_the_table_with_rlbench_formula(simulator):
  for name, spec, pose, _, _ in _views(simulator, True):
    rendering = camera_lib.render(simulator.scene.client, spec, pose, SIZE, depth=True,
                                  segmentation=True)
    table = rendering.segmentation == simulator.scene.table_id
    assert table.sum() > 100, name
    points = _rlbench_unproject(rendering.depth, pose, camera_lib.intrinsics(spec, SIZE))[table]
    # RLBench's formula reads pixel j at coordinate j (not its centre j + 0.5): half a pixel of
    # slant at 1.5 m is a few millimetres.
    assert np.max(np.abs(points[:, 2] - TABLE_TOP_Z)) < 0.015, name
