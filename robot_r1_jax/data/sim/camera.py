"""Cameras in RLBench's (PyRep's) conventions, rendered with pybullet's TinyRenderer.

RLBench stores, per camera and step, `misc['<camera>_camera_extrinsics']` (the camera's 4x4 pose
in the world, camera -> world), `..._intrinsics` (3x3, PyRep's `VisionSensor.get_intrinsic_matrix`,
whose focal lengths are negative), `..._near` and `..._far` (clipping planes, metres). PyRep's
camera frame looks along +z with +x to the image's left and +y to the image's top; with the
negative focal lengths, RLBench's own unprojection (`pointcloud_from_depth_and_camera_params`) and
the projection

    [u·w, v·w, w] = K · R^T (p_world − C)    (u: column, v: row; pixel (0, 0) at the top left)

agree with the images. Both matrices come from the one camera pose that also builds the OpenGL view
matrix for rendering, so image and metadata cannot disagree. (As in RLBench, the principal point is
size/2 while a pixel's centre is at index + 0.5: RLBench's unprojection is half a pixel off.)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pybullet

from robot_r1_jax.data.sim.scene import Vec3

FRONT = "front"
WRIST = "wrist"


@dataclasses.dataclass(frozen=True)
class CameraSpec:
  """A square pinhole camera. `fov_deg` is the full (vertical = horizontal) view angle."""

  name: str
  fov_deg: float
  near: float
  far: float
  shadows: bool = False  # Shadows show how high the gripper is; they double the render time.

  def __post_init__(self):
    if not 0.0 < self.fov_deg < 180.0:
      raise ValueError(f"camera {self.name!r}: fov_deg={self.fov_deg} must be in (0, 180)")
    if not 0.0 < self.near < self.far:
      raise ValueError(f"camera {self.name!r}: need 0 < near={self.near} < far={self.far}")


# RLBench's front camera has a 40° view angle; the wrist camera a wider one to see the fingers and
# what lies between them.
FRONT_CAMERA = CameraSpec(FRONT, fov_deg=40.0, near=0.01, far=4.5, shadows=True)
WRIST_CAMERA = CameraSpec(WRIST, fov_deg=60.0, near=0.01, far=3.5)

# The front camera stands beyond the table's front edge and looks back at the robot.
FRONT_EYE: Vec3 = (1.35, 0.0, 1.6)
FRONT_TARGET: Vec3 = (0.08, 0.0, 0.94)
# The wrist camera in the hand frame (z: towards the fingertips, y: finger travel): beside the hand,
# looking past the fingertips, with the hand's +x as the image's "up".
WRIST_EYE_IN_HAND: Vec3 = (0.06, 0.0, 0.03)
WRIST_TARGET_IN_HAND: Vec3 = (0.0, 0.0, 0.25)


def look_at(eye: Vec3, target: Vec3, up: Vec3) -> np.ndarray:
  """The 4x4 camera -> world pose (PyRep frame: +z forward, +x image left, +y image up)."""
  eye = np.asarray(eye, np.float64)
  forward = np.asarray(target, np.float64) - eye
  forward /= np.linalg.norm(forward)
  right = np.cross(forward, np.asarray(up, np.float64))
  norm = np.linalg.norm(right)
  if norm < 1e-9:
    raise ValueError(f"camera up={up} is parallel to the view direction {forward}")
  right /= norm
  image_up = np.cross(right, forward)
  pose = np.eye(4)
  pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = -right, image_up, forward, eye
  return pose


def intrinsics(spec: CameraSpec, size: int) -> np.ndarray:
  """PyRep's intrinsic matrix for a square `size` image: negative focal lengths, centre size/2."""
  focal = -size / (2.0 * math.tan(math.radians(spec.fov_deg) / 2.0))
  return np.array([[focal, 0.0, size / 2.0], [0.0, focal, size / 2.0], [0.0, 0.0, 1.0]])


def misc_entries(spec: CameraSpec, extrinsics: np.ndarray, size: int) -> dict[str, object]:
  """The `Observation.misc` keys RLBench writes for one camera."""
  return {f"{spec.name}_camera_extrinsics": np.array(extrinsics, np.float64),
          f"{spec.name}_camera_intrinsics": intrinsics(spec, size),
          f"{spec.name}_camera_near": float(spec.near),
          f"{spec.name}_camera_far": float(spec.far)}


def project(points: np.ndarray, extrinsics: np.ndarray, intrinsic: np.ndarray) -> np.ndarray:
  """World points [..., 3] -> pixel coordinates [..., 2] as (column, row), RLBench's convention."""
  points = np.asarray(points, np.float64)
  camera = (points - extrinsics[:3, 3]) @ extrinsics[:3, :3]  # R^T (p - C), row-vector form.
  uvw = camera @ np.asarray(intrinsic, np.float64).T
  return uvw[..., :2] / uvw[..., 2:3]


@dataclasses.dataclass(frozen=True)
class Rendering:
  rgb: np.ndarray  # uint8 [H, W, 3]
  depth: np.ndarray | None  # float32 [H, W], metres along the view axis (as RLBench's depth).
  segmentation: np.ndarray | None  # int32 [H, W]: body id + (link index + 1) << 24, -1 empty.


def render(client: int, spec: CameraSpec, extrinsics: np.ndarray, size: int, *,
           depth: bool = False, segmentation: bool = False) -> Rendering:
  """Renders the scene from the camera pose `extrinsics` (see `look_at`) with TinyRenderer."""
  # OpenGL's camera frame has +x right, +y up, +z backwards: PyRep's x and z flipped.
  gl_pose = extrinsics @ np.diag([-1.0, 1.0, -1.0, 1.0])
  view = np.linalg.inv(gl_pose)
  projection = pybullet.computeProjectionMatrixFOV(spec.fov_deg, 1.0, spec.near, spec.far)
  flags = (pybullet.ER_SEGMENTATION_MASK_OBJECT_AND_LINKINDEX if segmentation
           else pybullet.ER_NO_SEGMENTATION_MASK)
  _, _, rgba, zbuffer, mask = pybullet.getCameraImage(
      size, size, viewMatrix=view.T.reshape(-1).tolist(), projectionMatrix=projection,
      renderer=pybullet.ER_TINY_RENDERER, flags=flags, lightDirection=(1.0, 0.5, 2.0),
      shadow=int(spec.shadows), physicsClientId=client)
  rgb = np.asarray(rgba, np.uint8).reshape(size, size, 4)[..., :3].copy()
  metric = None
  if depth:
    # OpenGL's non-linear z-buffer in [0, 1] -> distance along the view axis.
    z = np.asarray(zbuffer, np.float64).reshape(size, size)
    metric = (spec.far * spec.near / (spec.far - (spec.far - spec.near) * z)).astype(np.float32)
  seg = np.asarray(mask, np.int32).reshape(size, size) if segmentation else None
  return Rendering(rgb, metric, seg)


def front_pose() -> np.ndarray:
  return look_at(FRONT_EYE, FRONT_TARGET, (0.0, 0.0, 1.0))


def wrist_pose(hand_position: np.ndarray, hand_orientation: np.ndarray) -> np.ndarray:
  """The wrist camera's pose from the Panda hand link's world pose (position, xyzw quaternion)."""
  rotation = np.array(pybullet.getMatrixFromQuaternion(hand_orientation)).reshape(3, 3)
  eye = hand_position + rotation @ np.asarray(WRIST_EYE_IN_HAND)
  target = hand_position + rotation @ np.asarray(WRIST_TARGET_IN_HAND)
  return look_at(eye, target, rotation[:, 0])
