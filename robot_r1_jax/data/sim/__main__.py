"""Generates scripted Panda demonstrations in RLBench's on-disk format.

    python -m robot_r1_jax.data.sim --out DIR [--tasks train|held_out|all|a,b] [--episodes 5]
        [--image_size 128] [--cameras front,wrist] [--seed 0] [--workers 1]

Re-running with the same flags skips the episodes already on disk (see `generate`).
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from robot_r1_jax.data.sim.episode import RenderConfig, task_names
from robot_r1_jax.data.sim.generate import generate

_OUT = flags.DEFINE_string("out", None, "Root folder of the demo tree.", required=True)
_TASKS = flags.DEFINE_list(
    "tasks", ["train"], "Task names, or 'train' (Robot-R1's five), 'held_out', 'all'.")
_EPISODES = flags.DEFINE_integer("episodes", 5, "Episodes per task.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Square image side (Robot-R1: 224).")
_CAMERAS = flags.DEFINE_list("cameras", ["front", "wrist"], "Cameras to render.")
_SEED = flags.DEFINE_integer("seed", 0, "Base seed; every episode's seed derives from it.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Worker processes.")

_GROUPS = {"train": lambda: task_names(held_out=False),
           "held_out": lambda: task_names(held_out=True), "all": task_names}


def _expand(names: Sequence[str]) -> list[str]:
  tasks = []
  for name in names:
    for task in _GROUPS[name]() if name in _GROUPS else [name]:
      if task not in tasks:
        tasks.append(task)
  return tasks


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = RenderConfig(image_size=_IMAGE_SIZE.value, cameras=tuple(_CAMERAS.value))
  except ValueError as e:  # RenderConfig's field names are the flag names.
    raise app.UsageError(f"--{e}") from e
  try:
    summary = generate(_OUT.value, _expand(_TASKS.value), _EPISODES.value, seed=_SEED.value,
                       config=config, workers=_WORKERS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  logging.info("wrote %d episodes, skipped %d already on disk, under %s", summary.written,
               summary.skipped, _OUT.value)


if __name__ == "__main__":
  app.run(main)
