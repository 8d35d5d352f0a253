"""Evaluation: greedy completions on a split, scored with the training rewards, summarised.

    sampler = Sampler(model, SamplerConfig(stop_tokens=..., sampling=SamplingParams(temperature=0)),
                      tokenizer=tokenizer)               # greedy, one sample per prompt
    result = evaluate_split(sampler, data_dir, "val", EvalConfig(max_new_tokens=256))
    result.write(workdir / "eval.json")
    writer.scalars(step, result.scalars())               # eval/accuracy/all, …/movement …
    print(compare_table(before, result))                 # accuracy by question type, SFT vs RL

Two layers, so the metric definitions can be checked on hand-written completions without a model:
  * `score`: completions + their records' references → one `RecordScore` per completion (pure).
  * `evaluate`: runs the sampler over loader batches, drops padding rows (`valid=False`) and scores
    the rest; `EvalResult.from_records` aggregates overall, per question type and per task.

Metric definitions (the same functions as the RL reward, `rl.rewards`, so "accuracy" here and the
trainer's `accuracy/*` mean the same thing):
  * accuracy: over multiple-choice records, the fraction whose single answer block is exactly the
    right option (`answer_reward`). It does not require the format: the format rate is reported
    beside it, and a model that answers right in a broken format shows up as high accuracy with a
    low format rate rather than as a wrong answer.
  * format rate: over all records, `format_reward` (one think block, then one answer block).
  * response length: completion tokens, the stop token included (as the trainer counts them).
  * open-ended records (reference "[x, y, z]"): the L1 distance in metres between the answer block's
    position and the truth, averaged over the completions that hold a parsable position (how many
    did is `num_parsed`), and the xyz reward clip(1 − L1, 0, 1) averaged over all of them (an
    unparsable answer scores 0).
  * action-token records (reference bins "147 130 21"): bin accuracy (all three bins right), the
    L1 in metres between the centres of the answered and the right bins (given the data's
    `ActionBins`), and the bin reward (`rewards.bins_reward`) in the xyz reward's place.
  * collapse check (multiple choice): the share of records giving the most common option, and the
    accuracy of the best constant answer. A small model often settles on one letter for every
    question; its accuracy is then the constant's, whatever it learned, and greedy decoding hides
    any change RL makes below the top letter.

Determinism: greedy decoding (checked), records in loader order (`shuffle=False`), one pass.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from robot_r1_jax.data import atomic, records
from robot_r1_jax.data.loader import Batch, LoaderConfig, make_loader
from robot_r1_jax.data.mcqa import undiscretize
from robot_r1_jax.data.prompts import QUESTION_TYPES, ActionBins
from robot_r1_jax.generate import sampling
from robot_r1_jax.generate.sampler import Sampler
from robot_r1_jax.model import sharding
from robot_r1_jax.rl import rewards
from robot_r1_jax.stages.context import StageContext
from robot_r1_jax.train import processes
from robot_r1_jax.train.metrics import ProgressBar

_OVERALL = "all"  # The row/group name of all records together.


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How to evaluate.

  max_new_tokens: completion budget per question (rounded up to a sampler bucket for shapes).
  batch_size: prompts per sampler call in `evaluate_split`, over all processes (a multiple of
    the sampler mesh's data×fsdp devices and of the process count).
  progress: show a progress bar (on process 0).
  """

  max_new_tokens: int = 256
  batch_size: int = 8
  progress: bool = True

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.batch_size < 1:
      raise ValueError(f"batch_size={self.batch_size} must be >= 1")


@dataclasses.dataclass(frozen=True)
class RecordScore:
  """One scored completion."""

  question_type: str
  task: str
  answer: str  # The reference: "[[B]]", "[x, y, z]" or bins "147 130 21".
  completion: str
  length: int  # Completion tokens, the stop token included.
  formatted: bool  # format_reward == 1.
  open_ended: bool  # The reference is a position, not an option.
  # Multiple choice: the answer block is the right option; bins: all three are right; else None.
  correct: bool | None
  l1: float | None  # Open-ended with a parsable answer position: L1 metres to the truth; else None.
  xyz_reward: float | None  # Open-ended: the position (or bin) reward, 0 if unparsable; else None.
  record_index: int | None = None  # The record's index in its split, when known.


