"""The Franka Panda (pybullet_data's URDF): inverse kinematics, joint-space motion, the gripper.

The grasp point is the URDF's `panda_grasptarget` link (between the fingertips), the analogue of
RLBench's `Panda_tip`: `gripper_pose` is its pose. The arm is driven by stiff position servos that
track a time-parametrised joint trajectory, so joint velocities are physical, not made up; grasped
objects are attached to the hand with a fixed constraint, as RLBench parents a grasped object to the
gripper.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pybullet

from robot_r1_jax.data.sim.scene import PANDA_URDF, ROBOT_BASE, SUBSTEPS, Scene

ARM_JOINTS = tuple(range(7))
FINGER_JOINTS = (9, 10)
HAND_LINK = 8
FINGER_LINKS = (9, 10)
TIP_LINK = 11  # panda_grasptarget
FINGERTIP_DEPTH = 0.012  # The fingertips reach this far below the grasp point.

LOWER = np.array([-2.9671, -1.8326, -2.9671, -3.1416, -2.9671, -0.0873, -2.9671])
UPPER = np.array([2.9671, 1.8326, 2.9671, 0.0, 2.9671, 3.8223, 2.9671])
HOME = np.array([0.0, -0.3, 0.0, -2.2, 0.0, 2.0, np.pi / 4])
ARM_FORCES = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)  # The URDF's effort limits (N·m).
FINGER_OPEN = 0.04  # Metres per finger.
FINGER_FORCE = 40.0
FINGER_SPEED = 0.1  # m/s per finger.
# RLBench: gripper_open = 1.0 when the opening (fraction of the maximum) exceeds 0.9.
OPEN_FRACTION = 0.9
# Servo gains (pybullet's normalised PD): stiff enough that tracking lags by ~2 mrad at 0.7 rad/s.
POSITION_GAIN = 0.3
VELOCITY_GAIN = 1.0


class PlanningError(RuntimeError):
  """The expert cannot carry out a waypoint: unreachable pose, IK off its branch, a move too slow
  for ARM's rule, or a gripper action that did not take. The episode is retried with a new seed."""


def top_down(yaw: float) -> np.ndarray:
  """The grasp frame's xyzw quaternion pointing the fingers straight down, rotated by `yaw` about z.

  At yaw = 0 the fingers close along the world y axis.
  """
  return np.array(pybullet.getQuaternionFromEuler((np.pi, 0.0, yaw)))


