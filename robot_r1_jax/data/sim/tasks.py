"""The tasks: analogues of Robot-R1's five RLBench training tasks plus held-out ones.

Each task builds its objects with randomised poses and colours (variation 0 fixes the colour its
descriptions name), scripts the expert's waypoints from the settled scene, and checks success the
way RLBench's success conditions do (object lifted, button pressed, object inside the bin, …).
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar, Sequence

import numpy as np

from robot_r1_jax.data.sim import objects
from robot_r1_jax.data.sim.expert import Waypoint
from robot_r1_jax.data.sim.robot import FINGERTIP_DEPTH, Panda
from robot_r1_jax.data.sim.scene import COLOURS, TABLE_TOP_Z, Scene

# Where objects may stand: in reach of a top-down grasp, in view of the front camera.
REGION_LOW = (0.0, -0.28)
REGION_HIGH = (0.34, 0.28)
APPROACH = 0.15  # Pre-grasp / pre-place height above the grasp point.
LIFT = 0.2


class Task(abc.ABC):
  """One episode of a task: builds the objects on construction."""

  name: ClassVar[str]
  descriptions: ClassVar[tuple[str, ...]]
  held_out: ClassVar[bool] = False  # Not among Robot-R1's training tasks.
  gripper_open_at_start: ClassVar[bool] = True

  def __init__(self, scene: Scene, rng: np.random.Generator):
    self.scene = scene
    self.bodies: dict[str, int] = {}  # The objects whose poses form task_low_dim_state.
    self.build(rng)

  @abc.abstractmethod
  def build(self, rng: np.random.Generator) -> None:
    """Creates the objects."""

  @abc.abstractmethod
  def waypoints(self) -> list[Waypoint]:
    """The expert's script, from the scene as it is at frame 0."""

  @abc.abstractmethod
  def success(self, panda: Panda) -> bool:
    """Whether the goal is reached (checked after the last frame)."""

  def graspable(self) -> tuple[int, ...]:
    return ()

  def observe(self) -> None:
    """Called at every recorded frame (for conditions that latch, like a pressed button)."""

  def low_dim_state(self) -> np.ndarray:
    """Poses [x, y, z, qx, qy, qz, qw] of the task's objects, concatenated (RLBench's layout)."""
    return np.concatenate([np.concatenate(self.scene.pose(b)) for b in self.bodies.values()])


def _other_colours(rng: np.random.Generator, exclude: Sequence[str], count: int) -> list[str]:
  choices = sorted(set(COLOURS) - set(exclude) - {"black", "white", "grey", "brown"})
  return [str(c) for c in rng.choice(choices, size=count, replace=False)]


def _place(rng: np.random.Generator, radii: Sequence[float],
           low: Sequence[float] = REGION_LOW, high: Sequence[float] = REGION_HIGH) -> list[tuple]:
  """Non-overlapping (x, y, yaw) for objects with the given footprint radii (rejection sampling)."""
  for _ in range(1000):
    placed = []
    for radius in radii:
      x, y = rng.uniform(np.add(low, radius), np.subtract(high, radius))
      if all(math.hypot(x - px, y - py) > radius + pr + 0.03 for px, py, _, pr in placed):
        placed.append((float(x), float(y), float(rng.uniform(-math.pi, math.pi)), radius))
      else:
        break
    if len(placed) == len(radii):
      return [p[:3] for p in placed]
  raise RuntimeError(f"could not place objects of radii {list(radii)} in the region")


def _pick(position: np.ndarray, yaw: float, grasp_z: float) -> list[Waypoint]:
  """Above the object, down to the grasp, close, lift straight up."""
  x, y = float(position[0]), float(position[1])
  return [Waypoint((x, y, grasp_z + APPROACH), yaw),
          Waypoint((x, y, grasp_z), yaw, gripper="close", ignore_collisions=True),
          Waypoint((x, y, grasp_z + LIFT), yaw)]


