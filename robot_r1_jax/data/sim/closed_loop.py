"""Closed-loop episodes: a policy, not the expert, chooses where the arm goes at every keyframe.

An episode of a task from a seed is first run by the expert without images (a dry run): its
keyframes' gripper positions are the truths the policy is asked for, exactly as the extractor
labels a recorded demo, and a seed whose expert run fails is no episode at all (`EpisodeError`).
The scene is then rebuilt from the same seed and driven step by step:

    episode = ClosedLoopEpisode("pick_up_cup", seed, image_size=64)
    while (view := episode.observe()) is not None:   # the front camera at a keyframe
      episode.act(answer_position(view))               # or None: the arm holds still
    episode.success()

`act` moves the grasp point to the answered position with the expert's orientation, pause and
gripper action of that keyframe. A position the arm cannot reach on a straight line (IK fails or
jumps branches) is treated as no answer: the arm holds still and the gripper action still happens.
Physics is deterministic, so answering the expert's positions replays the expert (up to the
3-decimal rounding of printed positions).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import numpy as np

from robot_r1_jax.data.sim import camera as camera_lib
from robot_r1_jax.data.sim.episode import SETTLE_STEPS, RenderConfig, Simulator
from robot_r1_jax.data.sim.expert import Waypoint, act_gripper, execute
from robot_r1_jax.data.sim.robot import Panda, PlanningError
from robot_r1_jax.data.sim.tasks import TASKS

XYZ3 = tuple[float, float, float]
_HELD_OUT_STREAM = 1  # Entropy word that keeps closed-loop seeds apart from `generate`'s.


class EpisodeError(RuntimeError):
  """The expert itself fails (or cannot plan) the episode of this seed."""


def closed_loop_seed(seed: int, task: str, episode: int, attempt: int) -> int:
  """The simulator seed of a closed-loop episode: drawn from a stream `generate` never uses (its
  entropy has one more word), so no evaluation scene is a training demo's."""
  entropy = [seed, zlib.crc32(task.encode()), episode, attempt, _HELD_OUT_STREAM]
  return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])


@dataclasses.dataclass(frozen=True)
class View:
  """What the policy is shown before keyframe `index`."""

  index: int  # The keyframe to be answered, 0-based.
  frame: int  # Frames recorded so far (the demo frame this view corresponds to).
  image: np.ndarray  # uint8 [H, W, 3], front camera.
  state_xyz: XYZ3  # The grasp point now.
  expert_xyz: XYZ3  # The expert's gripper position at this keyframe: the right answer.


class ClosedLoopEpisode:
  """One seeded episode of `task` in its own pybullet clients (so episodes can run side by side)."""

  def __init__(self, task: str, seed: int, *, image_size: int = 128):
    if task not in TASKS:
      raise ValueError(f"unknown task {task!r}; available: {', '.join(sorted(TASKS))}")
    self.task, self.seed, self.image_size = task, int(seed), image_size
    self.description = TASKS[task].descriptions[0]  # as the extractor phrases it
    self._sim = Simulator()
    try:
      dry = self._sim.run(task, seed, RenderConfig(render=False, cameras=(camera_lib.FRONT,)))
    except PlanningError as e:
      self.close()
      raise EpisodeError(f"{task} seed {seed}: the expert cannot plan it ({e})") from e
    if not dry.success:
      self.close()
      raise EpisodeError(f"{task} seed {seed}: the expert's own run fails")
    self.expert_xyz: list[XYZ3] = [
        tuple(float(v) for v in dry.demo[k].gripper_pose[:3]) for k in dry.keyframes]
    scene = self._sim.scene
    scene.reset()
    self._task = TASKS[task](scene, np.random.default_rng(seed))
    self._panda = Panda(scene, self._task.gripper_open_at_start)
    scene.step(SETTLE_STEPS)
    self._waypoints: list[Waypoint] = self._task.waypoints()
    assert len(self._waypoints) == len(self.expert_xyz)  # one keyframe per waypoint, by design
    self._q = self._panda.joint_positions()
    self._frames = 0
    self._record(False)  # frame 0
    self.moved: list[XYZ3 | None] = []  # per keyframe: the position moved to, or None
    self.views: list[View] = []

  def observe(self) -> View | None:
    """The view before the next keyframe, or None when every keyframe has been answered."""
    index = len(self.moved)
    if index == len(self._waypoints):
      return None
    state = self._panda.state()
    image = camera_lib.render(self._sim.scene.client, camera_lib.FRONT_CAMERA,
                              camera_lib.front_pose(), self.image_size).rgb
    view = View(index=index, frame=self._frames - 1, image=image,
                state_xyz=tuple(float(v) for v in state.gripper_pose[:3]),
                expert_xyz=self.expert_xyz[index])
    self.views.append(view)
    return view

  def act(self, xyz: Sequence[float] | None) -> None:
    """Executes the current keyframe with the grasp point at `xyz` (None: hold still)."""
    index = len(self.moved)
    if index == len(self._waypoints):
      raise ValueError("the episode is over: every keyframe has been answered")
    expert = self._waypoints[index]
    last = index == len(self._waypoints) - 1
    moved = None
    if xyz is not None:
      waypoint = dataclasses.replace(expert, position=tuple(float(v) for v in xyz))
      try:
        self._q, _ = execute(self._panda, self._sim.kinematics, self._q, waypoint, self._record,
                             self._task.graspable(), last=last, strict=False)
        moved = waypoint.position
      except PlanningError:
        pass  # planning fails before anything moves: the arm holds still, as for no answer
    if moved is None and expert.gripper is not None and not last:
      act_gripper(self._panda, self._q, expert, self._record, self._task.graspable(),
                  strict=False)
    self.moved.append(moved)

  def success(self) -> bool:
    """The task's own success check, in the scene as it is now."""
    return bool(self._task.success(self._panda))

  def _record(self, ignore_collisions: bool) -> int:
    del ignore_collisions
    self._task.observe()  # conditions that latch, like a pressed button
    self._frames += 1
    return self._frames - 1

  def close(self) -> None:
    self._sim.close()

  def __enter__(self) -> ClosedLoopEpisode:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