@dataclasses.dataclass(frozen=True)
class GroupMetrics:
  """Aggregates over one group of records; a mean over an empty subset is None."""

  count: int
  format_rate: float
  mean_length: float  # Tokens.
  num_choice: int  # Multiple-choice records.
  accuracy: float | None  # Over the multiple-choice records.
  # Collapse check, over the multiple-choice records: the share giving the most common option, and
  # the accuracy the best constant answer would score (what a collapsed model's accuracy is).
  top_answer_share: float | None
  constant_accuracy: float | None
  num_open_ended: int
  num_parsed: int  # Open-ended records whose answer block holds a parsable position.
  mean_l1: float | None  # Metres, over the parsed open-ended records.
  mean_xyz_reward: float | None  # Over all open-ended records.
  bin_accuracy: float | None = None  # Over the action-token records: all three bins right.

  @classmethod
  def of(cls, records: Sequence[RecordScore]) -> GroupMetrics:
    """Aggregates a non-empty group."""
    if not records:
      raise ValueError("cannot aggregate an empty group of records")
    choice = [r for r in records if not r.open_ended]
    open_ended = [r for r in records if r.open_ended]
    parsed = [r.l1 for r in open_ended if r.l1 is not None]
    chosen = collections.Counter(rewards.chosen_option(r.completion) for r in choice)
    chosen.pop(None, None)  # no answer is not an answer the model keeps giving
    right = collections.Counter(rewards.parse_option(r.answer) for r in choice)
    return cls(count=len(records),
               format_rate=_mean([r.formatted for r in records]),
               mean_length=_mean([r.length for r in records]),
               num_choice=len(choice), accuracy=_mean([r.correct for r in choice]),
               top_answer_share=(max(chosen.values(), default=0) / len(choice)) if choice else None,
               constant_accuracy=(max(right.values()) / len(choice)) if choice else None,
               num_open_ended=len(open_ended), num_parsed=len(parsed), mean_l1=_mean(parsed),
               mean_xyz_reward=_mean([r.xyz_reward for r in open_ended]),
               bin_accuracy=_mean([r.correct for r in open_ended if r.correct is not None]))

  def scalars(self) -> dict[str, float]:
    """The metrics as floats, named as in `EvalResult.scalars`; None means are left out."""
    values = {"count": self.count, "format_rate": self.format_rate,
              "response_length": self.mean_length, "accuracy": self.accuracy,
              "top_answer_share": self.top_answer_share,
              "l1": self.mean_l1, "xyz_reward": self.mean_xyz_reward,
              "bin_accuracy": self.bin_accuracy}
    return {name: float(value) for name, value in values.items() if value is not None}


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Scores of every evaluated record and their aggregates (see the module docstring)."""

  overall: GroupMetrics
  by_type: dict[str, GroupMetrics]  # Question types in QUESTION_TYPES order (others after, sorted).
  by_task: dict[str, GroupMetrics]  # Tasks sorted by name.
  records: tuple[RecordScore, ...]  # In evaluation order.

  @classmethod
  def from_records(cls, records: Sequence[RecordScore]) -> EvalResult:
    """Aggregates per-record scores; raises ValueError when there are none."""
    if not records:
      raise ValueError("no records were evaluated (an empty split, or every row was padding)")
    return cls(overall=GroupMetrics.of(records), by_type=_groups(records, "question_type"),
               by_task=_groups(records, "task"), records=tuple(records))

  def to_json(self) -> str:
    """The aggregates and every record as strict JSON (no NaN; missing means are null)."""
    return json.dumps(dataclasses.asdict(self), indent=1, allow_nan=False) + "\n"

  @classmethod
  def from_json(cls, text: str) -> EvalResult:
    """Reads `to_json` output. The aggregates are recomputed from the records."""
    data = json.loads(text)
    try:
      return cls.from_records([RecordScore(**record) for record in data["records"]])
    except (KeyError, TypeError) as e:
      raise ValueError(f"not an evaluation result: {type(e).__name__}: {e}") from e

  def write(self, path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """Writes `to_json()` to `path` (local, or gs://…) atomically (the old file or the new one,
    never half)."""
    atomic.write_bytes(path, self.to_json().encode())
    return path

  @classmethod
  def read(cls, path: str | pathlib.Path) -> EvalResult:
    path = pathlib.Path(path)
    try:
      return cls.from_json(path.read_text())
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e

  def scalars(self, prefix: str = "eval/") -> dict[str, float]:
    """Flat metrics for `MetricsWriter.scalars` / TensorBoard.

    Names are `{prefix}{metric}/all`, `{prefix}{metric}/{question type}` and
    `{prefix}{metric}/task/{task}` for metric in count, format_rate, response_length, accuracy,
    top_answer_share, l1, xyz_reward, bin_accuracy (the last five only where defined).
    `accuracy/<type>` matches the trainer's.
    """
    groups = {_OVERALL: self.overall, **self.by_type,
              **{f"task/{task}": metrics for task, metrics in self.by_task.items()}}
    return {f"{prefix}{metric}/{group}": value for group, metrics in groups.items()
            for metric, value in metrics.scalars().items()}

  def table(self) -> str:
    """Per question type (and all): count, accuracy, the best constant answer's accuracy, the
    share giving the most common answer, format rate, mean length (and L1, if any)."""
    has_l1 = self.overall.num_open_ended > 0
    header = ["question type", "count", "accuracy", "constant", "same answer", "format", "length"]
    header += ["L1"] if has_l1 else []
    has_bins = self.overall.bin_accuracy is not None
    header += ["bin accuracy"] if has_bins else []
    rows = []
    for name, m in {**self.by_type, _OVERALL: self.overall}.items():
      row = [name, str(m.count), _percent(m.accuracy), _percent(m.constant_accuracy),
             _percent(m.top_answer_share), _percent(m.format_rate), f"{m.mean_length:.1f}"]
      rows.append(row + ([_metres(m.mean_l1)] if has_l1 else [])
                  + ([_percent(m.bin_accuracy)] if has_bins else []))
    return _render(header, rows)


def compare_table(before: EvalResult, after: EvalResult,
                  labels: tuple[str, str] = ("SFT", "SFT→GRPO")) -> str:
  """Accuracy per question type before vs after, with the collapse check (the best constant
  answer's accuracy, and each side's share giving its most common answer), and L1 if any records
  are open-ended.

  Raises:
    ValueError: the two results did not evaluate the same number of records of each type (they
      would not be comparable).
  """
  counts = [{name: m.count for name, m in r.by_type.items()} for r in (before, after)]
  if counts[0] != counts[1]:
    raise ValueError(f"the results evaluated different records: {labels[0]} has {counts[0]}, "
                     f"{labels[1]} has {counts[1]} per question type")
  has_l1 = before.overall.num_open_ended > 0
  header = ["question type", "count", f"accuracy {labels[0]}", f"accuracy {labels[1]}", "Δ",
            "constant", f"same answer {labels[0]}", f"same answer {labels[1]}"]
  if has_l1:
    header += [f"L1 {labels[0]}", f"L1 {labels[1]}"]
  has_bins = before.overall.bin_accuracy is not None
  if has_bins:
    header += [f"bins {labels[0]}", f"bins {labels[1]}"]
  rows = []
  for name, b in {**before.by_type, _OVERALL: before.overall}.items():
    a = after.overall if name == _OVERALL else after.by_type[name]
    delta = ("—" if a.accuracy is None or b.accuracy is None else
             f"{100 * (a.accuracy - b.accuracy):+.1f}")
    row = [name, str(b.count), _percent(b.accuracy), _percent(a.accuracy), delta,
           _percent(b.constant_accuracy), _percent(b.top_answer_share),
           _percent(a.top_answer_share)]
    rows.append(row + ([_metres(b.mean_l1), _metres(a.mean_l1)] if has_l1 else [])
                + ([_percent(b.bin_accuracy), _percent(a.bin_accuracy)] if has_bins else []))
  return _render(header, rows)


def score(completions: Sequence[str], *, answers: Sequence[str], question_types: Sequence[str],
          tasks: Sequence[str], lengths: Sequence[int],
          record_indices: Sequence[int] | None = None,
          bins: ActionBins | None = None) -> tuple[RecordScore, ...]:
  """Scores B completions against their records (see the module docstring for the metrics).

  Args:
    completions: B completion texts.
    answers: B references, "[[B]]" (or "B") for multiple choice, "[x, y, z]" or bins "147 130 21"
      for open-ended.
    question_types, tasks: B labels to group by.
    lengths: B completion lengths in tokens.
    record_indices: B indices of the records in their split, if known.
    bins: the data's bins, for the L1 in metres of bin answers (without it their L1 is None).

  Raises:
    ValueError: the sequences differ in length, or a reference is neither an option nor a
      position (completions never raise).
  """
  fields = {"answers": answers, "question_types": question_types, "tasks": tasks,
            "lengths": lengths}
  if record_indices is not None:
    fields["record_indices"] = record_indices
  bad = {name: len(values) for name, values in fields.items() if len(values) != len(completions)}
  if bad:
    raise ValueError(f"{len(completions)} completions but {bad}")
  answers = [str(a) for a in answers]
  reward = rewards.compute_rewards(completions, answers)
  scores = []
  for i, (text, answer) in enumerate(zip(completions, answers)):
    open_ended, tokens = bool(reward.open_ended[i]), rewards.is_bins(answer)
    if tokens:
      answered, right = rewards.answered_bins(text), rewards.parse_bins(answer)
      correct = answered == right
      l1 = None if answered is None or bins is None else _l1(
          undiscretize(answered, bins.workspace, bins.count),
          undiscretize(right, bins.workspace, bins.count))
    else:
      correct = None if open_ended else bool(reward.answer[i] == 1)
      answered = rewards.answered_xyz(text) if open_ended else None
      l1 = None if answered is None else _l1(answered, rewards.parse_xyz(answer))
    scores.append(RecordScore(
        question_type=str(question_types[i]), task=str(tasks[i]), answer=answer,
        completion=str(text), length=int(lengths[i]), formatted=bool(reward.format[i] == 1),
        open_ended=open_ended, correct=correct, l1=l1,
        xyz_reward=float(reward.xyz[i]) if open_ended else None,
        record_index=None if record_indices is None else int(record_indices[i])))
  return tuple(scores)


def check_sampler(sampler: Sampler) -> None:
  """Raises ValueError unless `sampler` decodes greedily, once per prompt, into text."""
  cfg = sampler.config
  problems = []
  if not cfg.sampling.greedy:
    problems.append(f"sampling={cfg.sampling} is not greedy (set temperature=0)")
  if cfg.num_samples != 1:
    problems.append(f"num_samples={cfg.num_samples} (set 1)")
  if sampler.tokenizer is None:
    problems.append("it has no tokenizer, so completions have no text")
  if problems:
    raise ValueError("evaluation needs a deterministic sampler: " + "; ".join(problems))


def evaluate(sampler: Sampler, batches: Iterable[Batch], config: EvalConfig = EvalConfig(), *,
             num_batches: int | None = None, bins: ActionBins | None = None) -> EvalResult:
  """Greedy completions for every valid row of `batches`, scored and aggregated.

  Args:
    sampler: a greedy, single-sample sampler with a tokenizer (see `check_sampler`); it reads the
      model's current parameters.
    batches: this process's loader batches; rows with `valid=False` are decoded (shapes stay
      fixed) but not scored. With several processes, the scores of all of them are gathered
      (a collective), so the result is every process's rows, in record order when known.
    config: see `EvalConfig` (`batch_size` is the loader's business, unused here).
    num_batches: the number of batches, for the progress bar only.
    bins: the data's action-token bins (see `score`).

  Raises:
    ValueError: a sampler that is not deterministic, or no valid row at all.
  """
  check_sampler(sampler)
  # Greedy decoding never draws from the key; a fixed one keeps the call signature honest.
  key = jax.random.key(0)
  scores: list[RecordScore] = []
  with ProgressBar(num_batches, enabled=None if config.progress else False,
                   desc="eval") as bar:
    for step, batch in enumerate(batches, start=1):
      out = sampler(batch.input_ids, batch.attention_mask, key,
                    max_new_tokens=config.max_new_tokens, pixel_values=batch.pixel_values,
                    image_grid_thw=batch.image_grid_thw)
      rows = np.flatnonzero(np.asarray(batch.valid, bool))
      scores += score(_take(out.text, rows), answers=_take(batch.answers, rows),
                      question_types=_take(batch.question_types, rows),
                      tasks=_take(batch.tasks, rows),
                      lengths=_take(sharding.local_rows(out.lengths), rows),
                      record_indices=_take(batch.record_indices, rows), bins=bins)
      choice = [s.correct for s in scores if not s.open_ended]
      bar.update(step, {"accuracy": _mean(choice)} if choice else None)
  if jax.process_count() > 1:  # each process scored its own rows: every process gets them all
    parts = processes.gather_json([dataclasses.asdict(s) for s in scores])
    scores = [RecordScore(**record) for part in parts for record in part]
    if all(s.record_index is not None for s in scores):
      scores.sort(key=lambda s: s.record_index)  # the split's order, as one process scores it
  return EvalResult.from_records(scores)


def evaluate_split(sampler: Sampler, data_dir: str | pathlib.Path, split: str,
                   config: EvalConfig = EvalConfig(), *,
                   loader_config: LoaderConfig = LoaderConfig()) -> EvalResult:
  """`evaluate` on every record of `split` of an extractor output, once, in manifest order.

  Args:
    sampler, config: as for `evaluate`; `config.batch_size` is the global batch size.
    data_dir: the extractor's output folder.
    split: "train" or "val" (a held-out-task extract's split works the same way).
    loader_config: preprocessing settings (tokenizer_path, pixels, length_buckets, workers); pass
      the training run's so prompts are built identically. Its order fields are overridden:
      no shuffle, one epoch, the last batch padded, each process decoding its share of the split
      (every process then holds the full result, in the split's order).
  """
  loader_config = dataclasses.replace(
      loader_config, batch_size=config.batch_size // jax.process_count(), shuffle=False,
      num_epochs=1, drop_remainder=False, shard_by_process=True)
  data = make_loader(data_dir, split, loader_config)
  bins = records.Manifest.load(data_dir).questions.bins
  return evaluate(sampler, data, config, num_batches=data.num_steps, bins=bins)


def split_evaluator(context: StageContext, config: EvalConfig = EvalConfig(),
                    split: str = "val") -> Callable[[], EvalResult] | None:
  """A callable that evaluates the context's model (its parameters at call time) greedily on
  `split`; None, with a warning, when the split has no questions."""
  info = records.Manifest.load(context.data_dir).splits.get(split)
  if info is None or not info.num_records:
    logging.warning("%s has no %s questions; evaluation is skipped", context.data_dir, split)
    return None
  sampler = context.sampler(sampling.SamplingParams(temperature=0.0))
  return lambda: evaluate_split(sampler, context.data_dir, split, config,
                                loader_config=context.loader)


def _l1(a: Sequence[float], b: Sequence[float]) -> float:
  return float(sum(abs(p - t) for p, t in zip(a, b, strict=True)))


def _take(values: Sequence[Any], rows: np.ndarray) -> list[Any]:
  return [values[i] for i in rows]


def _mean(values: Sequence[Any]) -> float | None:
  return float(np.mean(values)) if values else None


def _groups(records: Sequence[RecordScore], field: str) -> dict[str, GroupMetrics]:
  members: dict[str, list[RecordScore]] = {}
  for record in records:
    members.setdefault(getattr(record, field), []).append(record)
  known = [name for name in QUESTION_TYPES if name in members] if field == "question_type" else []
  order = known + sorted(set(members) - set(known))
  return {name: GroupMetrics.of(members[name]) for name in order}


def _percent(value: float | None) -> str:
  return "—" if value is None else f"{100 * value:.1f}%"


def _metres(value: float | None) -> str:
  return "—" if value is None else f"{value:.3f}"


def _render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A plain-text table: the first column left-aligned, the others right-aligned."""
  widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
  lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                     for c, (cell, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines)
