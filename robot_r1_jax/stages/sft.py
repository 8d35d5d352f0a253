"""Supervised fine-tuning (SFT) on the extractor's shards: the Direct-SFT / CoT-SFT baselines and
the warm-up before RL.

    questions = SplitQuestions(data_dir, "train")
    data = iter(loader.make_loader(data_dir, "train", LoaderConfig(batch_size=8, ...)))
    config = SftConfig(total_steps=200, targets=questions.target_config("cot"))
    history = run_sft(model, optimizer, data, tokenizer, config, workdir, mesh,
                      questions=questions, lr_schedule=schedule)

or, from a stage context (what the launcher does): `train_sft(context, config, workdir)`.

Data path: the loader's batches as they are (left-padded chat-template prompts with their images,
the same ones RL samples from), plus one target completion per row
(`data.sft_targets.target_text`) tokenized with the same tokenizer and ended with `<|im_end|>`,
the token that ends an assistant turn and stops the sampler. Targets are right-padded to the
smallest declared bucket (`SftConfig.target_buckets`), so the step compiles once per (prompt
bucket, target bucket) pair.

Decision: a target needs the question's numbers and options, which `loader.Batch` does not carry;
it does carry each row's `record_indices` (its position in the split, in manifest order), and
`SplitQuestions` reads those records' JSON headers back from the same shards (the image bytes are
not decoded). The loader stays unchanged and SFT needs nothing RL does not; a re-read costs tens
of microseconds per row. Each row's answer, episode and frame are checked against the batch, so a
lookup into the wrong split or folder is an error, not silently wrong targets.

Checkpoints hold {"params", "opt_state"} exactly as the RL loop's do, so an SFT run's checkpoint
can seed an RL run (`--init_from`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import jax
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from robot_r1_jax.data import loader as loader_lib
from robot_r1_jax.data import records, sft_targets
from robot_r1_jax.data.loader import Batch
from robot_r1_jax.data.mcqa import Question
from robot_r1_jax.model.qwen2_5_vl import Qwen25VL
from robot_r1_jax.stages.context import StageContext
from robot_r1_jax.stages.sft_step import SftBatch, SftTrainer
from robot_r1_jax.train import loop, optim
from robot_r1_jax.train.scoring import Sequences

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerBase

END_OF_TURN = "<|im_end|>"


class SplitQuestions:
  """The questions of one split of an extractor output, by record index (`Batch.record_indices`)."""

  def __init__(self, data_dir: str | os.PathLike[str], split: str):
    """Raises as `records.open_split` (a bad manifest, split or shard)."""
    opened = records.open_split(data_dir, split)
    self.manifest = opened.manifest
    self._where = f"split {split!r} of {data_dir}"
    self._source = opened.source

  def __len__(self) -> int:
    return len(self._source)

  def __call__(self, record_indices: Sequence[int] | np.ndarray) -> list[Question]:
    out = []
    for index in np.asarray(record_indices).tolist():
      if not 0 <= index < len(self._source):
        raise IndexError(f"record {index} is outside the {len(self._source)} records of "
                         f"{self._where}")
      out.append(records.decode_record(self._source[index]).question)
    return out

  def target_config(self, kind: str) -> sft_targets.TargetConfig:
    """Targets of `kind` that agree with how these questions were extracted (manifest config)."""
    questions = self.manifest.questions
    return sft_targets.TargetConfig(kind=kind, min_axis_move=questions.min_axis_move,
                                    metadata=questions.metadata)


class SftBatchBuilder:
  """`loader.Batch` + its questions -> `SftBatch` (targets tokenized and bucket-padded)."""

  def __init__(self, tokenizer: PreTrainedTokenizerBase, targets: sft_targets.TargetConfig,
               buckets: Sequence[int]):
    if not buckets or buckets[0] < 1 or list(buckets) != sorted(set(buckets)):
      raise ValueError(f"target_buckets={tuple(buckets)} must be a non-empty, strictly "
                       "increasing tuple of positive lengths")
    self._end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if self._end_id is None or self._end_id == tokenizer.unk_token_id:
      raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no {END_OF_TURN} token to end "
                       "the targets with")
    self._tokenizer, self._targets, self._buckets = tokenizer, targets, tuple(buckets)

  def target_ids(self, question: Question) -> list[int]:
    """The target's token ids, ending with `<|im_end|>`."""
    text = sft_targets.target_text(question, self._targets)
    return self._tokenizer(text, add_special_tokens=False)["input_ids"] + [self._end_id]

  def __call__(self, batch: Batch, questions: Sequence[Question]) -> SftBatch:
    """Rows with `valid=False` (evaluation padding) keep their target but get no loss.

    Raises:
      ValueError: the questions are not the batch's rows, a target is longer than the largest
        bucket, or the rows' images differ in size.
    """
    rows = len(batch.input_ids)
    if len(questions) != rows:
      raise ValueError(f"{len(questions)} questions for a batch of {rows} rows")
    targets = []
    for row, question in enumerate(questions):
      if (question.answer, question.episode, question.frame) != (
          str(batch.answers[row]), str(batch.episodes[row]), int(batch.frames[row])):
        raise ValueError(
            f"row {row} (record {batch.record_indices[row]}) is {batch.episodes[row]} frame "
            f"{batch.frames[row]} answer {batch.answers[row]} but its question is "
            f"{question.episode} frame {question.frame} answer {question.answer}: read the "
            "questions from the loader's own split and folder")
      targets.append(self.target_ids(question))
    longest = max(len(t) for t in targets)
    if longest > self._buckets[-1]:
      row = int(np.argmax([len(t) for t in targets]))
      raise ValueError(f"the {self._targets.kind} target of {questions[row].episode} frame "
                       f"{questions[row].frame} ({questions[row].question_type}) has {longest} "
                       f"tokens, more than the largest target bucket {self._buckets[-1]}; add a "
                       "larger one to target_buckets")
    if jax.process_count() > 1:
      # The processes' rows form one global array: they must agree on its target length.
      longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
    bucket = next(b for b in self._buckets if b >= longest)
    completion = np.full((rows, bucket), self._tokenizer.pad_token_id, np.int32)
    completion_mask = np.zeros((rows, bucket), np.int32)
    for row, ids in enumerate(targets):
      completion[row, :len(ids)] = ids
      completion_mask[row, :len(ids)] = int(batch.valid[row])
    grids = {tuple(int(v) for v in g) for g in np.asarray(batch.image_grid_thw)}
    if len(grids) > 1:
      raise ValueError(f"a batch mixes image grids {sorted(grids)}; extract with one --image_size")
    pixels = np.asarray(batch.pixel_values)
    return SftBatch(
        seqs=Sequences(prompt_ids=np.asarray(batch.input_ids, np.int32),
                       prompt_mask=np.asarray(batch.attention_mask, np.int32),
                       completion=completion, completion_mask=completion_mask,
                       pixel_values=pixels.reshape(rows, -1, pixels.shape[-1])),
        image_grid=grids.pop())


