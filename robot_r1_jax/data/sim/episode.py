"""One episode: reset the scene, build a task, run its expert, record RLBench observations."""

from __future__ import annotations

import dataclasses
import numpy as np

from robot_r1_jax.data.demo import Demo, Observation
from robot_r1_jax.data.sim import camera as camera_lib
from robot_r1_jax.data.sim.expert import run_expert
from robot_r1_jax.data.sim.robot import Kinematics, Panda
from robot_r1_jax.data.sim.scene import Scene
from robot_r1_jax.data.sim.tasks import TASKS, Task

CAMERAS = {camera_lib.FRONT: camera_lib.FRONT_CAMERA, camera_lib.WRIST: camera_lib.WRIST_CAMERA}
SETTLE_STEPS = 60  # Physics steps before frame 0, so dropped objects come to rest.


@dataclasses.dataclass(frozen=True)
class RenderConfig:
  """What each frame records besides the low-dimensional state."""

  image_size: int = 128  # Square images; Robot-R1 uses 224.
  cameras: tuple[str, ...] = (camera_lib.FRONT, camera_lib.WRIST)
  render: bool = True  # False: no images (camera metadata is still recorded); for fast checks.

  def __post_init__(self):
    if self.image_size < 16:
      raise ValueError(f"image_size={self.image_size} must be at least 16 pixels")
    unknown = sorted(set(self.cameras) - set(CAMERAS))
    if unknown or not self.cameras:
      raise ValueError(f"cameras={self.cameras}: choose one or more of {sorted(CAMERAS)}")


@dataclasses.dataclass
class Episode:
  """A recorded episode, ready for `rlbench_io.save_demo(demo, dir, images)`."""

  task: str
  seed: int
  demo: Demo
  images: dict[str, list[np.ndarray]]  # Camera name -> one uint8 [H, W, 3] frame per step.
  keyframes: list[int]  # The frames the expert meant to be keyframes.
  success: bool


class _Recorder:
  """Turns the simulator's state into one Observation (and images) per call."""

  def __init__(self, panda: Panda, task: Task, config: RenderConfig):
    self.panda, self.task, self.config = panda, task, config
    self.observations: list[Observation] = []
    self.images: dict[str, list[np.ndarray]] = {
        name: [] for name in config.cameras} if config.render else {}
    self._front = camera_lib.front_pose()

  def record(self, ignore_collisions: bool) -> int:
    self.task.observe()
    state = self.panda.state()
    misc = {}
    for name in self.config.cameras:
      spec = CAMERAS[name]
      pose = (self._front if name == camera_lib.FRONT
              else camera_lib.wrist_pose(state.hand_position, state.hand_orientation))
      misc.update(camera_lib.misc_entries(spec, pose, self.config.image_size))
      if self.config.render:
        self.images[name].append(camera_lib.render(
            self.panda.scene.client, spec, pose, self.config.image_size).rgb)
    self.observations.append(Observation(
        joint_velocities=state.joint_velocities, joint_positions=state.joint_positions,
        joint_forces=state.joint_forces, gripper_open=state.gripper_open,
        gripper_pose=state.gripper_pose, gripper_matrix=state.gripper_matrix,
        gripper_joint_positions=state.gripper_joint_positions,
        gripper_touch_forces=state.gripper_touch_forces,
        task_low_dim_state=self.task.low_dim_state(),
        ignore_collisions=np.array(1.0 if ignore_collisions else 0.0), misc=misc))
    return len(self.observations) - 1


class Simulator:
  """Owns the pybullet clients of one process; runs episodes one after another."""

  def __init__(self):
    self.scene = Scene()
    self.kinematics = Kinematics()

  def run(self, task: str, seed: int, config: RenderConfig = RenderConfig(),
          attempts: int = 1) -> Episode:
    """Records one episode of `task` from `seed` (raises robot.PlanningError when the expert
    cannot plan it; an unsuccessful episode is returned with success=False).

    `attempts` is stored as the demo's num_reset_attempts.
    """
    if task not in TASKS:
      raise ValueError(f"unknown task {task!r}; available: {', '.join(sorted(TASKS))}")
    self.scene.reset()
    instance = TASKS[task](self.scene, np.random.default_rng(seed))
    panda = Panda(self.scene, instance.gripper_open_at_start)
    self.scene.step(SETTLE_STEPS)
    waypoints = instance.waypoints()
    recorder = _Recorder(panda, instance, config)
    recorder.record(False)
    script = run_expert(panda, self.kinematics, waypoints, recorder.record, instance.graspable())
    demo = Demo(recorder.observations, random_seed=int(seed), num_reset_attempts=int(attempts))
    return Episode(task, int(seed), demo, recorder.images, script.keyframes,
                   bool(instance.success(panda)))

  def close(self) -> None:
    self.scene.close()
    self.kinematics.close()

  def __enter__(self) -> Simulator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def task_names(held_out: bool | None = None) -> list[str]:
  """All task names (sorted), or only the training (held_out=False) / held-out (True) ones."""
  return sorted(name for name, cls in TASKS.items() if held_out is None or cls.held_out == held_out)

