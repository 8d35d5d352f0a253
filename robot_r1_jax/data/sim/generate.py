"""Writing demo trees in RLBench's layout: per-episode seeds, retries, idempotence, processes.

    <out>/<task>/variation0/variation_descriptions.pkl
    <out>/<task>/variation0/episodes/episode<K>/low_dim_obs.pkl
    <out>/<task>/variation0/episodes/episode<K>/front_rgb/<i>.png, wrist_rgb/<i>.png

Episode K of a task is a pure function of (seed, task, K, image settings): its seed is derived from
those alone, the scene is rebuilt for it, and a failed attempt (no plan, or the goal not reached) is
retried with the next derived seed, never written. So the tree does not depend on the number of
workers or on which episodes were already on disk, and an interrupted run can simply be restarted:
`rlbench_io.save_demo` renames each episode folder into place complete, and complete folders are
skipped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import multiprocessing
import pathlib
import zlib
from typing import Sequence

import numpy as np
from PIL import Image
import tqdm

from robot_r1_jax.data import rlbench_io
from robot_r1_jax.data.sim.episode import Episode, RenderConfig, Simulator
from robot_r1_jax.data.sim.robot import PlanningError
from robot_r1_jax.data.sim.tasks import TASKS

VARIATION = 0
MAX_ATTEMPTS = 25


def episode_seed(seed: int, task: str, episode: int, attempt: int) -> int:
  """The simulator seed of one attempt at one episode (stable across processes: no `hash()`)."""
  entropy = [seed, zlib.crc32(task.encode()), episode, attempt]
  return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])


def episode_dir(out: str | pathlib.Path, task: str, episode: int) -> pathlib.Path:
  return (pathlib.Path(out) / task / f"variation{VARIATION}" / "episodes" / f"episode{episode}")


def record_successful(simulator: Simulator, task: str, episode: int, seed: int,
                      config: RenderConfig) -> Episode:
  """The first successful attempt at episode `episode` of `task` (raises after MAX_ATTEMPTS)."""
  for attempt in range(MAX_ATTEMPTS):
    attempt_seed = episode_seed(seed, task, episode, attempt)
    try:
      result = simulator.run(task, attempt_seed, config, attempts=attempt + 1)
    except PlanningError as e:
      logging.info("%s episode %d: attempt %d (seed %d) not planned: %s", task, episode, attempt,
                   attempt_seed, e)
      continue
    if result.success:
      return result
    logging.info("%s episode %d: attempt %d (seed %d) missed the goal", task, episode, attempt,
                 attempt_seed)
  raise RuntimeError(f"{task} episode {episode}: no successful attempt in {MAX_ATTEMPTS} (seed "
                     f"{seed}); the task's object placement or expert needs fixing")


def _check_existing(path: pathlib.Path, config: RenderConfig) -> bool:
  """True when `path` holds a finished episode made with the same image settings."""
  if not (path / rlbench_io.LOW_DIM_PICKLE).is_file():
    return False
  for camera in config.cameras:
    first = path / f"{camera}_rgb" / "0.png"
    if not first.is_file():
      raise ValueError(f"{path} has no {camera} images but --cameras includes {camera!r}; write to "
                       "another --out or delete the episode")
    with Image.open(first) as image:
      if image.size != (config.image_size, config.image_size):
        raise ValueError(f"{path} holds {image.size[0]}x{image.size[1]} images but --image_size="
                         f"{config.image_size}; write to another --out or delete the episode")
  return True


@dataclasses.dataclass(frozen=True)
class _Job:
  task: str
  episode: int
  seed: int
  out: str
  config: RenderConfig


_SIMULATOR: Simulator | None = None  # One per worker process, reused across its jobs.


def _write(simulator: Simulator, job: _Job) -> None:
  result = record_successful(simulator, job.task, job.episode, job.seed, job.config)
  rlbench_io.save_demo(result.demo, episode_dir(job.out, job.task, job.episode), result.images)


def _worker(job: _Job) -> None:
  global _SIMULATOR
  if _SIMULATOR is None:
    _SIMULATOR = Simulator()
  _write(_SIMULATOR, job)


@dataclasses.dataclass(frozen=True)
class Summary:
  written: int
  skipped: int  # Already complete on disk.


def generate(out: str | pathlib.Path, tasks: Sequence[str], episodes: int, *, seed: int = 0,
             config: RenderConfig = RenderConfig(), workers: int = 1,
             progress: bool = True) -> Summary:
  """Writes `episodes` successful episodes per task under `out`, skipping finished ones.

  Args:
    out: the demo tree's root.
    tasks: task names (see `tasks.TASKS`).
    episodes: episodes per task (numbered 0 … episodes-1).
    seed: the base seed every episode's seed derives from.
    config: image size and cameras.
    workers: processes; 1 runs in this process.
    progress: show a tqdm bar.
  """
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown or not tasks:
    raise ValueError(f"--tasks: unknown {unknown or 'none given'}; available: "
                     f"{', '.join(sorted(TASKS))}")
  if episodes < 1:
    raise ValueError(f"--episodes={episodes} must be >= 1")
  if workers < 1:
    raise ValueError(f"--workers={workers} must be >= 1")
  jobs, skipped = [], 0
  for task in tasks:
    rlbench_io.save_variation_descriptions(episode_dir(out, task, 0).parents[1],
                                           list(TASKS[task].descriptions))
    for k in range(episodes):
      if _check_existing(episode_dir(out, task, k), config):
        skipped += 1
      else:
        jobs.append(_Job(task, k, seed, str(out), config))
  bar = tqdm.tqdm(total=len(jobs), desc="sim", unit="episode", disable=not progress)
  with bar:
    if workers == 1 or len(jobs) <= 1:
      with Simulator() as simulator:
        for job in jobs:
          _write(simulator, job)
          bar.update()
    else:
      # spawn, not fork: pybullet clients and absl state must not be shared with the parent.
      context = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), context) as pool:
        for future in concurrent.futures.as_completed([pool.submit(_worker, j) for j in jobs]):
          future.result()
          bar.update()
  return Summary(written=len(jobs), skipped=skipped)