@dataclasses.dataclass(frozen=True)
class SftConfig:
  """An SFT run on the loader's batches."""

  total_steps: int  # the run ends at this step (a resumed run continues up to it)
  targets: sft_targets.TargetConfig = sft_targets.TargetConfig()  # see SplitQuestions.target_config
  # Increasing target lengths R, in tokens with <|im_end|>. With the tiny tokenizer a direct target
  # is ≈ 15 (open-ended ≈ 33) tokens and a CoT one 120–230.
  target_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
  batch_size: int = 8  # questions per step, all processes together (`train_sft`'s loader)
  micro_batch_size: int = 8  # rows (all processes) per forward/backward; exact accumulation
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig(
      learning_rate=3e-3, schedule="cosine", warmup_steps=5)  # `train_sft`'s optimizer
  loop: loop.LoopSettings = loop.LoopSettings(checkpoint_every=50)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. the flags, for the record

  def __post_init__(self):
    for name in ("total_steps", "batch_size", "micro_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"SftConfig.{name}={getattr(self, name)} must be >= 1")


def train_sft(context: StageContext, config: SftConfig, workdir: str | os.PathLike[str]
              ) -> list[dict[str, float]]:
  """The SFT stage on the context's train split: its loader, `config.optimizer` and `run_sft`.

  The targets are of `config.targets.kind`, built with the geometry the questions were extracted
  with (the manifest's, `SplitQuestions.target_config`).
  """
  questions = SplitQuestions(context.data_dir, "train")
  data = loader_lib.make_loader(context.data_dir, "train", dataclasses.replace(
      context.loader, batch_size=config.batch_size // jax.process_count()))
  optimizer, schedule = optim.build_optimizer(config.optimizer, config.total_steps)
  config = dataclasses.replace(config, targets=questions.target_config(config.targets.kind),
                               meta={**context.meta, **config.meta})
  return run_sft(context.model, optimizer, iter(data), context.tokenizer, config, workdir,
                 context.mesh, questions=questions, lr_schedule=schedule)


def run_sft(model: Qwen25VL, optimizer: optax.GradientTransformation, data: Iterator[Batch],
            tokenizer: PreTrainedTokenizerBase, config: SftConfig,
            workdir: str | os.PathLike[str], mesh: Mesh, *,
            questions: Callable[[np.ndarray], Sequence[Question]],
            lr_schedule: optax.Schedule | None = None) -> list[dict[str, float]]:
  """Trains until `config.total_steps`, resuming from the newest checkpoint in `workdir`.

  Args:
    model: trained in place: on return it holds the last parameters.
    optimizer: e.g. `train.optim.build_optimizer(...)[0]`.
    data: a checkpointable grain iterator of loader batches (`iter(make_loader(...))`).
    tokenizer: the loader's tokenizer.
    config: see `SftConfig` (its batch size and optimizer are `train_sft`'s business).
    workdir: checkpoints/, metrics.jsonl and tb/ go here.
    mesh: the model's mesh.
    questions: record indices -> questions, usually `SplitQuestions` of the loader's split.
    lr_schedule: the optimizer's schedule, to log the learning rate.

  Returns:
    This session's per-step metrics (see `train.loop.run` for preemption and non-finite steps).
  """
  trainer = SftTrainer(model, optimizer, mesh, micro_batch_size=config.micro_batch_size,
                       lr_schedule=lr_schedule)
  build = SftBatchBuilder(tokenizer, config.targets, config.target_buckets)
  step_fn = lambda batch, step: trainer.step(build(batch, questions(batch.record_indices)))
  return loop.run(trainer, step_fn, data, loop.LoopConfig(
      workdir=epath.Path(workdir), total_steps=config.total_steps, stage="sft",
      settings=config.loop, progress=(("loss", "loss"), ("acc", "token_accuracy")),
      meta={**config.meta, "target": config.targets.kind}))
