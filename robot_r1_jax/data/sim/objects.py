"""Task objects built from primitive shapes, standing on the table top (z = TABLE_TOP_Z)."""

from __future__ import annotations

import math

import numpy as np
import pybullet

from robot_r1_jax.data.sim.scene import TABLE_TOP_Z, Scene, Vec3, box, cylinder, sphere

CUP_RADIUS, CUP_HEIGHT = 0.03, 0.09
BUTTON_BASE, BUTTON_BASE_HEIGHT = 0.05, 0.02  # Half side, height of the button's housing.
BUTTON_CAP_RADIUS, BUTTON_CAP_HEIGHT = 0.032, 0.02
BUTTON_TRAVEL = 0.015  # How far the cap can be pushed in.
BIN_HALF, BIN_HEIGHT, BIN_WALL = 0.09, 0.1, 0.008
RUBBISH_HALF = (0.017, 0.015, 0.016)
PHONE_HALF = (0.05, 0.025, 0.015)  # Long axis along the body's x.
DOCK_HALF = (0.075, 0.05, 0.01)
PAN_RADIUS, PAN_HEIGHT = 0.08, 0.07
LID_RADIUS, LID_THICKNESS = 0.085, 0.01
KNOB_RADIUS, KNOB_HEIGHT = 0.012, 0.035
BLOCK_HALF = 0.025


def yaw_quaternion(yaw: float) -> tuple[float, float, float, float]:
  return tuple(pybullet.getQuaternionFromEuler((0.0, 0.0, yaw)))


def cup(scene: Scene, x: float, y: float, yaw: float, colour: str) -> int:
  """A cylindrical cup with a handle on its +x side (grasp it across the other axis)."""
  return scene.add_body(
      [cylinder(CUP_RADIUS, CUP_HEIGHT, colour, (0.0, 0.0, CUP_HEIGHT / 2)),
       box((0.012, 0.006, 0.025), colour, (CUP_RADIUS + 0.01, 0.0, CUP_HEIGHT * 0.55)),
       cylinder(CUP_RADIUS * 0.8, 0.002, "white", (0.0, 0.0, CUP_HEIGHT), collide=False)],
      (x, y, TABLE_TOP_Z), yaw_quaternion(yaw), mass=0.15)


def button(scene: Scene, x: float, y: float, colour: str, housing: str) -> int:
  """A push button: a static square housing with a cap on a sprung prismatic joint (link 0)."""
  body = scene.add_body(
      [box((BUTTON_BASE, BUTTON_BASE, BUTTON_BASE_HEIGHT / 2), housing,
           (0.0, 0.0, BUTTON_BASE_HEIGHT / 2)),
       cylinder(BUTTON_CAP_RADIUS, BUTTON_CAP_HEIGHT, colour,
                (0.0, 0.0, BUTTON_BASE_HEIGHT + BUTTON_CAP_HEIGHT / 2))],
      (x, y, TABLE_TOP_Z), mass=0.05, joint="prismatic", static_base=True)
  c = scene.client
  pybullet.changeDynamics(body, 0, jointLowerLimit=-BUTTON_TRAVEL, jointUpperLimit=0.0,
                          physicsClientId=c)
  # A weak servo back to 0 acts as the return spring.
  pybullet.setJointMotorControl2(body, 0, pybullet.POSITION_CONTROL, targetPosition=0.0, force=4.0,
                                 physicsClientId=c)
  return body


def button_depth(scene: Scene, body: int) -> float:
  """How far the cap is pushed in (metres, >= 0)."""
  return -pybullet.getJointState(body, 0, physicsClientId=scene.client)[0]


def bin_(scene: Scene, x: float, y: float, yaw: float, colour: str) -> int:
  """An open-topped square bin (static)."""
  h, t, w = BIN_HEIGHT / 2, BIN_WALL / 2, BIN_HALF
  return scene.add_body(
      [box((w, w, t), colour, (0.0, 0.0, t)),
       box((t, w, h), colour, (w - t, 0.0, h)), box((t, w, h), colour, (-w + t, 0.0, h)),
       box((w - 2 * t, t, h), colour, (0.0, w - t, h)),
       box((w - 2 * t, t, h), colour, (0.0, -w + t, h))],
      (x, y, TABLE_TOP_Z), yaw_quaternion(yaw))


def ball(scene: Scene, x: float, y: float, radius: float, colour: str, mass: float = 0.03) -> int:
  return scene.add_body([sphere(radius, colour)], (x, y, TABLE_TOP_Z + radius), mass=mass)