class PickUpCup(Task):
  name = "pick_up_cup"
  descriptions = ("pick up the red cup", "lift the red cup off the table",
                  "grasp the red cup and raise it")

  def build(self, rng: np.random.Generator) -> None:
    (x, y, yaw), (dx, dy, dyaw) = _place(rng, [0.06, 0.06])
    self.bodies["cup"] = objects.cup(self.scene, x, y, yaw, "red")
    self.bodies["distractor"] = objects.cup(self.scene, dx, dy, dyaw,
                                            _other_colours(rng, ["red"], 1)[0])

  def waypoints(self) -> list[Waypoint]:
    cup = self.bodies["cup"]
    # At the cup's own yaw the fingers close along its y axis, clear of the handle on its x axis.
    yaw = objects.grasp_yaw(objects.body_yaw(self.scene, cup))
    return _pick(objects.xy(self.scene, cup), yaw, TABLE_TOP_Z + objects.CUP_HEIGHT * 0.6)

  def graspable(self) -> tuple[int, ...]:
    return (self.bodies["cup"],)

  def success(self, panda: Panda) -> bool:
    cup = self.bodies["cup"]
    return panda.grasped == cup and self.scene.pose(cup)[0][2] > TABLE_TOP_Z + 0.1


class PushButton(Task):
  name = "push_button"
  descriptions = ("push the red button", "press the red button", "press down the red button")
  gripper_open_at_start = False  # The closed fingers make a pad that fits on the cap.

  def build(self, rng: np.random.Generator) -> None:
    ((x, y, yaw),) = _place(rng, [0.08])
    self.bodies["button"] = objects.button(self.scene, x, y, "red",
                                           _other_colours(rng, ["red"], 1)[0])
    self._yaw = objects.grasp_yaw(yaw)
    self.deepest = 0.0

  def waypoints(self) -> list[Waypoint]:
    x, y = objects.xy(self.scene, self.bodies["button"])
    cap_top = TABLE_TOP_Z + objects.BUTTON_BASE_HEIGHT + objects.BUTTON_CAP_HEIGHT
    touch = cap_top + FINGERTIP_DEPTH
    return [Waypoint((x, y, touch + APPROACH), self._yaw),
            Waypoint((x, y, touch - 0.01), self._yaw, ignore_collisions=True),
            Waypoint((x, y, touch + LIFT), self._yaw)]

  def observe(self) -> None:
    self.deepest = max(self.deepest, objects.button_depth(self.scene, self.bodies["button"]))

  def success(self, panda: Panda) -> bool:
    return self.deepest > 0.006

  def low_dim_state(self) -> np.ndarray:
    depth = objects.button_depth(self.scene, self.bodies["button"])
    return np.concatenate([super().low_dim_state(), [depth]])


def _place_on(position: np.ndarray, yaw: float, release_z: float, carry_z: float) -> list[Waypoint]:
  """Carry over the goal, lower, release, back off upwards (the episode's final move)."""
  x, y = float(position[0]), float(position[1])
  return [Waypoint((x, y, max(carry_z, release_z + APPROACH)), yaw),
          Waypoint((x, y, release_z), yaw, gripper="open", ignore_collisions=True),
          Waypoint((x, y, release_z + APPROACH), yaw)]


