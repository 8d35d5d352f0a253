"""The training loop every stage runs.

    resume (params, optimizer state, data iterator) → (batch → step → metrics → [eval] →
    [checkpoint])* → final save

A stage supplies a trainer (its `params`, `opt_state`, `bad_steps` and `commit()`) and a step
function returning a `StepResult`; this loop owns checkpoints, preemption, metrics, evaluation and
the progress bar.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np
from etils import epath

from robot_r1_jax.train import processes
from robot_r1_jax.train.checkpoint import Checkpointer, PreemptionGuard
from robot_r1_jax.train.metrics import MetricsWriter, ProgressBar


class TrainingStopped(RuntimeError):
  """Training cannot go on (e.g. repeated non-finite updates); the last good state was saved."""


class Trainer(Protocol):
  params: Any
  opt_state: Any
  bad_steps: int  # consecutive steps whose update was skipped as non-finite

  def commit(self) -> None:
    """Makes the model object hold `params` (samplers and evaluation read it)."""


class Evaluation(Protocol):
  """What an evaluation callback returns (e.g. `stages.evaluate.EvalResult`)."""

  def scalars(self) -> dict[str, float]: ...

  def write(self, path: epath.Path) -> Any: ...


@dataclasses.dataclass(frozen=True)
class StepResult:
  """What one training step reports, in SFT and RL alike.

  The arrays are this process's rows; only an RL step has them (and rollouts).
  """

  metrics: dict[str, float]  # scalars for logging
  rollouts: list[dict[str, Any]] | None = None  # one record per completion, for rollouts.jsonl
  scores: np.ndarray | None = None  # [B·G] total rewards
  advantages: np.ndarray | None = None  # [B·G, R]
  completion_mask: np.ndarray | None = None  # [B·G, R]


# step(batch, step number) → what happened; the number seeds per-step randomness.
StepFn = Callable[[Any, int], StepResult]


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """The bookkeeping every stage's loop shares (one set of flags)."""

  checkpoint_every: int = 10
  keep_checkpoints: int = 3
  max_consecutive_bad_steps: int = 3
  log_rollouts_every: int = 1
  eval_every: int = 0  # steps between evaluations (0: none; also skips the final one)

  def __post_init__(self):
    for name in ("checkpoint_every", "keep_checkpoints", "max_consecutive_bad_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"LoopSettings.{name}={getattr(self, name)} must be >= 1")
    for name in ("log_rollouts_every", "eval_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"LoopSettings.{name}={getattr(self, name)} must be >= 0")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  workdir: epath.Path  # local, or an object store (gs://…)
  total_steps: int  # the run ends at this step (resumed runs continue up to it)
  stage: str = "rl"  # recorded in checkpoint meta; names the progress bar
  settings: LoopSettings = LoopSettings()
  progress: tuple[tuple[str, str], ...] = ()  # (label, metric) pairs on the progress bar
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. the flags
  # Called on process 0 with each step's logged rollouts (all processes' rows) and the run's
  # writer before they are written, e.g. to save the questions and images the rollouts viewer
  # shows beside them.
  on_rollouts: Callable[[list[dict[str, Any]], MetricsWriter], None] | None = None

  def __post_init__(self):
    if self.total_steps < 1:
      raise ValueError(f"LoopConfig.total_steps={self.total_steps} must be >= 1")


def run(trainer: Trainer, step_fn: StepFn, data: Iterator[Any], config: LoopConfig,
        evaluate: Callable[[], Evaluation] | None = None) -> list[dict[str, float]]:
  """Trains until `config.total_steps`, resuming from the newest checkpoint in the workdir.

  `data` is a checkpointable grain iterator. Returns this session's per-step metrics. A SIGTERM
  saves the current step and returns; `max_consecutive_bad_steps` skipped (non-finite) updates in
  a row save and raise `TrainingStopped`. `evaluate` runs every `eval_every` steps and after the
  last; its scalars go to the metrics and its full result to `workdir/eval/step_<N>.json`.
  """
  workdir, settings = epath.Path(config.workdir), config.settings
  checkpoints = Checkpointer(workdir / "checkpoints", max_to_keep=settings.keep_checkpoints)
  writer = MetricsWriter(workdir)
  state = lambda: {"params": trainer.params, "opt_state": trainer.opt_state}
  last_saved = 0

  def save(step: int, metrics: dict[str, float] | None = None) -> None:
    nonlocal last_saved
    last_saved = step
    checkpoints.save(step, state(), data_iterator=data, force=True,
                     meta={"stage": config.stage, "config": config.meta,
                           "metrics": metrics or {}})
    writer.flush()

  history: list[dict[str, float]] = []
  try:
    last_saved = step = _resume(trainer, checkpoints, data, config)
    writer.truncate_after(step)
    with PreemptionGuard() as guard, ProgressBar(config.total_steps, initial=step,
                                                 desc=config.stage) as bar:
      while step < config.total_steps:
        # Batch → step → metrics.
        try:
          batch = next(data)
        except StopIteration:
          logging.info("data exhausted after step %d", step)
          break
        step += 1
        out = step_fn(batch, step)
        history.append({**out.metrics, "step": step})
        writer.scalars(step, out.metrics)
        if out.rollouts is not None and settings.log_rollouts_every and (
            step % settings.log_rollouts_every == 0):
          # Every process's rows (a collective), written by process 0.
          rollouts = [r for part in processes.gather_json(out.rollouts) for r in part]
          if config.on_rollouts is not None and writer.enabled:
            config.on_rollouts(rollouts, writer)
          writer.rollouts(step, rollouts)
        bar.update(step, {label: out.metrics[key] for label, key in config.progress
                          if key in out.metrics})

        # Evaluation.
        if evaluate is not None and settings.eval_every and (
            step % settings.eval_every == 0 or step == config.total_steps):
          result = evaluate()
          writer.scalars(step, result.scalars())
          if jax.process_index() == 0:
            result.write(workdir / "eval" / f"step_{step}.json")

        # Stop on repeated non-finite updates, keeping the last finite parameters.
        if trainer.bad_steps >= settings.max_consecutive_bad_steps:
          save(step, out.metrics)
          raise TrainingStopped(
              f"{trainer.bad_steps} consecutive {config.stage} steps produced non-finite loss or "
              f"gradients (last: step {step}); parameters are those of the last finite update, "
              f"saved in {workdir / 'checkpoints'}. Lower the learning rate or check the data.")

        # Checkpoint: periodic, final, or on preemption (agreed across processes).
        preempted = guard.sync_requested()
        if preempted or step % settings.checkpoint_every == 0 or step == config.total_steps:
          save(step, out.metrics)
        if preempted:
          logging.warning("SIGTERM: saved %s step %d and stopping", config.stage, step)
          break
      if step != last_saved:
        save(step)  # the data ran out between checkpoints
  finally:
    checkpoints.close()
    writer.close()
  return history


def _resume(trainer: Trainer, checkpoints: Checkpointer, data: Iterator[Any],
            config: LoopConfig) -> int:
  """Restores the newest checkpoint into `trainer` and `data`; returns its step (0 if none)."""
  # Live arrays describe the target: restore reshards onto their placements.
  found = checkpoints.restore_newest_good(
      abstract_state={"params": trainer.params, "opt_state": trainer.opt_state},
      data_iterator=data)
  if found is None:
    return 0
  start, (restored, _) = found
  trainer.params, trainer.opt_state = restored["params"], restored["opt_state"]
  trainer.commit()
  logging.info("%s resumed from %s at step %d", config.stage, checkpoints.directory, start)
  return start


def total_steps(max_steps: int, steps_per_epoch: int, epochs: int) -> int:
  """`max_steps` when set, else the steps of `epochs` passes over the data."""
  return max_steps if max_steps > 0 else max(1, math.ceil(steps_per_epoch * epochs))
