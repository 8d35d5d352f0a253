"""The tabletop scene in RLBench's world frame, and primitive-shape bodies to furnish it.

World frame (RLBench's, which the Robot-R1 prompt metadata describes): z up, the table top at
z = 0.752 with its centre at (0.25, 0, 0.752), +x from the robot towards the front camera, +y to the
right as seen from that camera. The Panda stands on the table's back edge, facing +x.

Every episode starts from `Scene.reset()`, which rebuilds the simulation from nothing, so an
episode's physics depends only on what the episode itself does (and pybullet is deterministic for
a fixed sequence of calls); that is what makes generation byte-reproducible per seed and
independent of which worker process ran which episodes before.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pybullet
import pybullet_data

TABLE_TOP_Z = 0.752
TABLE_CENTRE = (0.25, 0.0, TABLE_TOP_Z)
TABLE_HALF_EXTENTS = (0.6, 0.7, 0.03)  # x: [-0.35, 0.85]; the robot sits near the back edge.
ROBOT_BASE = (-0.3, 0.0, TABLE_TOP_Z)
PANDA_URDF = f"{pybullet_data.getDataPath()}/franka_panda/panda.urdf"

PHYSICS_HZ = 240
FRAME_DT = 0.05  # RLBench records one observation per 50 ms simulation step.
SUBSTEPS = round(FRAME_DT * PHYSICS_HZ)

Vec3 = tuple[float, float, float]
Quat = tuple[float, float, float, float]  # x, y, z, w (pybullet's and RLBench's order).

# Named colours (RGB in [0, 1]); RLBench's tasks pick object colours from a similar list.
COLOURS: dict[str, Vec3] = {
    "red": (0.85, 0.1, 0.1), "green": (0.1, 0.65, 0.15), "blue": (0.1, 0.25, 0.85),
    "yellow": (0.95, 0.85, 0.1), "orange": (0.95, 0.5, 0.05), "purple": (0.5, 0.15, 0.65),
    "cyan": (0.1, 0.8, 0.85), "magenta": (0.85, 0.15, 0.65), "white": (0.92, 0.92, 0.92),
    "black": (0.08, 0.08, 0.08), "grey": (0.5, 0.5, 0.5), "brown": (0.45, 0.27, 0.1),
    "teal": (0.0, 0.5, 0.5), "olive": (0.5, 0.5, 0.0), "navy": (0.05, 0.05, 0.45),
    "pink": (0.95, 0.55, 0.7),
}


def rgba(colour: str | Vec3, alpha: float = 1.0) -> tuple[float, float, float, float]:
  """A colour name from `COLOURS` (or an RGB triple) as pybullet's RGBA."""
  rgb = COLOURS[colour] if isinstance(colour, str) else colour
  return (*rgb, alpha)


@dataclasses.dataclass(frozen=True)
class Shape:
  """One primitive: a box (half_extents), a cylinder (radius, length along z) or a sphere (radius).

  `position`/`orientation` place it in its body's frame. `collide=False` makes it visual only.
  """

  kind: str  # "box" | "cylinder" | "sphere"
  colour: str | Vec3
  half_extents: Vec3 = (0.0, 0.0, 0.0)
  radius: float = 0.0
  length: float = 0.0
  position: Vec3 = (0.0, 0.0, 0.0)
  orientation: Quat = (0.0, 0.0, 0.0, 1.0)
  collide: bool = True

  def __post_init__(self):
    if self.kind not in ("box", "cylinder", "sphere"):
      raise ValueError(f"Shape.kind={self.kind!r} must be 'box', 'cylinder' or 'sphere'")


def box(half_extents: Vec3, colour: str | Vec3, position: Vec3 = (0.0, 0.0, 0.0),
        **kwargs) -> Shape:
  return Shape("box", colour, half_extents=tuple(half_extents), position=tuple(position), **kwargs)


def cylinder(radius: float, length: float, colour: str | Vec3, position: Vec3 = (0.0, 0.0, 0.0),
             **kwargs) -> Shape:
  return Shape("cylinder", colour, radius=radius, length=length, position=tuple(position),
               **kwargs)


def sphere(radius: float, colour: str | Vec3, position: Vec3 = (0.0, 0.0, 0.0), **kwargs) -> Shape:
  return Shape("sphere", colour, radius=radius, position=tuple(position), **kwargs)