class PutRubbishInBin(Task):
  name = "put_rubbish_in_bin"
  descriptions = ("put the rubbish in the bin", "drop the rubbish into the bin",
                  "pick up the rubbish and leave it in the bin",
                  "throw away the rubbish, leaving it in the bin")

  def build(self, rng: np.random.Generator) -> None:
    (bx, by, byaw), (rx, ry, ryaw), *tomatoes = _place(rng, [0.13, 0.03, 0.035, 0.035])
    self.bodies["bin"] = objects.bin_(self.scene, bx, by, byaw, _other_colours(rng, ["red"], 1)[0])
    rubbish_colour = str(rng.choice(["white", "grey", "yellow", "cyan"]))
    self.bodies["rubbish"] = objects.rubbish(self.scene, rx, ry, ryaw, rubbish_colour)
    for i, (tx, ty, _) in enumerate(tomatoes):
      self.bodies[f"tomato{i}"] = objects.ball(self.scene, tx, ty, 0.025, "red")

  def waypoints(self) -> list[Waypoint]:
    scene, rubbish, bin_ = self.scene, self.bodies["rubbish"], self.bodies["bin"]
    grasp_z = TABLE_TOP_Z + 0.02
    pick = _pick(objects.xy(scene, rubbish),
                 objects.grasp_yaw(objects.body_yaw(scene, rubbish)), grasp_z)
    top = TABLE_TOP_Z + objects.BIN_HEIGHT
    yaw = pick[-1].yaw
    x, y = objects.xy(scene, bin_)
    # Released over the middle of the bin, high enough that it drops in clear of the walls.
    return pick + [Waypoint((float(x), float(y), top + 0.12), yaw, gripper="open"),
                   Waypoint((float(x), float(y), top + 0.12 + APPROACH), yaw)]

  def graspable(self) -> tuple[int, ...]:
    return (self.bodies["rubbish"],)

  def success(self, panda: Panda) -> bool:
    local = objects.in_frame(self.scene, self.bodies["bin"], self.scene.pose(
        self.bodies["rubbish"])[0])
    inner = objects.BIN_HALF - objects.BIN_WALL
    return (panda.grasped is None and abs(local[0]) < inner and abs(local[1]) < inner
            and local[2] < objects.BIN_HEIGHT)


class PhoneOnBase(Task):
  name = "phone_on_base"
  descriptions = ("put the phone on the base", "place the phone on its base",
                  "grasp the phone and put it on the base", "put the phone back on the base")

  def build(self, rng: np.random.Generator) -> None:
    (px, py, pyaw), (dx, dy, dyaw) = _place(rng, [0.07, 0.1])
    colours = _other_colours(rng, [], 2)
    self.bodies["phone"] = objects.phone(self.scene, px, py, pyaw, colours[0])
    self.bodies["base"] = objects.dock(self.scene, dx, dy, dyaw, colours[1])

  def waypoints(self) -> list[Waypoint]:
    scene, phone, dock = self.scene, self.bodies["phone"], self.bodies["base"]
    thickness = 2 * objects.PHONE_HALF[2]
    grasp_above_bottom = thickness - 0.012
    pick = _pick(objects.xy(scene, phone), objects.grasp_yaw(objects.body_yaw(scene, phone)),
                 TABLE_TOP_Z + grasp_above_bottom)
    dock_top = TABLE_TOP_Z + 2 * objects.DOCK_HALF[2]
    # The phone is symmetric under a half turn: align it with the base the shorter way round.
    yaw = objects.nearest_yaw(objects.body_yaw(scene, dock), pick[-1].yaw, math.pi)
    return pick + _place_on(objects.xy(scene, dock), yaw, dock_top + grasp_above_bottom + 0.006,
                            pick[-1].position[2])

  def graspable(self) -> tuple[int, ...]:
    return (self.bodies["phone"],)

  def success(self, panda: Panda) -> bool:
    position = self.scene.pose(self.bodies["phone"])[0]
    local = objects.in_frame(self.scene, self.bodies["base"], position)
    lx, ly, lz = objects.DOCK_HALF
    return (panda.grasped is None and abs(local[0]) < lx and abs(local[1]) < ly
            and 2 * lz - 0.004 < local[2] < 2 * lz + 0.01)


