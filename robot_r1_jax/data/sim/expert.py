"""The scripted expert: straight-line moves between waypoints, pauses and gripper actions, timed so
that ARM's keyframe rule finds exactly the waypoints the script intends.

The rule (see `robot_r1_jax.data.keyframes`) marks a frame when the gripper state changes, at the
last frame, or when every joint velocity is within ±0.1 rad/s with a steady gripper (after which
stops are ignored for 4 frames). So the expert

* keeps some joint above `MIN_JOINT_SPEED` (well clear of 0.1) on every frame of a move: a
  trapezoidal profile with a short ramp, planned in time at the physics rate, and checked;
* ends each move half a frame before its last frame, so the arm is still when that frame is taken;
* at a pause, holds still for `hold` frames (≤ 5, so the buffer never lets a second stop through);
  the keyframe is the first still frame;
* at a gripper action, records the arrival frame, actuates the fingers without recording (as
  RLBench does unless `record_gripper_closing` is set) and records one frame: the gripper state
  changes there, which is the keyframe, and the arm moves on right after, so no stop is found;
* makes every move at least `MIN_SEGMENT_FRAMES` long, so questions sampled every 10 frames before
  a keyframe exist for every keyframe.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from robot_r1_jax.data.sim.robot import Kinematics, Panda, PlanningError, top_down
from robot_r1_jax.data.sim.scene import FRAME_DT, PHYSICS_HZ, SUBSTEPS, Vec3

MIN_SEGMENT_FRAMES = 11
CRUISE_SPEED = 0.3  # m/s of the grasp point.
TURN_SPEED = 1.2  # rad/s of the gripper's yaw.
RAMP_TIME = 0.6 * FRAME_DT  # Acceleration and deceleration time of the trapezoid.
MIN_JOINT_SPEED = 0.2  # rad/s: the fastest joint on every moving frame (ARM's stop is 0.1).
MAX_PAUSE_FRAMES = 5  # ARM's stopped buffer (4) lets a 6th still frame count as a new stop.
PATH_STEP = 0.01  # Metres between IK samples along a straight line.
MAX_JOINT_JUMP = 0.15  # rad between IK samples; more means the IK jumped to another branch.


@dataclasses.dataclass(frozen=True)
class Waypoint:
  """A grasp-point target with the gripper pointing down, and what happens on arrival.

  Attributes:
    position: world xyz of the grasp point.
    yaw: rotation about z (rad); at 0 the fingers close along world y.
    gripper: "open" or "close" to actuate on arrival, or None for a pause.
    hold: frames the arm stays still on arrival at a pause (the arrival frame included); ignored for
      gripper actions and for the final waypoint, whose arrival is the episode's last frame.
    ignore_collisions: recorded in the observations of the move, like RLBench's waypoint flag.
  """

  position: Vec3
  yaw: float = 0.0
  gripper: str | None = None
  hold: int = 3
  ignore_collisions: bool = False

  def __post_init__(self):
    if self.gripper not in (None, "open", "close"):
      raise ValueError(f"Waypoint.gripper={self.gripper!r} must be None, 'open' or 'close'")
    if not 1 <= self.hold <= MAX_PAUSE_FRAMES:
      raise ValueError(f"Waypoint.hold={self.hold} must be in [1, {MAX_PAUSE_FRAMES}]: a longer "
                       "pause makes ARM's rule find a second keyframe")


@dataclasses.dataclass(frozen=True)
class Segment:
  """A planned move: joint samples along a straight line, and a trapezoidal timing over them."""

  samples: np.ndarray  # [M, 7] configurations at path parameters `params`.
  params: np.ndarray  # [M] in [0, 1], increasing.
  duration: float  # Seconds until the goal is reached.
  frames: int  # Recorded frames; the last one is taken FRAME_DT / 2 after arrival.

  def progress(self, t: float) -> tuple[float, float]:
    """(s, ds/dt) of the trapezoid at time t."""
    ramp = min(RAMP_TIME, self.duration / 2)
    speed = 1.0 / (self.duration - ramp)
    if t <= 0.0 or t >= self.duration:
      return (0.0 if t <= 0.0 else 1.0), 0.0
    if t < ramp:
      return 0.5 * speed / ramp * t * t, speed * t / ramp
    remaining = self.duration - t
    if remaining < ramp:
      return 1.0 - 0.5 * speed / ramp * remaining**2, speed * remaining / ramp
    return 0.5 * speed * ramp + speed * (t - ramp), speed

  def at(self, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Joint positions and velocities at time t (piecewise linear in s between samples)."""
    s, ds = self.progress(t)
    i = int(np.clip(np.searchsorted(self.params, s, side="right") - 1, 0, len(self.params) - 2))
    span = self.params[i + 1] - self.params[i]
    slope = (self.samples[i + 1] - self.samples[i]) / span
    return self.samples[i] + slope * (s - self.params[i]), slope * ds


