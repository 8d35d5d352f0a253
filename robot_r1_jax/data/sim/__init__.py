"""A pybullet tabletop simulator writing scripted Franka Panda demonstrations in RLBench's format.

RLBench needs CoppeliaSim; this needs only `pybullet` (the `[sim]` extra). It renders real images of
a real arm, records RLBench's Observation fields and writes episodes through `data.rlbench_io`, so
everything downstream reads them exactly as it reads RLBench demos.

Modules, by concept:
  scene:    RLBench's world frame (table top z = 0.752, centre (0.25, 0, 0.752)), primitive bodies.
  camera:   front and wrist cameras; PyRep-convention intrinsics/extrinsics; rendering; projection.
  robot:    the Panda: IK, servos, gripper, grasp constraint, state readout.
  expert:   straight-line moves, pauses and gripper actions timed for ARM's keyframe rule.
  objects:  task objects from boxes, cylinders and spheres.
  tasks:    the registry `TASKS` (analogues of Robot-R1's 5 training tasks + held-out tasks).
  episode:  `Simulator.run(task, seed, RenderConfig) -> Episode`.
  generate: `generate(out, tasks, episodes, ...)`: the demo tree; idempotent, multi-process.
  contact_sheet: `make_contact_sheet(...)`, a PNG of a few frames per task (not imported here, so
            that `python -m robot_r1_jax.data.sim.contact_sheet` runs without a runpy warning).

CLI: `python -m robot_r1_jax.data.sim --out DIR --tasks a,b --episodes N --image_size 128 --seed S
[--workers K]`.
"""

from robot_r1_jax.data.sim.camera import (FRONT_CAMERA, WRIST_CAMERA, CameraSpec, intrinsics,
                                          project, render)
from robot_r1_jax.data.sim.episode import CAMERAS, Episode, RenderConfig, Simulator, task_names
from robot_r1_jax.data.sim.expert import Waypoint
from robot_r1_jax.data.sim.generate import (Summary, episode_dir, episode_seed, generate,
                                            record_successful)
from robot_r1_jax.data.sim.robot import PlanningError
from robot_r1_jax.data.sim.scene import TABLE_CENTRE, TABLE_TOP_Z
from robot_r1_jax.data.sim.tasks import TASKS, Task
