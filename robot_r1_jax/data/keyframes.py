"""Keyframe discovery with ARM's rule (James et al.; used by PerAct, RVT and Robot-R1).

Frame i != 0 is a keyframe when the gripper's open state differs from frame i-1, when i is the last
frame, or when the arm is stopped: every joint velocity within ±`stopping_delta`, the gripper state
equal over frames i-2 … i+1, i not the second-to-last frame, and a stopped-buffer counter (reset to
`stopped_buffer` at each stop, decremented on every other frame) at or below zero. If the last two
keyframes are adjacent frames, the earlier one is dropped.

At i = 0 and 1 the rule reads frames i-1 and i-2, which Python's negative indexing turns into the
episode's last frames. That is ARM's behaviour and it is reproduced on purpose: published
keyframes (and the Robot-R1 questions cut at them) depend on it. E.g. frame 0 counts as "stopped"
only when the episode ends with the same gripper state it starts with, and that stop arms the
buffer, which then suppresses stops at frames 1-4.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from robot_r1_jax.data.demo import Demo, DemoError, Observation


def discover_keyframes(demo: Demo | Sequence[Observation], *, stopping_delta: float = 0.1,
                       stopped_buffer: int = 4) -> list[int]:
  """Indices of the keyframes of `demo` (ascending; never 0).

  Args:
    demo: a Demo or a sequence of observations with `gripper_open` and `joint_velocities`.
    stopping_delta: a joint counts as still when |velocity| <= this (rad/s).
    stopped_buffer: frames after a stop before another stop can count.
  """
  n = len(demo)
  gripper = [_gripper_open(demo, i) for i in range(n)]
  still = [_is_still(demo, i, stopping_delta) for i in range(n)]
  keyframes = []
  buffer = 0
  for i in range(n):
    # gripper[i - 1] and gripper[i - 2] wrap to the episode end at i = 0, 1 (module docstring).
    gripper_steady = (i < n - 2 and gripper[i] == gripper[i + 1] and gripper[i] == gripper[i - 1]
                      and gripper[i - 2] == gripper[i - 1])
    stopped = buffer <= 0 and still[i] and i != n - 2 and gripper_steady
    buffer = stopped_buffer if stopped else buffer - 1
    if i != 0 and (gripper[i] != gripper[i - 1] or i == n - 1 or stopped):
      keyframes.append(i)
  if len(keyframes) > 1 and keyframes[-1] - 1 == keyframes[-2]:
    keyframes.pop(-2)
  return keyframes


def _gripper_open(demo: Demo | Sequence[Observation], i: int) -> float:
  value = demo[i].gripper_open
  if value is None:
    raise DemoError(f"observation {i} has no gripper_open; keyframes need it")
  return value


def _is_still(demo: Demo | Sequence[Observation], i: int, delta: float) -> bool:
  velocities = demo[i].joint_velocities
  if velocities is None:
    raise DemoError(f"observation {i} has no joint_velocities; keyframes need them")
  # ARM uses np.allclose(v, 0, atol=delta): |v| <= delta, and NaN never counts as still.
  return bool(np.all(np.abs(np.asarray(velocities, np.float64)) <= delta))
