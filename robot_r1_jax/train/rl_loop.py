"""The RL training loop: resume → (batch → learner step → metrics → checkpoint)* → final save."""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from typing import Any, Iterator

import jax

from robot_r1_jax.rl.learner import Learner
from robot_r1_jax.train.checkpoint import Checkpointer, PreemptionGuard
from robot_r1_jax.train.metrics import MetricsWriter, ProgressBar


class TrainingStopped(RuntimeError):
  """Training cannot go on (e.g. repeated non-finite updates); the last good state was saved."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
  workdir: pathlib.Path
  total_steps: int  # the run ends at this step (resumed runs continue up to it)
  seed: int = 0
  checkpoint_every: int = 10
  keep_checkpoints: int = 3
  log_rollouts_every: int = 1
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. the flags, for the record


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def run(learner: Learner, data: Iterator[Any], config: RunConfig) -> list[dict[str, float]]:
  """Trains until `config.total_steps`, resuming from the newest checkpoint in the workdir.

  `data` is a checkpointable grain iterator of loader batches. Returns this session's per-step
  metrics. A SIGTERM saves the current step and returns; non-finite updates skip the step, and
  `max_consecutive_bad_steps` of them in a row save and raise `TrainingStopped`.
  """
  workdir = pathlib.Path(config.workdir)
  checkpoints = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
  writer = MetricsWriter(workdir)
  base_key = jax.random.key(config.seed)
  start = checkpoints.latest_step() or 0
  if start:
    state = {"params": learner.params, "opt_state": learner.opt_state}
    restored, _ = checkpoints.restore(start, abstract_state=_abstract(state), data_iterator=data)
    learner.params, learner.opt_state = restored["params"], restored["opt_state"]
    learner.commit()
    logging.info("resumed from %s at step %d", workdir / "checkpoints", start)
  writer.truncate_after(start)

  last_saved = start

  def save(step: int, metrics: dict[str, float] | None = None) -> None:
    nonlocal last_saved
    last_saved = step
    checkpoints.save(step, {"params": learner.params, "opt_state": learner.opt_state},
                     data_iterator=data,
                     meta={"config": config.meta, "seed": config.seed, "metrics": metrics or {}},
                     force=True)
    writer.flush()

  history: list[dict[str, float]] = []
  step = start
  try:
    with PreemptionGuard() as guard, ProgressBar(config.total_steps, initial=start) as bar:
      while step < config.total_steps:
        try:
          batch = next(data)
        except StopIteration:
          logging.info("data exhausted after step %d", step)
          break
        step += 1
        result = learner.step(batch, jax.random.fold_in(base_key, step))
        metrics = {**result.metrics, "step": step}
        history.append(metrics)
        writer.scalars(step, result.metrics)
        if config.log_rollouts_every and step % config.log_rollouts_every == 0:
          writer.rollouts(step, result.rollouts)
        bar.update(step, {"reward": result.metrics["reward/total"],
                          "acc": result.metrics["accuracy/all"],
                          "kl": result.metrics["kl/policy_ref"]})
        if learner.bad_steps >= learner.config.max_consecutive_bad_steps:
          save(step, result.metrics)
          raise TrainingStopped(
              f"{learner.bad_steps} consecutive steps produced non-finite loss or gradients (last: "
              f"step {step}); parameters are those of the last finite update, saved in "
              f"{workdir / 'checkpoints'}. Lower --learning_rate or check the data.")
        preempted = guard.sync_requested()
        if preempted or step % config.checkpoint_every == 0 or step == config.total_steps:
          save(step, result.metrics)
        if preempted:
          logging.warning("SIGTERM: saved step %d and stopping", step)
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
