"""The RL stage: GRPO / RLOO / REINFORCE++ on the context's train split, from the model as it is.

    history = train_rl(context, RLConfig(step=LearnerConfig(algo="grpo", ...)), workdir,
                       evaluate=evaluator)

The model as it is when the stage starts (pretrained, after SFT, or `--init_from`) is both the
initial policy and the frozen reference of the KL penalty. One step is one rollout of
`rollout_batch_size` prompts (`rl_step.Learner.step`); the loop checkpoints, evaluates and resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
from etils import epath

from robot_r1_jax.data import records
from robot_r1_jax.data import loader as loader_lib
from robot_r1_jax.generate import sampling
from robot_r1_jax.stages.context import StageContext
from robot_r1_jax.stages.rl_step import Learner, LearnerConfig
from robot_r1_jax.train import loop, optim
from robot_r1_jax.train.metrics import MetricsWriter


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """An RL run. Batch sizes count prompts over all processes."""

  step: LearnerConfig = LearnerConfig()
  sampling: sampling.SamplingParams = sampling.SamplingParams(top_p=0.99)
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  rollout_batch_size: int = 512  # prompts per step (one rollout)
  # Prompts per prefill + decode loop (0: the whole rollout): one chunk's KV cache at a time.
  rollout_chunk_size: int = 0
  # Decode rollouts in segments of this many tokens, dropping finished rows between them (0: off).
  rollout_compact_every: int = 0
  epochs: int = 5  # passes over the training questions
  max_steps: int = 0  # stop after this many steps (0: run all epochs)
  seed: int = 0  # the per-step sampling and shuffling keys
  loop: loop.LoopSettings = loop.LoopSettings()

  def __post_init__(self):
    if self.rollout_batch_size < 1 or self.rollout_batch_size % self.step.train_batch_size:
      raise ValueError(f"rollout_batch_size={self.rollout_batch_size} must be a positive multiple "
                       f"of train_batch_size={self.step.train_batch_size}")
    if self.rollout_chunk_size < 0 or (
        self.rollout_chunk_size and self.rollout_batch_size % self.rollout_chunk_size):
      raise ValueError(f"rollout_chunk_size={self.rollout_chunk_size} must be 0 or divide "
                       f"rollout_batch_size={self.rollout_batch_size}")
    if self.rollout_compact_every < 0:
      raise ValueError(f"rollout_compact_every={self.rollout_compact_every} must be >= 0 (0: off)")
    if self.epochs < 1 or self.max_steps < 0:
      raise ValueError(f"epochs={self.epochs} must be >= 1 and max_steps={self.max_steps} >= 0")

  @property
  def updates_per_step(self) -> int:
    """Optimizer updates per rollout: its mini-batches, μ times."""
    return self.rollout_batch_size // self.step.train_batch_size * (
        self.step.num_updates_per_rollout)


class RolloutRecords:
  """Saves, once per train record that a logged rollout used, what the rollouts viewer shows
  beside its completions: the image as `rollout_records/<record index>.png` and the question as
  a line `record({...});` of `rollout_records.js`, beside rollouts.jsonl (see train/rollouts.html).
  """

  SCRIPT = "rollout_records.js"

  def __init__(self, data_dir: str | os.PathLike[str]):
    self._data_dir = data_dir
    self._split: records.Split | None = None
    self._saved: set[int] = set()

  def __call__(self, rollouts: list[dict[str, Any]], writer: MetricsWriter) -> None:
    if self._split is None:  # first call, perhaps of a resumed run: what is saved already
      self._split = records.open_split(self._data_dir, "train")
      self._saved = {json.loads(line[len("record("):-len(");")])["record_index"]
                     for line in writer.read_text(self.SCRIPT).splitlines()
                     if line.startswith("record(") and line.endswith(");")}
    for index in sorted({r["record_index"] for r in rollouts} - self._saved):
      record = records.decode_record(self._split.source[index])
      question = record.question
      # The image first: its line is what marks the record saved.
      writer.write_bytes(f"rollout_records/{index}.png", record.image_png)
      line = {"record_index": index, "prompt": question.prompt, "options": list(question.options),
              "episode": question.episode, "frame": question.frame}
      writer.append_text(self.SCRIPT, f"record({json.dumps(line)});")
      self._saved.add(index)


def train_rl(context: StageContext, config: RLConfig, workdir: str | os.PathLike[str], *,
             evaluate: Callable[[], loop.Evaluation] | None = None) -> list[dict[str, float]]:
  """Trains until the run's last step, resuming from the newest checkpoint in `workdir`.

  Returns this session's per-step metrics (see `train.loop.run`).
  """
  data = loader_lib.make_loader(context.data_dir, "train", dataclasses.replace(
      context.loader, batch_size=config.rollout_batch_size // jax.process_count(),
      num_epochs=config.epochs))
  total = loop.total_steps(config.max_steps, data.steps_per_epoch, config.epochs)
  optimizer, schedule = optim.build_optimizer(config.optimizer, total * config.updates_per_step)
  sampler = context.sampler(config.sampling, num_samples=config.step.num_generations,
                            chunk_prompts=config.rollout_chunk_size,
                            compact_every=config.rollout_compact_every)
  learner = Learner(context.model, optimizer, sampler, config.step, context.mesh,
                    lr_schedule=schedule)
  base_key = jax.random.key(config.seed)
  batches = iter(data)  # dynamic sampling draws from it too, so checkpoints resume past its draws
  return loop.run(
      learner, lambda batch, step: learner.step(batch, jax.random.fold_in(base_key, step),
                                                draw=lambda: next(batches)),
      batches, loop.LoopConfig(
          workdir=epath.Path(workdir), total_steps=total, stage="rl", settings=config.loop,
          progress=(("reward", "reward/total"), ("acc", "accuracy/all"),
                    ("kl", "kl/policy_ref"), ("draws", "dynamic_sampling/draws")),
          meta=context.meta, on_rollouts=RolloutRecords(context.data_dir)),
      evaluate=evaluate)