def _slerp(a: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
  dot = float(np.dot(a, b))
  if dot < 0.0:  # q and -q are the same rotation; take the short way.
    b, dot = -b, -dot
  if dot > 0.9995:
    q = a + s * (b - a)
    return q / np.linalg.norm(q)
  theta = math.acos(dot)
  return (math.sin((1 - s) * theta) * a + math.sin(s * theta) * b) / math.sin(theta)


def plan_segment(kinematics: Kinematics, q_start: np.ndarray, waypoint: Waypoint) -> Segment:
  """Plans a straight-line move of the grasp point from q_start's pose to `waypoint`."""
  p0, o0 = kinematics.forward(q_start)
  p1, o1 = np.asarray(waypoint.position, np.float64), top_down(waypoint.yaw)
  distance = float(np.linalg.norm(p1 - p0))
  angle = 2 * math.acos(min(1.0, abs(float(np.dot(o0, o1)))))
  travel = max(distance / CRUISE_SPEED, angle / TURN_SPEED) + RAMP_TIME
  frames = max(MIN_SEGMENT_FRAMES, math.ceil(travel / FRAME_DT + 0.5))
  count = max(2, math.ceil(distance / PATH_STEP) + 1, math.ceil(angle / 0.05) + 1)
  params = np.linspace(0.0, 1.0, count)
  samples = [np.asarray(q_start, np.float64)]
  for s in params[1:]:
    q = kinematics.inverse(p0 + s * (p1 - p0), _slerp(o0, o1, s), samples[-1])
    if np.max(np.abs(q - samples[-1])) > MAX_JOINT_JUMP:
      raise PlanningError(f"IK branch jump on the way to {np.round(p1, 3).tolist()}")
    samples.append(q)
  segment = Segment(np.stack(samples), params, (frames - 0.5) * FRAME_DT, frames)
  slowest = min(np.max(np.abs(segment.at(k * FRAME_DT)[1])) for k in range(1, frames))
  if slowest < MIN_JOINT_SPEED:
    raise PlanningError(f"the move to {np.round(p1, 3).tolist()} is too slow for ARM's rule "
                        f"(fastest joint {slowest:.3f} rad/s on some frame)")
  return segment


@dataclasses.dataclass
class Script:
  """The expert's record of one episode: which frames it meant to be keyframes."""

  keyframes: list[int] = dataclasses.field(default_factory=list)


def run_expert(panda: Panda, kinematics: Kinematics, waypoints: Sequence[Waypoint],
               record: Callable[[bool], int], graspable: Sequence[int] = ()) -> Script:
  """Executes `waypoints`, calling `record(ignore_collisions)` once per frame (it returns the new
  frame's index). Frame 0 must already be recorded. Returns the intended keyframes."""
  if not waypoints or waypoints[-1].gripper is not None:
    raise ValueError("run_expert needs waypoints, the last of which has no gripper action (its "
                     "arrival is the episode's last frame)")
  script = Script()
  q = panda.joint_positions()
  for n, waypoint in enumerate(waypoints):
    q, keyframe = execute(panda, kinematics, q, waypoint, record, graspable,
                          last=n == len(waypoints) - 1)
    script.keyframes.append(keyframe)
  return script


def execute(panda: Panda, kinematics: Kinematics, q: np.ndarray, waypoint: Waypoint,
            record: Callable[[bool], int], graspable: Sequence[int] = (), *, last: bool = False,
            strict: bool = True) -> tuple[np.ndarray, int]:
  """Moves from configuration `q` to `waypoint` and does what it asks on arrival (see
  `run_expert`); returns the configuration reached and the waypoint's keyframe.

  Raises PlanningError when the move cannot be planned (nothing has moved then) or, if `strict`,
  when a gripper action did not take (closing on nothing is fine for a policy, not the expert).
  """
  segment = plan_segment(kinematics, q, waypoint)
  step = 0
  for _ in range(segment.frames):
    for _ in range(SUBSTEPS):
      step += 1
      panda.command(*segment.at(step / PHYSICS_HZ))
      panda.scene.step()
    frame = record(waypoint.ignore_collisions)
  q = segment.samples[-1]
  panda.command(q, np.zeros(7))
  if last:
    return q, frame
  if waypoint.gripper is not None:
    return q, act_gripper(panda, q, waypoint, record, graspable, strict=strict)
  for _ in range(waypoint.hold - 1):
    panda.scene.step(SUBSTEPS)
    record(waypoint.ignore_collisions)
  return q, frame


def act_gripper(panda: Panda, q: np.ndarray, waypoint: Waypoint, record: Callable[[bool], int],
                graspable: Sequence[int] = (), *, strict: bool = True) -> int:
  """Opens or closes the gripper as `waypoint` asks, the arm holding `q`; returns the frame
  recorded after it (the keyframe)."""
  panda.actuate_gripper(waypoint.gripper == "open", q, graspable)
  if strict and panda.state().gripper_open != (1.0 if waypoint.gripper == "open" else 0.0):
    raise PlanningError(f"the gripper did not {waypoint.gripper} at "
                        f"{np.round(waypoint.position, 3).tolist()}")
  return record(waypoint.ignore_collisions)