def rubbish(scene: Scene, x: float, y: float, yaw: float, colour: str) -> int:
  """A crumpled piece of rubbish: a small lumpy block."""
  return scene.add_body(
      [box(RUBBISH_HALF, colour, (0.0, 0.0, RUBBISH_HALF[2])),
       box((0.01, 0.012, 0.006), colour, (0.006, 0.003, 2 * RUBBISH_HALF[2]))],
      (x, y, TABLE_TOP_Z), yaw_quaternion(yaw), mass=0.02)


def phone(scene: Scene, x: float, y: float, yaw: float, colour: str) -> int:
  """A phone lying on its back: a slab with a dark screen on top."""
  lx, ly, lz = PHONE_HALF
  return scene.add_body(
      [box(PHONE_HALF, colour, (0.0, 0.0, lz)),
       box((lx - 0.006, ly - 0.004, 0.0005), "black", (0.0, 0.0, 2 * lz), collide=False)],
      (x, y, TABLE_TOP_Z), yaw_quaternion(yaw), mass=0.12)


def dock(scene: Scene, x: float, y: float, yaw: float, colour: str) -> int:
  """The phone's base: a flat static pad with a light charging strip."""
  lx, ly, lz = DOCK_HALF
  return scene.add_body(
      [box(DOCK_HALF, colour, (0.0, 0.0, lz)),
       box((0.01, ly - 0.01, 0.0005), "white", (lx - 0.02, 0.0, 2 * lz), collide=False)],
      (x, y, TABLE_TOP_Z), yaw_quaternion(yaw))


def saucepan(scene: Scene, x: float, y: float, yaw: float, colour: str) -> int:
  """A static pan body with a long handle along its +x side."""
  return scene.add_body(
      [cylinder(PAN_RADIUS, PAN_HEIGHT, colour, (0.0, 0.0, PAN_HEIGHT / 2)),
       box((0.06, 0.012, 0.008), "black", (PAN_RADIUS + 0.055, 0.0, PAN_HEIGHT * 0.85))],
      (x, y, TABLE_TOP_Z), yaw_quaternion(yaw))


def lid(scene: Scene, x: float, y: float, colour: str) -> int:
  """A lid resting on the saucepan at (x, y), with a knob on top to grasp."""
  return scene.add_body(
      [cylinder(LID_RADIUS, LID_THICKNESS, colour, (0.0, 0.0, LID_THICKNESS / 2)),
       cylinder(KNOB_RADIUS, KNOB_HEIGHT, "black", (0.0, 0.0, LID_THICKNESS + KNOB_HEIGHT / 2))],
      (x, y, TABLE_TOP_Z + PAN_HEIGHT), mass=0.2)


def block(scene: Scene, x: float, y: float, yaw: float, colour: str) -> int:
  return scene.add_body([box((BLOCK_HALF,) * 3, colour, (0.0, 0.0, BLOCK_HALF))],
                        (x, y, TABLE_TOP_Z), yaw_quaternion(yaw), mass=0.08)


def target_marker(scene: Scene, position: Vec3, colour: str, radius: float = 0.025) -> int:
  """A floating, non-colliding sphere (reach_target's goal and its distractors)."""
  return scene.add_body([sphere(radius, colour, collide=False)], position)


def grasp_yaw(yaw: float) -> float:
  """The equivalent gripper yaw in [-pi/2, pi/2) (the fingers are symmetric under a half turn),
  which keeps the last joint near the middle of its range."""
  return (yaw + math.pi / 2) % math.pi - math.pi / 2


def nearest_yaw(yaw: float, reference: float, period: float) -> float:
  """The angle equivalent to `yaw` modulo `period` (an object's symmetry) closest to `reference`,
  so that the gripper turns as little as possible while carrying."""
  return reference + (yaw - reference + period / 2) % period - period / 2


def body_yaw(scene: Scene, body: int) -> float:
  _, orientation = scene.pose(body)
  return float(pybullet.getEulerFromQuaternion(orientation)[2])


def xy(scene: Scene, body: int) -> np.ndarray:
  return scene.pose(body)[0][:2]


def in_frame(scene: Scene, body: int, point: np.ndarray) -> np.ndarray:
  """`point` (world) in the frame of `body`'s base."""
  position, orientation = scene.pose(body)
  rotation = np.array(pybullet.getMatrixFromQuaternion(orientation)).reshape(3, 3)
  return rotation.T @ (np.asarray(point) - position)