class TakeLidOffSaucepan(Task):
  name = "take_lid_off_saucepan"
  descriptions = ("take the lid off the saucepan", "lift the lid off the pan by its handle",
                  "remove the lid from the saucepan", "uncover the saucepan")

  def build(self, rng: np.random.Generator) -> None:
    # The pan and its handle are large: keep them well inside the region.
    ((x, y, yaw),) = _place(rng, [0.0], low=(0.1, -0.15), high=(0.25, 0.15))
    colours = _other_colours(rng, [], 2)
    self.bodies["saucepan"] = objects.saucepan(self.scene, x, y, yaw, colours[0])
    self.bodies["lid"] = objects.lid(self.scene, x, y, colours[1])
    self._yaw = objects.grasp_yaw(float(rng.uniform(-np.pi, np.pi)))

  def waypoints(self) -> list[Waypoint]:
    knob_top = (TABLE_TOP_Z + objects.PAN_HEIGHT + objects.LID_THICKNESS + objects.KNOB_HEIGHT)
    return _pick(objects.xy(self.scene, self.bodies["lid"]), self._yaw, knob_top - 0.016)

  def graspable(self) -> tuple[int, ...]:
    return (self.bodies["lid"],)

  def success(self, panda: Panda) -> bool:
    lid_z = self.scene.pose(self.bodies["lid"])[0][2]
    return panda.grasped == self.bodies["lid"] and lid_z > TABLE_TOP_Z + objects.PAN_HEIGHT + 0.1


class StackBlocks(Task):
  name = "stack_blocks"
  descriptions = ("stack the red block on the blue block", "put the red block on top of the blue "
                  "block", "place the red block onto the blue one")
  held_out = True

  def build(self, rng: np.random.Generator) -> None:
    (ax, ay, ayaw), (bx, by, byaw), (dx, dy, dyaw) = _place(rng, [0.045] * 3)
    self.bodies["red"] = objects.block(self.scene, ax, ay, ayaw, "red")
    self.bodies["blue"] = objects.block(self.scene, bx, by, byaw, "blue")
    self.bodies["distractor"] = objects.block(self.scene, dx, dy, dyaw,
                                              _other_colours(rng, ["red", "blue"], 1)[0])

  def waypoints(self) -> list[Waypoint]:
    scene, red, blue = self.scene, self.bodies["red"], self.bodies["blue"]
    side = 2 * objects.BLOCK_HALF
    grasp_above_bottom = side - 0.018
    pick = _pick(objects.xy(scene, red), objects.grasp_yaw(objects.body_yaw(scene, red)),
                 TABLE_TOP_Z + grasp_above_bottom)
    # Cubes are symmetric under a quarter turn.
    yaw = objects.nearest_yaw(objects.body_yaw(scene, blue), pick[-1].yaw, math.pi / 2)
    return pick + _place_on(objects.xy(scene, blue), yaw,
                            TABLE_TOP_Z + side + grasp_above_bottom + 0.006, pick[-1].position[2])

  def graspable(self) -> tuple[int, ...]:
    return (self.bodies["red"],)

  def success(self, panda: Panda) -> bool:
    red, blue = (self.scene.pose(self.bodies[k])[0] for k in ("red", "blue"))
    side = 2 * objects.BLOCK_HALF
    return (panda.grasped is None and np.linalg.norm(red[:2] - blue[:2]) < objects.BLOCK_HALF
            and abs(red[2] - blue[2] - side) < 0.01)


class ReachTarget(Task):
  name = "reach_target"
  descriptions = ("reach the red target", "touch the red ball with the gripper",
                  "move the gripper to the red sphere")
  held_out = True

  def build(self, rng: np.random.Generator) -> None:
    spots = _place(rng, [0.05] * 3)
    colours = ["red"] + _other_colours(rng, ["red"], 2)
    for i, ((x, y, _), colour) in enumerate(zip(spots, colours)):
      z = TABLE_TOP_Z + float(rng.uniform(0.05, 0.3))
      self.bodies["target" if i == 0 else f"distractor{i}"] = objects.target_marker(
          self.scene, (x, y, z), colour)
    self._yaw = objects.grasp_yaw(float(rng.uniform(-np.pi, np.pi)))

  def waypoints(self) -> list[Waypoint]:
    position = self.scene.pose(self.bodies["target"])[0]
    return [Waypoint(tuple(float(v) for v in position), self._yaw)]

  def success(self, panda: Panda) -> bool:
    target = self.scene.pose(self.bodies["target"])[0]
    return float(np.linalg.norm(panda.state().gripper_pose[:3] - target)) < 0.02


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    PickUpCup, PushButton, PutRubbishInBin, PhoneOnBase, TakeLidOffSaucepan, StackBlocks,
    ReachTarget)}