class Kinematics:
  """IK/FK on a private kinematic copy of the Panda (its own pybullet client, no physics)."""

  def __init__(self):
    self.client = pybullet.connect(pybullet.DIRECT)
    self.robot = pybullet.loadURDF(PANDA_URDF, ROBOT_BASE, useFixedBase=True,
                                   physicsClientId=self.client)

  def forward(self, q: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(position, xyzw quaternion) of the grasp point at arm configuration q."""
    self._set(q)
    state = pybullet.getLinkState(self.robot, TIP_LINK, computeForwardKinematics=True,
                                  physicsClientId=self.client)
    return np.array(state[4]), np.array(state[5])

  def inverse(self, position: Sequence[float], orientation: Sequence[float],
              seed: Sequence[float], tolerance: float = 2e-4) -> np.ndarray:
    """A configuration reaching the grasp pose, near `seed` (null space pulled towards it).

    The result depends only on the arguments: the copy is reset to `seed` first.
    """
    position = np.asarray(position, np.float64)
    q = np.asarray(seed, np.float64)
    for _ in range(20):  # pybullet's IK is one damped least-squares solve: iterate to converge.
      self._set(q)
      q = np.array(pybullet.calculateInverseKinematics(
          self.robot, TIP_LINK, position.tolist(), list(orientation), lowerLimits=LOWER.tolist(),
          upperLimits=UPPER.tolist(), jointRanges=(UPPER - LOWER).tolist(),
          restPoses=list(seed), maxNumIterations=100, residualThreshold=1e-6,
          physicsClientId=self.client)[:7])
      reached, rotation = self.forward(q)
      angle = 2 * np.arccos(min(1.0, abs(float(np.dot(rotation, orientation)))))
      if np.linalg.norm(reached - position) < tolerance and angle < 1e-3:
        break
    else:
      raise PlanningError(f"IK did not converge for position {np.round(position, 3).tolist()} "
                          f"(off by {np.linalg.norm(reached - position):.4f} m, {angle:.4f} rad)")
    if np.any(q < LOWER - 1e-6) or np.any(q > UPPER + 1e-6):
      raise PlanningError(f"IK solution for {np.round(position, 3).tolist()} breaks joint limits")
    return q

  def _set(self, q: Sequence[float]) -> None:
    for joint, value in zip(ARM_JOINTS, q):
      pybullet.resetJointState(self.robot, joint, float(value), physicsClientId=self.client)

  def close(self) -> None:
    pybullet.disconnect(physicsClientId=self.client)


@dataclasses.dataclass(frozen=True)
class ArmState:
  """What RLBench's Observation reads from the robot at one step."""

  joint_positions: np.ndarray
  joint_velocities: np.ndarray
  joint_forces: np.ndarray
  gripper_open: float
  gripper_pose: np.ndarray  # x, y, z, qx, qy, qz, qw of the grasp point.
  gripper_matrix: np.ndarray  # 4x4 of the same pose.
  gripper_joint_positions: np.ndarray  # (2,) finger joints, metres.
  gripper_touch_forces: np.ndarray  # (6,) world-frame contact force on the left, right finger.
  hand_position: np.ndarray
  hand_orientation: np.ndarray


class Panda:
  """The simulated arm in a `Scene`: servo targets, gripper, grasp constraint, state readout."""

  def __init__(self, scene: Scene, gripper_open: bool = True):
    self.scene = scene
    self.id = scene.robot_id
    self.grasped: int | None = None
    self._constraint: int | None = None
    self._finger_target = FINGER_OPEN if gripper_open else 0.0
    c = scene.client
    for joint, value in zip(ARM_JOINTS, HOME):
      pybullet.resetJointState(self.id, joint, float(value), physicsClientId=c)
    for joint in FINGER_JOINTS:
      pybullet.resetJointState(self.id, joint, self._finger_target, physicsClientId=c)
      pybullet.changeDynamics(self.id, joint, lateralFriction=1.5, physicsClientId=c)
    self.command(HOME, np.zeros(7))

  def command(self, q: np.ndarray, qd: np.ndarray) -> None:
    """Sets the arm servos' position and velocity targets (and re-asserts the fingers')."""
    c = self.scene.client
    pybullet.setJointMotorControlArray(
        self.id, ARM_JOINTS, pybullet.POSITION_CONTROL, targetPositions=np.asarray(q).tolist(),
        targetVelocities=np.asarray(qd).tolist(), positionGains=[POSITION_GAIN] * 7,
        velocityGains=[VELOCITY_GAIN] * 7, forces=ARM_FORCES, physicsClientId=c)
    for joint in FINGER_JOINTS:
      pybullet.setJointMotorControl2(self.id, joint, pybullet.POSITION_CONTROL,
                                     targetPosition=self._finger_target, force=FINGER_FORCE,
                                     maxVelocity=FINGER_SPEED, physicsClientId=c)

  def joint_positions(self) -> np.ndarray:
    states = pybullet.getJointStates(self.id, ARM_JOINTS, physicsClientId=self.scene.client)
    return np.array([s[0] for s in states])

  def actuate_gripper(self, open_: bool, hold: np.ndarray, graspable: Sequence[int] = ()) -> None:
    """Opens or closes the fingers, stepping physics (unrecorded, as RLBench's default does) until
    they stop; the arm holds `hold`. On closing, an object touching both fingers is attached."""
    if open_ and self._constraint is not None:
      pybullet.removeConstraint(self._constraint, physicsClientId=self.scene.client)
      self._constraint, self.grasped = None, None
    self._finger_target = FINGER_OPEN if open_ else 0.0
    self.command(hold, np.zeros(7))
    previous, stalled = self._fingers(), 0
    for _ in range(40):  # At most 2 s.
      self.scene.step(SUBSTEPS)
      if not open_ and self.grasped is None:
        # Attach as soon as both fingers touch, as RLBench's grasp does: squeezing a small object
        # between the fingertips' slanted faces could otherwise pop it out.
        for body in graspable:
          if all(pybullet.getContactPoints(self.id, body, linkIndexA=link,
                                           physicsClientId=self.scene.client)
                 for link in FINGER_LINKS):
            self._attach(body)
            break
      current = self._fingers()
      if np.all(np.abs(current - self._finger_target) < 1e-3):
        break
      # Closing on an object: the fingers stop short of the target.
      stalled = stalled + 1 if np.max(np.abs(current - previous)) < 1e-4 else 0
      if stalled >= 2:
        break
      previous = current

  def _attach(self, body: int) -> None:
    c = self.scene.client
    hand = pybullet.getLinkState(self.id, HAND_LINK, computeForwardKinematics=True,
                                 physicsClientId=c)
    position, orientation = pybullet.getBasePositionAndOrientation(body, physicsClientId=c)
    # Constraint frames are relative to the links' centres of mass (getLinkState's [0], [1]), not
    # their URDF frames; the hand's is 4 cm off its frame.
    inverse = pybullet.invertTransform(hand[0], hand[1])
    local_position, local_orientation = pybullet.multiplyTransforms(*inverse, position, orientation)
    self._constraint = pybullet.createConstraint(
        self.id, HAND_LINK, body, -1, pybullet.JOINT_FIXED, (0.0, 0.0, 0.0),
        parentFramePosition=local_position, childFramePosition=(0.0, 0.0, 0.0),
        parentFrameOrientation=local_orientation, physicsClientId=c)
    pybullet.changeConstraint(self._constraint, maxForce=500.0, physicsClientId=c)
    self.grasped = body

  def _fingers(self) -> np.ndarray:
    states = pybullet.getJointStates(self.id, FINGER_JOINTS, physicsClientId=self.scene.client)
    return np.array([s[0] for s in states])

  def state(self) -> ArmState:
    c = self.scene.client
    arm = pybullet.getJointStates(self.id, ARM_JOINTS, physicsClientId=c)
    fingers = self._fingers()
    tip = pybullet.getLinkState(self.id, TIP_LINK, computeForwardKinematics=True,
                                physicsClientId=c)
    hand = pybullet.getLinkState(self.id, HAND_LINK, computeForwardKinematics=True,
                                 physicsClientId=c)
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(pybullet.getMatrixFromQuaternion(tip[5])).reshape(3, 3)
    matrix[:3, 3] = tip[4]
    touch = []
    for link in FINGER_LINKS:
      force = np.zeros(3)
      for contact in pybullet.getContactPoints(bodyA=self.id, linkIndexA=link, physicsClientId=c):
        # Normal force along the normal (pointing from the other body to the finger) + friction.
        force += contact[9] * np.array(contact[7])
        force += contact[10] * np.array(contact[11]) + contact[12] * np.array(contact[13])
      touch.append(force)
    return ArmState(
        joint_positions=np.array([s[0] for s in arm]),
        joint_velocities=np.array([s[1] for s in arm]),
        joint_forces=np.array([s[3] for s in arm]),
        gripper_open=1.0 if fingers.mean() / FINGER_OPEN > OPEN_FRACTION else 0.0,
        gripper_pose=np.concatenate([tip[4], tip[5]]),
        gripper_matrix=matrix,
        gripper_joint_positions=fingers,
        gripper_touch_forces=np.concatenate(touch),
        hand_position=np.array(hand[4]),
        hand_orientation=np.array(hand[5]))