class Scene:
  """A pybullet DIRECT client holding the floor, the table, the Panda and the task's objects."""

  def __init__(self):
    self.client = pybullet.connect(pybullet.DIRECT)
    self.robot_id = -1
    self.table_id = -1

  def reset(self) -> None:
    """Rebuilds the empty scene (floor, table, robot) from scratch."""
    c = self.client
    pybullet.resetSimulation(physicsClientId=c)
    # Contact pairs in a fixed order, so that the same calls give the same physics bit for bit.
    pybullet.setPhysicsEngineParameter(deterministicOverlappingPairs=1,
                                       fixedTimeStep=1 / PHYSICS_HZ, numSolverIterations=50,
                                       physicsClientId=c)
    pybullet.setGravity(0.0, 0.0, -9.81, physicsClientId=c)
    self.add_body([box((3.0, 3.0, 0.01), (0.32, 0.33, 0.36))], (0.0, 0.0, -0.01))
    # A wall behind the robot, so the front camera sees a room rather than an empty sky.
    self.add_body([box((0.01, 3.0, 1.5), (0.72, 0.74, 0.78), collide=False)], (-1.2, 0.0, 1.5))
    self.table_id = self.add_body(
        [box(TABLE_HALF_EXTENTS, (0.62, 0.5, 0.38))],
        (TABLE_CENTRE[0], TABLE_CENTRE[1], TABLE_TOP_Z - TABLE_HALF_EXTENTS[2]), friction=0.8)
    for sx in (-1, 1):  # Legs: only seen from the front camera, never touched.
      for sy in (-1, 1):
        leg = (TABLE_CENTRE[0] + sx * (TABLE_HALF_EXTENTS[0] - 0.05),
               sy * (TABLE_HALF_EXTENTS[1] - 0.05), (TABLE_TOP_Z - 0.06) / 2)
        self.add_body([box((0.03, 0.03, (TABLE_TOP_Z - 0.06) / 2), (0.45, 0.33, 0.22),
                           collide=False)], leg)
    self.robot_id = pybullet.loadURDF(PANDA_URDF, ROBOT_BASE, useFixedBase=True,
                                      physicsClientId=c)

  def add_body(self, shapes: Sequence[Shape], position: Vec3,
               orientation: Quat = (0.0, 0.0, 0.0, 1.0), *, mass: float = 0.0,
               friction: float = 1.0, joint: str = "fixed",
               joint_axis: Vec3 = (0.0, 0.0, 1.0), static_base: bool = False) -> int:
    """Creates a body from primitives and returns its pybullet id.

    The first shape is the base; every further shape is a link on a fixed joint (or, with
    `joint="prismatic"`, on a prismatic joint along `joint_axis`, e.g. a button cap), each with its
    own colour. `mass` (0: static) is spread over the parts, or over the links only when
    `static_base` pins the base in place.
    """
    c = self.client
    if not shapes:
      raise ValueError("add_body needs at least one Shape")
    if joint not in ("fixed", "prismatic"):
      raise ValueError(f"joint={joint!r} must be 'fixed' or 'prismatic'")
    collision, visual = zip(*(self._shape_ids(s, i == 0) for i, s in enumerate(shapes)))
    links = range(1, len(shapes))
    part_mass = mass / max(len(links), 1) if static_base else mass / len(shapes)
    body = pybullet.createMultiBody(
        baseMass=0.0 if static_base else part_mass, baseCollisionShapeIndex=collision[0],
        baseVisualShapeIndex=visual[0], basePosition=position, baseOrientation=orientation,
        linkMasses=[part_mass] * len(links),
        linkCollisionShapeIndices=[collision[i] for i in links],
        linkVisualShapeIndices=[visual[i] for i in links],
        linkPositions=[shapes[i].position for i in links],
        linkOrientations=[shapes[i].orientation for i in links],
        linkInertialFramePositions=[(0.0, 0.0, 0.0)] * len(links),
        linkInertialFrameOrientations=[(0.0, 0.0, 0.0, 1.0)] * len(links),
        linkParentIndices=[0] * len(links),
        linkJointTypes=[pybullet.JOINT_PRISMATIC if joint == "prismatic" else pybullet.JOINT_FIXED]
        * len(links), linkJointAxis=[joint_axis] * len(links), physicsClientId=c)
    for link in range(-1, len(shapes) - 1):
      pybullet.changeDynamics(body, link, lateralFriction=friction, spinningFriction=0.001,
                              rollingFriction=0.0001, physicsClientId=c)
    return body

  def _shape_ids(self, shape: Shape, is_base: bool) -> tuple[int, int]:
    """(collision, visual) shape ids. A base shape's offset is baked into the shape; a link's
    offset is its joint's position instead."""
    c = self.client
    position, orientation = ((shape.position, shape.orientation) if is_base
                             else ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0)))
    if shape.kind == "box":
      geom, size, visual_size = pybullet.GEOM_BOX, dict(halfExtents=shape.half_extents), {}
    elif shape.kind == "cylinder":  # The visual API calls the cylinder's height `length`.
      geom = pybullet.GEOM_CYLINDER
      size, visual_size = dict(radius=shape.radius, height=shape.length), dict(
          radius=shape.radius, length=shape.length)
    else:
      geom, size, visual_size = pybullet.GEOM_SPHERE, dict(radius=shape.radius), {}
    visual = pybullet.createVisualShape(
        geom, rgbaColor=rgba(shape.colour), visualFramePosition=position,
        visualFrameOrientation=orientation, physicsClientId=c, **(visual_size or size))
    collision = pybullet.createCollisionShape(
        geom, collisionFramePosition=position, collisionFrameOrientation=orientation,
        physicsClientId=c, **size) if shape.collide else -1
    return collision, visual

  def pose(self, body: int) -> tuple[np.ndarray, np.ndarray]:
    """(position (3,), quaternion xyzw (4,)) of a body's base."""
    position, orientation = pybullet.getBasePositionAndOrientation(
        body, physicsClientId=self.client)
    return np.array(position), np.array(orientation)

  def step(self, n: int = 1) -> None:
    for _ in range(n):
      pybullet.stepSimulation(physicsClientId=self.client)

  def close(self) -> None:
    if self.client >= 0:
      pybullet.disconnect(physicsClientId=self.client)
      self.client = -1

  def __enter__(self) -> Scene:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
