"""The training loop shared by the SFT and RL stages.

    resume (params, optimizer state, data iterator) → (batch → step → metrics → [eval] →
    [checkpoint])* → final save

A stage supplies a trainer (its `params`, `opt_state`, `bad_steps` and `commit()`) and a step
function; this loop owns checkpoints, preemption, metrics, evaluation and the progress bar.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from typing import Any, Callable, Iterator, Protocol

import jax

from robot_r1_jax.train.checkpoint import Checkpointer, PreemptionGuard
from robot_r1_jax.train.evaluate import EvalResult
from robot_r1_jax.train.metrics import MetricsWriter, ProgressBar


class TrainingStopped(RuntimeError):
  """Training cannot go on (e.g. repeated non-finite updates); the last good state was saved."""


class Trainer(Protocol):
  params: Any
  opt_state: Any
  bad_steps: int  # consecutive steps whose update was skipped as non-finite

  def commit(self) -> None:
    """Makes the model object hold `params` (samplers and evaluation read it)."""


@dataclasses.dataclass(frozen=True)
class StepOutput:
  metrics: dict[str, float]
  rollouts: list[dict[str, Any]] | None = None  # records for rollouts.jsonl


# step(batch, step number) → what happened; the number seeds per-step randomness.
StepFn = Callable[[Any, int], StepOutput]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  workdir: pathlib.Path
  total_steps: int  # the run ends at this step (resumed runs continue up to it)
  stage: str = "rl"  # recorded in checkpoint meta; names the progress bar
  checkpoint_every: int = 10
  keep_checkpoints: int = 3
  max_consecutive_bad_steps: int = 3
  log_rollouts_every: int = 1
  eval_every: int = 0  # steps between evaluations (0: none; also skips the final one)
  progress: tuple[tuple[str, str], ...] = ()  # (label, metric) pairs on the progress bar
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. the flags

  def __post_init__(self):
    for name in ("total_steps", "checkpoint_every", "keep_checkpoints",
                 "max_consecutive_bad_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"LoopConfig.{name}={getattr(self, name)} must be >= 1")


def run(trainer: Trainer, step_fn: StepFn, data: Iterator[Any], config: LoopConfig,
        evaluate: Callable[[], EvalResult] | None = None) -> list[dict[str, float]]:
  """Trains until `config.total_steps`, resuming from the newest checkpoint in the workdir.

  `data` is a checkpointable grain iterator. Returns this session's per-step metrics. A SIGTERM
  saves the current step and returns; `max_consecutive_bad_steps` skipped (non-finite) updates in
  a row save and raise `TrainingStopped`. `evaluate` runs every `eval_every` steps and after the
  last; its scalars go to the metrics and its full result to `workdir/eval/step_<N>.json`.
  """
  workdir = pathlib.Path(config.workdir)
  checkpoints = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
  writer = MetricsWriter(workdir)
  state = lambda: {"params": trainer.params, "opt_state": trainer.opt_state}
  start = checkpoints.latest_step() or 0
  if start:
    # Live arrays describe the target: restore reshards onto their placements.
    restored, _ = checkpoints.restore(start, abstract_state=state(), data_iterator=data)
    trainer.params, trainer.opt_state = restored["params"], restored["opt_state"]
    trainer.commit()
    logging.info("%s resumed from %s at step %d", config.stage, workdir / "checkpoints", start)
  writer.truncate_after(start)
  last_saved = start

  def save(step: int, metrics: dict[str, float] | None = None) -> None:
    nonlocal last_saved
    last_saved = step
    checkpoints.save(step, state(), data_iterator=data, force=True,
                     meta={"stage": config.stage, "config": config.meta,
                           "metrics": metrics or {}})
    writer.flush()

  history: list[dict[str, float]] = []
  step = start
  try:
    with PreemptionGuard() as guard, ProgressBar(config.total_steps, initial=start,
                                                 desc=config.stage) as bar:
      while step < config.total_steps:
        try:
          batch = next(data)
        except StopIteration:
          logging.info("data exhausted after step %d", step)
          break
        step += 1
        out = step_fn(batch, step)
        history.append({**out.metrics, "step": step})
        writer.scalars(step, out.metrics)
        if out.rollouts and config.log_rollouts_every and step % config.log_rollouts_every == 0:
          writer.rollouts(step, out.rollouts)
        bar.update(step, {label: out.metrics[key] for label, key in config.progress
                          if key in out.metrics})
        if evaluate is not None and config.eval_every and (
            step % config.eval_every == 0 or step == config.total_steps):
          result = evaluate()
          writer.scalars(step, result.scalars())
          if jax.process_index() == 0:
            result.write(workdir / "eval" / f"step_{step}.json")
        if trainer.bad_steps >= config.max_consecutive_bad_steps:
          save(step, out.metrics)
          raise TrainingStopped(
              f"{trainer.bad_steps} consecutive {config.stage} steps produced non-finite loss or "
              f"gradients (last: step {step}); parameters are those of the last finite update, "
              f"saved in {workdir / 'checkpoints'}. Lower the learning rate or check the data.")
        preempted = guard.sync_requested()
        if preempted or step % config.checkpoint_every == 0 or step == config.total_steps:
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


def total_steps(max_steps: int, steps_per_epoch: int, epochs: int) -> int:
  """`max_steps` when set, else the steps of `epochs` passes over the data."""
  return max_steps if max_steps > 0 else max(1, math.ceil(steps_per_epoch * epochs))
